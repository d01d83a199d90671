"""AutoTinyBERT latency dataset and predictor (attnc.search.tinybert.latency).

References: a synthetic latency function whose truth is known (scored on fresh archs), the mean
predictor on measured latencies, an uninterrupted collection vs one killed (SIGKILL) and resumed,
and save -> load round trips."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnc.compiler.errors import ConfigError, DataError
from attnc.search.tinybert import latency as lat
from attnc.search.tinybert.latency import LatencyPredictor, arch_sequence, collect
from attnc.search.tinybert.space import Arch, Space

# tiny models: building and timing one takes milliseconds
TINY = Space(max_layers=3, max_hidden=96, max_ffn=192, max_heads=2, head_dim=16, vocab_size=64,
             max_position_embeddings=64)
MID = Space(max_layers=6, max_hidden=512, max_ffn=2048, max_heads=8)
FAST = dict(seq=32, warmup=1, repeats=3)


def synthetic_ms(space: Space, arch: Arch) -> float:
    """A made-up but latency-like cost: FLOPs at one rate, plus per-layer and per-head overheads
    and a mild width-dependent efficiency (wider matmuls run faster per FLOP)."""
    flops = space.flops(arch, 128)
    rate = 2e9 * (1 + arch.hidden / 512)            # FLOP/s, better for wide models
    return 1e3 * flops / rate + 0.08 * arch.layers + 0.01 * arch.layers * arch.heads + 0.05


def test_arch_sequence_starts_with_the_extremes_and_is_prefix_stable():
    seq = arch_sequence(TINY, 20, seed=3)
    assert seq[0] == Arch(1, 32, 32, 1, 16) and seq[1] == Arch(3, 96, 192, 2, 32)
    assert len(set(seq)) == 20 and all(a in TINY for a in seq)
    assert arch_sequence(TINY, 35, seed=3)[:20] == seq            # extending keeps the prefix
    assert arch_sequence(TINY, 20, seed=4) != seq
    kd = Space(max_layers=2, max_hidden=64, max_ffn=64, max_heads=4, head_dim=8, mode="kd")
    assert arch_sequence(kd, 2)[0] == Arch(1, 32, 32, 4, 4)
    with pytest.raises(ConfigError, match="too few distinct"):
        arch_sequence(Space(max_layers=1, max_hidden=32, max_ffn=36, max_heads=1), 5)


def test_synthetic_latency_is_learnt_to_under_5_percent():
    rng = random.Random(0)
    archs = arch_sequence(MID, 240, seed=1)
    # 1% multiplicative measurement noise on the training data
    records = [{"arch": str(a), "ms": synthetic_ms(MID, a) * (1 + 0.01 * rng.gauss(0, 1))} for a in archs]
    pred, m = LatencyPredictor.fit(MID, records, hidden=(64, 64), epochs=800, seed=0)
    # scored against the noise-free truth on archs the predictor has never seen
    seen = set(archs)
    fresh = [a for a in arch_sequence(MID, 500, seed=2) if a not in seen][:150]
    p = pred.predict_many(fresh)
    truth = [synthetic_ms(MID, a) for a in fresh]
    mape = 100 * sum(abs(x - t) / t for x, t in zip(p, truth)) / len(truth)
    assert mape < 5.0, mape
    assert m["mape_pct"] < 5.0 and m["mean_predictor"]["mape_pct"] > 20.0
    # the fit's own held-out MAPE is that of predictions vs the held-out records
    assert m["n_heldout"] == round(0.2 * 240) and m["n_train"] + m["n_heldout"] == 240


def test_predictor_beats_the_mean_predictor_on_measured_latencies(tmp_path):
    space = Space(max_layers=4, max_hidden=128, max_ffn=256, max_heads=2, head_dim=32, vocab_size=64,
                  max_position_embeddings=64)
    # 11 rounds: the median then survives 5 stalled runs per arch (the tests share a loaded machine)
    records = collect(space, 40, tmp_path, seq=64, warmup=1, repeats=11)
    pred, m = LatencyPredictor.fit(space, records, hidden=(64, 64), epochs=600, seed=0, seq=64)
    held = m["n_heldout"]
    assert held == 8
    assert m["rmse_ms"] < m["mean_predictor"]["rmse_ms"]
    assert m["mape_pct"] < m["mean_predictor"]["mape_pct"]
    # fitting from the folder reads the same records and the seq of its settings
    pred2, m2 = LatencyPredictor.fit(space, tmp_path, hidden=(64, 64), epochs=600, seed=0)
    assert m2["rmse_ms"] == m["rmse_ms"] and pred2.settings["seq"] == 64


def test_save_load_round_trip_and_bad_folders(tmp_path):
    archs = arch_sequence(MID, 60, seed=0)
    records = [{"arch": str(a), "ms": synthetic_ms(MID, a)} for a in archs]
    pred, m = LatencyPredictor.fit(MID, records, hidden=(32, 32), epochs=100, seed=0)
    pred.save(tmp_path / "p")
    back = LatencyPredictor.load(tmp_path / "p")
    probe = arch_sequence(MID, 80, seed=9)
    assert back.predict_many(probe) == pred.predict_many(probe)
    assert back.predict(str(probe[5])) == pred.predict(probe[5])
    assert back.space == MID and back.metrics["rmse_ms"] == m["rmse_ms"]
    saved = json.loads((tmp_path / "p" / "predictor.json").read_text())
    assert saved["space"] == MID.to_json() and saved["target"] == "log"

    with pytest.raises(ConfigError, match="outside"):
        back.predict("7-512-2048-8-512")                 # beyond the space's 6 layers
    with pytest.raises(DataError, match="missing") as e:
        LatencyPredictor.load(tmp_path / "nothing")
    assert "attnc search latency" in e.value.hint
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "predictor.json").write_text("{not json")
    with pytest.raises(DataError):
        LatencyPredictor.load(tmp_path / "bad")
    # a truncated weights file
    data = (tmp_path / "p" / "predictor.pt").read_bytes()
    (tmp_path / "p" / "predictor.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="damaged"):
        LatencyPredictor.load(tmp_path / "p")
    with pytest.raises(DataError, match="too few"):
        LatencyPredictor.fit(MID, records[:3])
    with pytest.raises(ConfigError):
        LatencyPredictor.fit(MID, [{"arch": "1-32-32-3-100", "ms": 1.0}] * 6)   # qkv != 64 h


_CHILD = textwrap.dedent("""
    import sys, time
    from attnc.search.tinybert import latency as lat
    from attnc.search.tinybert.space import Space
    real = lat.measure_archs
    def slow(*a, **k):          # slow enough that the parent kills it mid-collection
        time.sleep(0.3)
        return real(*a, **k)
    lat.measure_archs = slow
    space = Space.from_json(__import__("json").loads(sys.argv[2]))
    lat.collect(space, 12, sys.argv[1], seq=32, warmup=1, repeats=3, seed=5, interleave=2)
""")


def test_collect_resumes_after_sigkill_with_the_same_arch_sequence(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(killed), json.dumps(TINY.to_json())],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = killed / "latency.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= 3:
            break
        if child.poll() is not None:
            pytest.fail(f"collector exited early: {child.stderr.read().decode()}")
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    text = path.read_text()
    before = text[: text.rfind("\n") + 1].splitlines()    # complete lines (the kill may cut one)
    assert 3 <= len(before) < 12, "the kill must land mid-collection"
    with open(path, "a") as f:                 # what a kill during a write leaves behind
        f.write('{"index": %d, "arch": "2-6' % len(before))

    resumed = collect(TINY, 12, killed, seed=5, interleave=2, **FAST)
    ref = collect(TINY, 12, clean, seed=5, interleave=2, **FAST)
    lines = path.read_text().splitlines()
    assert lines[: len(before)] == before                      # measured records are kept as written
    assert [json.loads(x) for x in lines] == resumed
    assert [r["arch"] for r in resumed] == [r["arch"] for r in ref]
    assert [r["index"] for r in resumed] == list(range(12))
    assert len({r["arch"] for r in resumed}) == 12
    # a finished dataset is not measured again; a larger one is extended with the same sequence
    assert collect(TINY, 12, killed, seed=5, interleave=2, **FAST) == resumed
    more = collect(TINY, 15, killed, seed=5, interleave=2, **FAST)
    assert [r["arch"] for r in more] == [str(a) for a in arch_sequence(TINY, 15, seed=5)]


def test_collect_refuses_other_settings_and_foreign_files(tmp_path):
    collect(TINY, 4, tmp_path, seed=0, **FAST)
    with pytest.raises(ConfigError, match="seq"):
        collect(TINY, 4, tmp_path, seed=0, seq=16, warmup=1, repeats=3)
    with pytest.raises(ConfigError, match="space"):
        collect(Space(max_layers=2, max_hidden=96, max_ffn=192, max_heads=2, head_dim=16, vocab_size=64,
                      max_position_embeddings=64), 4, tmp_path, seed=0, **FAST)
    with pytest.raises(ConfigError, match="seed"):
        collect(TINY, 4, tmp_path, seed=1, **FAST)
    # a record that is not the sequence's
    path = tmp_path / "latency.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[2]["arch"] = "1-32-32-1-16" if recs[2]["arch"] != "1-32-32-1-16" else "1-36-32-1-16"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match="record 2"):
        collect(TINY, 4, tmp_path, seed=0, **FAST)
    path.write_text("garbage\n")
    with pytest.raises(DataError, match=":1"):
        collect(TINY, 4, tmp_path, seed=0, **FAST)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        collect(TINY, 4, tmp_path / "x", seq=128)
    with pytest.raises(ConfigError, match="CUDA|device"):
        collect(TINY, 4, tmp_path / "y", device="tpu")


def test_bert_base_latency_is_measured_once_per_target(tmp_path, monkeypatch):
    calls = []

    def fake(configs, **kw):
        calls.append(([c.arch for c in configs], kw["seq"]))
        return [[100.0 + len(calls)] * 3 for _ in configs]

    monkeypatch.setattr(lat, "time_models", fake)
    a = lat.bert_base_latency_ms("cpu", 1, 1, 128, folder=tmp_path)
    b = lat.bert_base_latency_ms("cpu", 1, 1, 128, folder=tmp_path)
    c = lat.bert_base_latency_ms("cpu", 1, 1, 64, folder=tmp_path)
    assert (a, b, c) == (101.0, 101.0, 102.0)
    assert calls == [(["12-768-3072-12-768"], 128), (["12-768-3072-12-768"], 64)]
    # an entry written before timings were recorded (no "timing": it was back-to-back) is the one a
    # refresh replaces, so the next lookup finds the new value, not the old one
    cache = tmp_path / "bert_base_latency.json"
    old = json.loads(cache.read_text())
    for e in old["entries"]:
        del e["timing"]
    cache.write_text(json.dumps(old))
    assert lat.bert_base_latency_ms("cpu", 1, 1, 128, folder=tmp_path) == 101.0
    assert lat.bert_base_latency_ms("cpu", 1, 1, 128, folder=tmp_path, refresh=True) == 103.0
    assert lat.bert_base_latency_ms("cpu", 1, 1, 128, folder=tmp_path) == 103.0
    assert len(json.loads(cache.read_text())["entries"]) == 2        # seq 128 (new) and seq 64
    cache.write_text("[")
    with pytest.raises(DataError):
        lat.bert_base_latency_ms("cpu", 1, 1, 128, folder=tmp_path)


def test_cli_collects_fits_and_saves(tmp_path, capsys):
    import argparse

    from attnc.search.tinybert.cli import add_latency_arguments, cli_latency

    p = argparse.ArgumentParser()
    add_latency_arguments(p)
    out = tmp_path / "run"
    argv = ["--samples", "20", "--max-layers", "2", "--max-hidden", "64", "--max-ffn", "96", "--max-heads", "2",
            "--head-dim", "16", "--vocab-size", "64", "--seq", "32", "--warmup", "1", "--repeats", "3",
            "--epochs", "200", "--no-progress", "--json", "--out", str(out)]
    assert cli_latency(p.parse_args(argv)) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 20 and res["measured_now"] == 20
    pred = LatencyPredictor.load(out)
    assert pred.space == Space(max_layers=2, max_hidden=64, max_ffn=96, max_heads=2, head_dim=16, vocab_size=64)
    recs = lat.load_records(out)
    assert math.isfinite(pred.predict(recs[3]["arch"]))
    # rerun: nothing new to measure; other settings -> the project's error
    assert cli_latency(p.parse_args(argv)) == 0
    assert json.loads(capsys.readouterr().out)["measured_now"] == 0
    with pytest.raises(ConfigError):
        cli_latency(p.parse_args(argv[:-2] + ["--seq", "16", "--out", str(out)]))


def test_measure_archs_round_robin_reports_the_statistics_of_each_arch(monkeypatch):
    """Every model runs `warmup` untimed times, then once per round in a rotating order; each arch's
    statistics are those of its own timed runs (a fake clock: arch i takes (i+1) * round-factor ms)."""
    import attnc.runtime.modeling as modeling

    archs = [Arch(1, 32, 32, 1, 16), Arch(2, 64, 96, 2, 32), Arch(3, 96, 192, 1, 16)]
    calls, clock = [], [0.0]
    factors = [1.0, 3.0, 2.0, 5.0, 4.0]            # a slow spell in rounds 1 and 3 hits every arch

    class Fake(modeling.AttncBertModel):
        def forward(self, input_ids=None, attention_mask=None, **kw):
            i = archs.index(Arch(self.config.num_hidden_layers, self.config.hidden_size,
                                 self.config.intermediate_size, self.config.num_attention_heads,
                                 self.config.qkv_size))
            timed = [c for c in calls if c[0] == i]
            r = len(timed) - 2                     # warmup=2: the round of this call (<0: warm-up)
            calls.append((i, r))
            clock[0] += (i + 1) * 1e-3 * (factors[r] if r >= 0 else 10.0)

    monkeypatch.setattr(modeling, "AttncBertModel", Fake)
    monkeypatch.setattr(lat.time, "perf_counter", lambda: clock[0])
    recs = lat.measure_archs(TINY, archs, seq=16, warmup=2, repeats=5, timing="round-robin")
    assert calls[:6] == [(0, -2), (0, -1), (1, -2), (1, -1), (2, -2), (2, -1)]
    assert [i for i, _ in calls[6:]] == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2, 1, 2, 0]
    for i, rec in enumerate(recs):
        ms = sorted((i + 1) * f for f in factors)
        assert rec["arch"] == str(archs[i])
        assert rec["ms"] == pytest.approx(ms[2]) and rec["min_ms"] == pytest.approx(ms[0])
        assert rec["q25_ms"] == pytest.approx(ms[1]) and rec["mean_ms"] == pytest.approx(sum(ms) / 5)


def test_reference_times_put_groups_timed_at_different_machine_speeds_on_one_scale():
    """Groups of 20 archs measured while the machine ran 0.7x..1.5x as fast (every latency of a group,
    its reference's included, scaled alike): with the reference times the fit recovers the known
    latencies; without them it learns the speed spells as noise."""
    rng = random.Random(0)
    archs = arch_sequence(MID, 240, seed=1)
    ref = lat.reference_arch(MID)
    assert ref in MID and ref == lat.reference_arch(MID)
    speeds = [0.7, 1.5, 1.0, 1.3, 0.8, 1.2, 0.9, 1.4, 0.75, 1.1, 1.25, 0.85]
    records = []
    for i, a in enumerate(archs):
        s = speeds[i // 20]
        records.append({"arch": str(a), "ms": synthetic_ms(MID, a) * s * (1 + 0.005 * rng.gauss(0, 1)),
                        "ref_ms": synthetic_ms(MID, ref) * s})
    factors = lat.drift_factors(records)
    assert factors[0] == pytest.approx(statistics.median(speeds) / 0.7)   # median(ref) / own ref
    seen = set(archs)
    fresh = [a for a in arch_sequence(MID, 400, seed=7) if a not in seen][:60]
    truth = [synthetic_ms(MID, a) * statistics.median(speeds) for a in fresh]   # the common scale

    def mape(pred):
        return 100 * statistics.fmean(abs(p - t) / t for p, t in zip(pred.predict_many(fresh), truth))

    fixed, m = LatencyPredictor.fit(MID, records, hidden=(64, 64), epochs=800, seed=0)
    raw, m_raw = LatencyPredictor.fit(MID, records, hidden=(64, 64), epochs=800, seed=0, drift=False)
    assert m["drift_corrected"] and not m_raw["drift_corrected"]
    assert mape(fixed) < 5.0
    assert mape(raw) > 2 * mape(fixed)
    # records without reference times are fitted as they are
    plain = [{k: v for k, v in r.items() if k != "ref_ms"} for r in records]
    assert lat.drift_factors(plain) is None
    assert not LatencyPredictor.fit(MID, plain, hidden=(8,), epochs=5)[1]["drift_corrected"]


def test_back_to_back_timing_runs_each_arch_in_consecutive_blocks(monkeypatch):
    """The default schedule: after `warmup` untimed runs each, every arch runs blocks of consecutive
    runs (one untimed run first), the archs taking turns block by block with the order rotating; the
    statistics are those of each arch's own timed runs."""
    import attnc.runtime.modeling as modeling

    archs = [Arch(1, 32, 32, 1, 16), Arch(2, 64, 96, 2, 32), Arch(3, 96, 192, 1, 16)]
    calls, clock = [], [0.0]

    class Fake(modeling.AttncBertModel):
        def forward(self, input_ids=None, attention_mask=None, **kw):
            i = archs.index(Arch(self.config.num_hidden_layers, self.config.hidden_size,
                                 self.config.intermediate_size, self.config.num_attention_heads,
                                 self.config.qkv_size))
            k = sum(1 for c in calls if c == i)      # this arch's k-th call
            calls.append(i)
            clock[0] += (i + 1) * 1e-3 * (1 + k)     # each run of an arch a little slower than the last

    monkeypatch.setattr(modeling, "AttncBertModel", Fake)
    monkeypatch.setattr(lat.time, "perf_counter", lambda: clock[0])
    recs = lat.measure_archs(TINY, archs, seq=16, warmup=2, repeats=7, rounds=3)
    # warm-up 2 each; then 3 blocks of 3, 2, 2 timed runs, each after 1 untimed run, order rotating
    want = [0, 0, 1, 1, 2, 2] + [0] * 4 + [1] * 4 + [2] * 4 + [1] * 3 + [2] * 3 + [0] * 3 + [2] * 3 + [0] * 3 + [1] * 3
    assert calls == want
    for i, rec in enumerate(recs):
        # arch i's calls are numbered 0..; timed are: block 1 -> 3,4,5; block 2 -> 7,8; block 3 -> 10,11
        ms = sorted((i + 1) * (1 + k) for k in (3, 4, 5, 7, 8, 10, 11))
        assert rec["ms"] == pytest.approx(ms[3]) and rec["min_ms"] == pytest.approx(ms[0])
    with pytest.raises(ConfigError, match="timing"):
        lat.measure_archs(TINY, archs, timing="interleaved")


def test_edges_design_covers_the_corners_and_the_maxima():
    """The default design times every corner of the space first, then draws each field at its
    maximum about 1/4 of the time (where a search under a latency limit ends up), at its minimum
    1/8, uniformly otherwise; "uniform" keeps the earlier design."""
    seq = arch_sequence(MID, 300, seed=0)
    corners = lat.corner_archs(MID)
    assert len(corners) == 16 and seq[:16] == corners
    c = MID._choices()
    for a in corners:
        assert a.layers in (1, 6) and a.hidden in (32, 512) and a.ffn in (32, 2048) and a.heads in (1, 8)
    rest = seq[16:]
    for get, hi, lo in ((lambda a: a.hidden, 512, 32), (lambda a: a.ffn, 2048, 32)):   # 121 and 505 values
        at_max = sum(get(a) == hi for a in rest) / len(rest)
        at_min = sum(get(a) == lo for a in rest) / len(rest)
        assert 0.12 < at_max < 0.36 and 0.06 < at_min < 0.20, (at_max, at_min)   # distinct archs: a little under
    assert sum(a.layers == 6 for a in rest) > sum(a.layers == 1 for a in rest) > len(rest) / 6
    uni = arch_sequence(MID, 300, seed=0, design="uniform")
    assert sum(a.hidden == 512 for a in uni[2:]) < 15          # 1/121 of uniform draws
    assert len(c["hidden"]) == 121
    with pytest.raises(ConfigError, match="design"):
        arch_sequence(MID, 10, design="corners")


def test_safety_margin_is_the_held_out_under_prediction_quantile():
    """safety_margin = the 95th percentile of true / predicted - 1 on the held-out archs (floored at
    0), recomputed here from the held-out records by hand; an arch predicted at T / (1 + margin) then
    runs within T for at least 95% of the held-out archs' errors."""
    rng = random.Random(3)
    archs = arch_sequence(MID, 200, seed=1)
    records = [{"arch": str(a), "ms": synthetic_ms(MID, a) * (1 + 0.03 * rng.gauss(0, 1))} for a in archs]
    pred, m = LatencyPredictor.fit(MID, records, hidden=(32, 32), epochs=400, seed=0)
    # the held-out split is the fit's (seeded): rebuild it from the metrics' counts by predicting all
    by = {r["arch"]: r["ms"] for r in records}
    held = m["heldout_archs"]
    assert len(held) == m["n_heldout"] == 40
    ratios = sorted(by[a] / p - 1 for a, p in zip(held, pred.predict_many(held)))
    k = 0.95 * (len(ratios) - 1)
    want = ratios[int(k)] + (ratios[int(k) + 1] - ratios[int(k)]) * (k - int(k))
    assert pred.safety_margin == pytest.approx(max(0.0, want))
    assert 0.01 < pred.safety_margin < 0.15
    covered = sum(by[a] <= p * (1 + pred.safety_margin) for a, p in zip(held, pred.predict_many(held)))
    assert covered >= 0.95 * len(held) - 1
    # an exact predictor needs no margin; an always-slow truth needs one of its size
    assert lat.under_prediction_margin([1.0, 2.0, 4.0], [1.0, 2.0, 4.0]) == 0.0
    assert lat.under_prediction_margin([1.0, 2.0, 4.0], [1.1, 2.2, 4.4]) == pytest.approx(0.1)
    # without a held-out split there is no margin to derive
    assert LatencyPredictor.fit(MID, records, hidden=(8,), epochs=5, holdout=0.0)[0].safety_margin is None
    # it survives save / load
    import tempfile
    d = tempfile.mkdtemp()
    pred.save(d)
    assert LatencyPredictor.load(d).safety_margin == pred.safety_margin
