"""`attnc search fidelity` / attnc.search.fidelity: the architectures file, a tiny
end-to-end run with a synthetic proxy, and resuming."""
from __future__ import annotations

import json

import pytest
from scipy.stats import kendalltau

from attnc.cli import main
from attnc.compiler.errors import ConfigError, DataError
from attnc.search import proxy_fidelity as pf
from attnc.search.space import Architecture, LayerChoice


def _tau(a, b) -> float:
    return float(kendalltau(a, b).statistic)     # scipy's tau-b: an independent reference


def test_architectures_file_reads_what_reports_print(tmp_path):
    archs = [Architecture((LayerChoice.attention("softmax(Q @ K^T / sqrt(d)) @ V"), LayerChoice.conv(7)),
                          hidden_size=32, intermediate_size=64, num_heads=4),
             Architecture((LayerChoice.conv(3), LayerChoice.conv(65)), hidden_size=32, intermediate_size=64, num_heads=4),
             Architecture((LayerChoice.attention("Q + V"), LayerChoice.attention("softmax(Q @ K^T) @ V")),
                          hidden_size=32, intermediate_size=64, num_heads=4)]
    f = tmp_path / "a.txt"
    f.write_text("# three\n" + "\n".join(pf.arch_line(a) for a in archs) + "\n\n")
    assert pf.read_architectures(f, 32, 64, 4) == archs
    f.write_text("softmax(Q @ K^T) @ V | conv(k=7)\nQ + | conv(k=3)\nQ + V | Q + V\n")
    with pytest.raises(DataError, match=r"a.txt:2: layer 'Q \+'"):
        pf.read_architectures(f, 32, 64, 4)


def _score_by_conv(arch) -> float:
    """A synthetic proxy: the number of conv layers."""
    return float(sum(c.kind == "conv" for c in arch.layers))


def test_fidelity_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    import sys
    import types
    mod = types.ModuleType("fid_eval")
    mod.score = _score_by_conv
    monkeypatch.setitem(sys.modules, "fid_eval", mod)
    f = tmp_path / "a.txt"
    f.write_text("conv(k=3) | conv(k=7)\nsoftmax(Q @ K^T / sqrt(d)) @ V | conv(k=7)\n"
                 "Q + V | softmax(Q @ K^T) @ V\nsoftmax(Q @ K^T / sqrt(d)) @ V | softmax(Q @ K^T / sqrt(d)) @ V\n")
    out = tmp_path / "fid"
    args = ["search", "fidelity", "--archs", str(f), "--out", str(out), "--hidden", "32", "--truth-steps", "3",
            "--truth-seeds", "2", "--shared-steps", "2", "--warmup-children", "2", "--evaluator", "fid_eval:score",
            "--seq-len", "32", "--batch-size", "8", "--eval-blocks", "16", "--bootstrap", "100", "--device", "cpu",
            "--json", "--plot", str(tmp_path / "fid.png")]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    png = (tmp_path / "fid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"                      # a PNG, with a real image in it
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 200 and height >= 150
    log = [json.loads(x) for x in (out / "fidelity.jsonl").read_text().splitlines()]
    truth = {(x["arch"], x["seed"]): x["score"] for x in log if x.get("what") == "truth"}
    assert len(truth) == 8
    # the truth's mean and each proxy's tau are recomputed here from the log
    means = [(truth[(n, 0)] + truth[(n, 1)]) / 2 for n in r["architectures"]]
    assert r["truth"]["mean"] == pytest.approx(means)
    mine = [_score_by_conv(pf.parse_architecture(n, 32, 128, 4)) for n in r["architectures"]]
    p = r["proxies"]["fid_eval:score"]
    assert p["scores"] == mine and p["kendall_tau"] == pytest.approx(_tau(mine, means), nan_ok=True)
    assert set(r["proxies"]) == {"biws", "scratch", "fid_eval:score", "baseline:params", "baseline:random"}
    assert r["proxies"]["scratch"]["steps_each"] == 3      # 2 + 2 warm-up x 2 steps / 4 architectures
    assert "self_agreement" in r["truth"] and r["truth"]["self_agreement"]["kendall_tau"] == pytest.approx(
        _tau([truth[(n, 0)] for n in r["architectures"]], [truth[(n, 1)] for n in r["architectures"]]))
    # resumed: nothing trained again, the same figures
    n_lines = len(log)
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert len((out / "fidelity.jsonl").read_text().splitlines()) == n_lines
    assert again["proxies"]["biws"]["scores"] == r["proxies"]["biws"]["scores"]
    # another warm-up over the same truth: the truth is reused, only the proxies train again
    i = args.index("--warmup-children")
    other = args[:i + 1] + ["3"] + args[i + 2:]
    assert main(other) == 0
    third = json.loads(capsys.readouterr().out)
    log = [json.loads(x) for x in (out / "fidelity.jsonl").read_text().splitlines()]
    assert sum(x.get("what") == "truth" for x in log) == 8                  # not trained again
    assert third["truth"]["mean"] == r["truth"]["mean"]
    assert third["proxies"]["scratch"]["steps_each"] == 4                    # 2 + 3 x 2 / 4, rounded
    assert {x["what"] for x in log[n_lines:]} == {"scratch@4", "biws-warmup@2x3", "biws@2x3"}
    # warm-up children of their own length: --warmup-steps equal to --shared-steps is the same run (nothing
    # trained); 4 steps per warm-up child is another supernet, costed as such, over the same truth
    n_lines = len(log)
    assert main(args + ["--warmup-steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["proxies"]["biws"]["scores"] == r["proxies"]["biws"]["scores"]
    assert len((out / "fidelity.jsonl").read_text().splitlines()) == n_lines
    assert main(args + ["--warmup-steps", "4"]) == 0
    fourth = json.loads(capsys.readouterr().out)
    log = [json.loads(x) for x in (out / "fidelity.jsonl").read_text().splitlines()]
    # the from-scratch proxy of that cost (4 steps) was trained by the third run: reused, not trained again
    assert {x["what"] for x in log[n_lines:]} == {"biws-warmup@2x2x4", "biws@2x2x4"}
    assert fourth["proxies"]["biws"]["steps_each"] == 4 and fourth["proxies"]["scratch"]["steps_each"] == 4
    assert fourth["proxies"]["scratch"]["scores"] == third["proxies"]["scratch"]["scores"]
    assert fourth["proxies"]["biws"]["scores"] != r["proxies"]["biws"]["scores"]
    assert fourth["truth"]["mean"] == r["truth"]["mean"]
    # a log that named from-scratch rows after the BIWS setting (as before: "scratch@2x3") resumes from them
    text = (out / "fidelity.jsonl").read_text()
    (out / "fidelity.jsonl").write_text(text.replace('"what": "scratch@4"', '"what": "scratch@2x3"'))
    n_lines = len(text.splitlines())
    assert main(other) == 0
    assert json.loads(capsys.readouterr().out)["proxies"]["scratch"]["scores"] == third["proxies"]["scratch"]["scores"]
    assert len((out / "fidelity.jsonl").read_text().splitlines()) == n_lines
    # other truth settings in the same folder: exit 2, no traceback
    assert main(args[:-3] + ["--truth-steps", "4"]) == 2
    assert "other settings" in capsys.readouterr().err


_TINY = dict(seq_len=32, batch_size=8, eval_blocks=16, device="cpu", lr=3e-3)
_LINES = ["conv(k=3) | conv(k=7)", "softmax(Q @ K^T / sqrt(d)) @ V | conv(k=7)", "Q + V | softmax(Q @ K^T) @ V",
          "softsign(V) | conv(k=3)"]


def _archs(lines):
    return [pf.parse_architecture(x, 32, 64, 4) for x in lines]


def test_every_architecture_is_scored_with_the_same_seed(tmp_path):
    # common random numbers: an architecture's score does not depend on where it sits in the list
    cfg = pf.FidelityConfig(truth_steps=3, truth_seeds=1, shared_steps=2, warmup_children=0, bootstrap=50,
                            proxy=_TINY)
    a = pf.fidelity(_archs(_LINES), tmp_path / "a", cfg)
    b = pf.fidelity(_archs(_LINES[::-1]), tmp_path / "b", cfg)
    for what in ("biws", "scratch"):
        assert dict(zip(a["architectures"], a["proxies"][what]["scores"])) == \
            dict(zip(b["architectures"], b["proxies"][what]["scores"])), what
    assert dict(zip(a["architectures"], a["truth"]["mean"])) == dict(zip(b["architectures"], b["truth"]["mean"]))


def test_workers_train_what_one_process_trains(tmp_path):
    cfg = pf.FidelityConfig(truth_steps=3, truth_seeds=2, shared_steps=2, warmup_children=2, bootstrap=50,
                            proxy=_TINY)
    one = pf.fidelity(_archs(_LINES), tmp_path / "one", cfg)
    two = pf.fidelity(_archs(_LINES), tmp_path / "two", cfg, workers=2)
    # the same trainings; only the workers' thread count (1) may change float sums' order
    for s in range(2):
        assert two["truth"]["scores_per_seed"][s] == pytest.approx(one["truth"]["scores_per_seed"][s], abs=1e-5)
    assert two["proxies"]["scratch"]["scores"] == pytest.approx(one["proxies"]["scratch"]["scores"], abs=1e-5)
    assert two["proxies"]["biws"]["scores"] == one["proxies"]["biws"]["scores"]
    with pytest.raises(ConfigError, match="workers"):
        pf.fidelity(_archs(_LINES), tmp_path / "three", cfg, workers=0)
    with pytest.raises(ConfigError, match="fidelity tool's own proxies"):
        pf.fidelity(_archs(_LINES), tmp_path / "four", cfg, evaluators={"scratch": lambda a: 0.0})
    with pytest.raises(ConfigError, match="may not set shared_pretrain_steps, warmup_steps"):
        pf.FidelityConfig(proxy=dict(_TINY, warmup_steps=4, shared_pretrain_steps=8))


def test_biws_minus_scratch_is_paired():
    import random
    rng = random.Random(1)
    truth = [rng.gauss(0, 1) for _ in range(30)]
    a = [t + rng.gauss(0, 1) for t in truth]            # a noisy proxy (tau about +0.45)
    order = sorted(range(30), key=lambda i: a[i])
    b = list(a)
    i, j = order[10], order[11]
    b[i], b[j] = b[j], b[i]                              # the same ranking but for one adjacent swap
    d = pf.paired_difference(a, b, truth, 1000, 0)
    assert d["kendall_tau_diff"] == pytest.approx(_tau(a, truth) - _tau(b, truth))
    lo, hi = d["kendall_tau_diff_ci90"]
    assert lo <= d["kendall_tau_diff"] <= hi
    # paired: one swap moves tau by at most 2/435 on the full set; an unpaired interval of two taus
    # of about +0.45 on 30 architectures would be about 0.5 wide
    assert hi - lo < 0.05
    same = pf.paired_difference(a, a, truth, 200, 0)
    assert same["kendall_tau_diff"] == 0 and same["kendall_tau_diff_ci90"] == (0.0, 0.0)
