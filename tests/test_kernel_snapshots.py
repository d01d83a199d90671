"""Snapshots of generated source: the fused Triton module and the PyTorch backend's function
for five formulas, stored in tests/snapshots/. Any change to code generation shows as a diff
here; when the change is intended, rewrite the snapshots and review them in the commit:

    ATTNC_UPDATE_SNAPSHOTS=1 python3 -m pytest tests/test_kernel_snapshots.py
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
from attnc.kernels import triton_source

import attnc

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("ATTNC_UPDATE_SNAPSHOTS") == "1"
FORMULAS = {
    "standard": "softmax(Q @ K^T / sqrt(d)) @ V",
    "autobert_l2": "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "cosine_softsign": "softsign(cos(Q, K)) @ V",
    "causal_alibi": "softmax(mask(Q @ K^T / sqrt(d) - 0.5 * abs(i - j), j <= i)) @ V",
    "length_bias": "softmax(Q @ K^T / sqrt(n) - abs(i - j) / n) @ V",   # n: each sequence's length
}


def _source(name: str, backend: str) -> str:
    formula = FORMULAS[name]
    if backend == "triton":
        return triton_source(attnc.analyze(formula), dtype="float16", head_dim=64)
    return attnc.compile(formula, backend="torch").source


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_generated_source_snapshot(name, backend):
    text = _source(name, backend)
    compile(text, f"<{name}.{backend}>", "exec")     # valid Python either way
    path = SNAPSHOTS / f"{name}.{backend}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no snapshot {path.name}: run with ATTNC_UPDATE_SNAPSHOTS=1 to create it"
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            f"snapshots/{path.name}", "generated", n=2))
        lines = diff.splitlines()
        shown = "\n".join(lines[:80]) + (f"\n... ({len(lines) - 80} more diff lines)" if len(lines) > 80 else "")
        pytest.fail(f"the generated {backend} source of {name!r} changed:\n{shown}\n"
                    "if intended: ATTNC_UPDATE_SNAPSHOTS=1 python3 -m pytest tests/test_kernel_snapshots.py",
                    pytrace=False)


def test_every_snapshot_file_is_checked():
    """No stale snapshot files (a renamed formula leaves its old file behind)."""
    expected = {f"{n}.{b}.txt" for n in FORMULAS for b in ("triton", "torch")}
    assert {p.name for p in SNAPSHOTS.glob("*.txt")} == expected


_SOURCE_IN_SUBPROCESS = """
import hashlib, attnc
from attnc.kernels import triton_source
for f in ("dist(K, Q) @ P", "-dist(log(-V), V) @ Q", "softmax(cos(Q, K) - dist(Q, K)) @ V"):
    text = triton_source(attnc.analyze(f), dtype="float16", head_dim=16)
    print(hashlib.sha256(text.encode()).hexdigest())
"""


def test_generated_source_is_the_same_in_every_process():
    """Triton caches compiled kernels by source: a source that depended on Python's per-process
    string hashing (set order) would recompile in every new process. Two gradients accumulated
    in one loop (dist's |k|^2 and k . q) were once emitted in set order."""
    import subprocess
    import sys
    digests = set()
    for seed in ("0", "1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _SOURCE_IN_SUBPROCESS], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        digests.add(out)
    assert len(digests) == 1, f"{len(digests)} different sources for 4 hash seeds"
