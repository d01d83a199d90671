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


def test_configs_are_pruned():
    full = configs("fwd", head_dim=64, dtype="float16", n=4096)
    assert full[0] == Config(128, 64, 4, 3) and len(full) == len(tune.SPACE["fwd"])
    short = configs("fwd", head_dim=64, dtype="float16", n=20)     # blocks of at most 32
    assert short and all(c.block_m <= 32 and c.block_n <= 32 for c in short)
    # shared memory: (BLOCK_M + 2 BLOCK_N) * BLOCK_D * bytes * (stages - 1) within the budget
    for kind in ("fwd", "bwd", "pre"):
        for hd, dt in ((256, "float32"), (128, "float16"), (64, "bfloat16")):
            cs = configs(kind, head_dim=hd, dtype=dt, n=8192)
            size = 4 if dt == "float32" else 2
            assert cs and all((c.block_m + 2 * c.block_n) * tune.block_d(hd) * size
                              * max(1, c.num_stages - 1) <= tune.SMEM_BUDGET for c in cs)
    big = configs("fwd", head_dim=256, dtype="float32", n=8192)
    assert len(big) < len(full) and Config(128, 128, 8, 3) not in big


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
        "bwd", head_dim=64, dtype="float16", n=1000)[0]
    assert benched == []


def test_cache_files_are_per_device():
    """Configs tuned on one GPU model may not launch on another: the cache file names the device
    ("cpu" under the interpreter)."""
    assert tune.device_tag() == "cpu"
