"""Autotuning of the fused kernels (kernels/tune.py), checked on the CPU: the key and its n
bucket, the pruned config space, the on-disk cache of chosen configs, and what a launch picks
under the interpreter, with forced blocks, without autotuning and (simulated) on a GPU."""
from __future__ import annotations

import json

import pytest

import attnc
from attnc.kernels import tune
from attnc.kernels.tune import Config, TuneCache, Tuner, choose, configs, n_bucket, tune_key


@pytest.mark.parametrize("n,bucket", [(1, 16), (15, 16), (16, 16), (17, 32), (100, 128), (1000, 1024),
                                      (1024, 1024), (1025, 2048), (4096, 4096)])
def test_n_bucket(n, bucket):
    assert n_bucket(n) == bucket


def test_tune_key():
    base = dict(dtype="float16", head_dim=64, has_mask=True, n=1000, precision="tf32")
    assert tune_key("fwd", **base) == "fwd|float16|d64|mask|n1024|tf32"
    assert tune_key("fwd", **{**base, "n": 1024}) == tune_key("fwd", **base)      # same bucket
    for change in ({"n": 1025}, {"dtype": "bfloat16"}, {"head_dim": 128}, {"has_mask": False},
                   {"precision": "ieee"}):
        assert tune_key("fwd", **{**base, **change}) != tune_key("fwd", **base), change
    assert tune_key("bwd", **base) != tune_key("fwd", **base)


def test_configs_start_with_the_default_and_respect_the_n_bucket():
    for family in tune.SHARED_LIMIT:
        for kind in tune.SPACE:
            for hd in (64, 128):
                full = configs(kind, head_dim=hd, dtype="float16", n=4096, target=family)
                preferred = [Config(*c) for c in tune.PREFERRED[family][kind][tune.d_class(hd)]]
                assert full[:len(preferred)] == preferred
                assert sorted(full, key=str) == sorted({Config(*c) for c in tune.SPACE[kind]}, key=str)
    short = configs("fwd", head_dim=64, dtype="float16", n=20, target="sm90")     # blocks of at most 32
    assert short and all(c.block_m <= 32 and c.block_n <= 32 for c in short)


def test_the_tuner_offers_what_fast_kernels_use():
    """Issue 21: 128-row forward blocks with 64- and 128-key tiles, 8 warps, 3-4 stages; the
    Triton tutorial's backward blocks (dK/dV 32 x 128, dQ 128 x 32) and 3-5 stages."""
    fwd = configs("fwd", head_dim=128, dtype="float16", n=4096, target="sm90")
    for bn in (64, 128):
        assert {s for (bm, n, w, s) in map(lambda c: tuple(c.as_dict().values()), fwd)
                if (bm, n, w) == (128, bn, 8)} >= {3, 4}, bn
    dkv = configs("dkv", head_dim=64, dtype="float16", n=4096, target="sm90")
    dq = configs("dq", head_dim=64, dtype="float16", n=4096, target="sm90")
    assert any((c.block_m, c.block_n) == (32, 128) for c in dkv)
    assert any((c.block_m, c.block_n) == (128, 32) for c in dq)
    assert {c.num_stages for c in dkv + dq if c.block_m >= 32} == {3, 5}


def test_fitting_keeps_the_configs_whose_compiled_kernel_fits():
    cands = [Config(128, 128, 8, 4), Config(128, 64, 8, 3), Config(64, 64, 4, 3)]
    need = {cands[0]: 200_000, cands[1]: 120_000, cands[2]: 60_000}
    assert tune.fitting(cands, need.get, 163 * 1024) == cands[1:]
    assert tune.fitting(cands, need.get, 99 * 1024) == cands[2:]
    with pytest.raises(attnc.ConfigError, match="64x64 w4 s3, needs 60000 B"):
        tune.fitting(cands, need.get, 50_000)


def test_tuner_on_a_gpu_tries_only_configs_that_fit(tmp_path, monkeypatch):
    """The shared memory and spills of each candidate come from its compiled kernel (faked here):
    autotuning benchmarks only the configs that fit; without autotuning the default is the first
    preferred config that fits and spills nothing, or (with a warning) the first that fits."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ATTNC_TRITON_BLOCKS", raising=False)
    monkeypatch.delenv("ATTNC_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(tune, "target_family", lambda: "sm86")
    kw = dict(dtype="float16", head_dim=128, has_mask=True, n=4096, precision="tf32")
    cands = configs("fwd", head_dim=128, dtype="float16", n=4096, target="sm86")
    big = {c for c in cands if c.block_n == 128 or c.num_stages == 4}
    shared = {c: (150_000 if c in big else 40_000) for c in cands}
    spills = {c: 0 for c in cands}
    benched = []

    def fake_bench(fn):
        fn()
        return 1.0

    def compiled_of(c):
        return shared[c], spills[c]

    monkeypatch.setattr(tune, "_bench", fake_bench)
    Tuner(_module(tmp_path)).config("_attn_fwd", benched.append, **kw, compiled_of=compiled_of,
                                    shared_limit=99 * 1024)
    assert benched == [c for c in cands if c not in big] and len(benched) < len(cands)
    monkeypatch.setenv("ATTNC_TRITON_AUTOTUNE", "0")
    fits = [c for c in cands if c not in big]
    spills[fits[0]] = 64
    got = Tuner(_module(tmp_path)).config("_attn_fwd", benched.append, **kw, compiled_of=compiled_of,
                                          shared_limit=99 * 1024)
    assert got == fits[1]
    for c in cands:
        spills[c] = 8
    with pytest.warns(RuntimeWarning, match="spills"):
        got = Tuner(_module(tmp_path)).config("_attn_fwd", benched.append, **kw, compiled_of=compiled_of,
                                              shared_limit=99 * 1024)
    assert got == fits[0]


def test_pick_default():
    a, b, c = Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(32, 32, 4, 2)
    compiled = {a: (200_000, 0), b: (90_000, 16), c: (30_000, 0)}
    assert tune.pick_default([a, b, c], compiled.get, 227 * 1024) == (a, True)
    assert tune.pick_default([a, b, c], compiled.get, 99 * 1024) == (c, True)
    assert tune.pick_default([a, b], compiled.get, 99 * 1024) == (b, False)
    with pytest.raises(attnc.ConfigError, match="no kernel config fits"):
        tune.pick_default([a, b], compiled.get, 50_000)


def test_cache_round_trip_and_merge(tmp_path):
    path = tmp_path / "tune" / "k.json"
    a, b = TuneCache(path), TuneCache(path)       # two processes on one file
    assert a.get("x") is None and not path.exists()
    a.put("x", Config(64, 32, 4, 2))
    b.put("y", Config(128, 64, 8, 3))              # b had not seen x: the write merges
    data = json.loads(path.read_text())
    assert data["configs"] == {"x": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                               "y": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}}
    c = TuneCache(path)
    assert c.get("x") == Config(64, 32, 4, 2) and c.get("y") == Config(128, 64, 8, 3)
    assert a.get("y") == Config(128, 64, 8, 3)    # a miss in memory re-reads the file


def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{not json")
    cache = TuneCache(path)
    with pytest.warns(RuntimeWarning, match="unreadable tuning cache"):
        assert cache.get("x") is None
    cache.put("x", Config(32, 32, 4, 1))
    assert TuneCache(path).get("x") == Config(32, 32, 4, 1)


def test_choose_benchmarks_once_per_key(tmp_path):
    path = tmp_path / "k.json"
    cands = [Config(128, 64, 4, 3), Config(64, 64, 4, 3), Config(32, 32, 4, 1)]
    times = {cands[0]: 2.0, cands[1]: 1.0, cands[2]: 3.0}
    calls = []

    def bench(c):
        calls.append(c)
        if c == cands[2]:
            raise RuntimeError("out of resources")    # a config that does not fit is skipped
        return times[c]

    assert choose(TuneCache(path), "k1", cands, bench) == cands[1]
    assert calls == cands
    calls.clear()

    def no_bench(c):
        raise AssertionError("benchmarked again")

    assert choose(TuneCache(path), "k1", cands, no_bench) == cands[1]    # another process: disk
    assert choose(TuneCache(path), "k2", cands[:1], no_bench) == cands[0]   # one candidate: no bench
    with pytest.raises(RuntimeError, match="out of resources"):
        choose(TuneCache(path), "k3", cands[2:] * 2, bench)


def _module(tmp_path):
    src = tmp_path / "triton-4_abc_float16_d64.py"
    src.write_text("# a generated kernel module\n")
    return src


def test_tuner_under_the_interpreter_and_forced_blocks(tmp_path, monkeypatch):
    tuner = Tuner(_module(tmp_path))
    assert tuner.cache.path.parent == tmp_path / "tune" and tuner.tag.startswith("triton-4_")
    kw = dict(dtype="float16", head_dim=64, has_mask=False, n=100, precision="tf32")

    def run(c):
        raise AssertionError("no benchmark under the interpreter")

    monkeypatch.delenv("ATTNC_TRITON_BLOCKS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuner.config("_attn_fwd", run, **kw) == Config(16, 16, 1, 1)
    monkeypatch.setenv("ATTNC_TRITON_BLOCKS", "32,16")
    assert tuner.config("_attn_fwd", run, **kw) == Config(32, 16, 4, 1)
    for bad in ("32", "24,16", "8,8", "a,b"):
        monkeypatch.setenv("ATTNC_TRITON_BLOCKS", bad)
        with pytest.raises(attnc.ConfigError, match="ATTNC_TRITON_BLOCKS"):
            tuner.config("_attn_fwd", run, **kw)
    assert not tuner.cache.path.exists()


def test_tuner_on_a_gpu_tunes_once_and_caches_on_disk(tmp_path, monkeypatch):
    """The GPU path with a fake benchmark: the fastest config is chosen, written next to the
    source, and a new process (a new Tuner) reuses it without benchmarking."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ATTNC_TRITON_BLOCKS", raising=False)
    monkeypatch.delenv("ATTNC_TRITON_AUTOTUNE", raising=False)
    src = _module(tmp_path)
    benched = []

    def fake_bench(fn):
        fn()
        return 1.0 if benched[-1] == Config(64, 64, 4, 3) else 5.0

    monkeypatch.setattr(tune, "_bench", fake_bench)
    kw = dict(dtype="float16", head_dim=64, has_mask=True, n=1000, precision="tf32")
    tuner = Tuner(src)
    assert tuner.config("_attn_fwd", benched.append, **kw) == Config(64, 64, 4, 3)
    assert benched == configs("fwd", head_dim=64, dtype="float16", n=1000)
    saved = json.loads(tuner.cache.path.read_text())["configs"]
    assert list(saved) == ["_attn_fwd|fwd|float16|d64|mask|n1024|tf32"]
    benched.clear()
    again = Tuner(src)
    assert again.config("_attn_fwd", benched.append, **{**kw, "n": 1024}) == Config(64, 64, 4, 3)
    assert benched == []
    # a changed kernel source is another cache file
    src.write_text("# another kernel\n")
    assert Tuner(src).cache.path != tuner.cache.path
    # ATTNC_TRITON_AUTOTUNE=0: the default config, nothing benchmarked
    monkeypatch.setenv("ATTNC_TRITON_AUTOTUNE", "0")
    assert Tuner(src).config("_attn_bwd_dkv", benched.append, **kw) == configs(
        "dkv", head_dim=64, dtype="float16", n=1000)[0]
    assert benched == []


def test_cache_files_are_per_device(monkeypatch):
    """Configs tuned on one GPU model may not launch on another: the cache file names the device
    ("cpu" under the interpreter, the model and compute capability on a GPU)."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tune.device_tag() == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert tune.device_tag() == "nvidia-h100-80gb-hbm3-sm90"
    assert tune.target_family() == "sm90"


@pytest.mark.parametrize("cap,family", [((8, 0), "sm80"), ((8, 6), "sm86"), ((8, 9), "sm86"), ((9, 0), "sm90"),
                                        ((7, 5), "sm86")])
def test_family(cap, family):
    assert tune.family(cap) == family
