"""Mask structure read from the formula (kernels/structure.py) and the block loops it bounds.

Causal and banded masks make the fused kernels skip key blocks that the mask hides wholly
(forward and backward). Checked here: the band found for each formula, the block ranges by hand
and against brute force, the FLOPs `attnc bench` reports, and, through the Triton kernels,
that results still equal the torch backend at n not a multiple of the blocks (also with
BLOCK_M != BLOCK_N) and that skipped blocks are really never read.
"""
from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch
from attnc.kernels import classify
from attnc.kernels.bench import bench_flops
from attnc.kernels.structure import (Band, computed_entries, key_block_range, mask_band,
                                     query_block_range, weight_interval, weights_fit_fp16)
from kernel_catalogue import BY_NAME, check_formula

import attnc

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

pytestmark = pytest.mark.usefixtures("kernel_env")


def band_of(formula: str):
    g = attnc.analyze(formula).simplified
    return mask_band(g, classify(g).plan)


# ---- the band of a formula ---------------------------------------------------------------------

@pytest.mark.parametrize("formula,band", [
    ("softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V", Band(None, 0)),
    ("softmax(mask(Q @ K^T, i >= j)) @ V", Band(None, 0)),
    ("softmax(mask(Q @ K^T, j < i)) @ V", Band(None, -1)),
    ("softmax(mask(Q @ K^T, j >= i)) @ V", Band(0, None)),
    ("softmax(mask(Q @ K^T, i - j <= 2)) @ V", Band(-2, None)),
    ("softmax(mask(Q @ K^T, abs(i - j) <= 3)) @ V", Band(-3, 3)),
    ("softmax(mask(Q @ K^T, abs(j - i) < 2.5)) @ V", Band(-2, 2)),
    ("softmax(mask(Q @ K^T, abs(i - j) <= 3 & j <= i)) @ V", Band(-3, 0)),
    ("softmax(mask(Q @ K^T, !(j > i))) @ V", Band(None, 0)),
    ("softmax(where(j <= i, Q @ K^T, -inf) / sqrt(d)) @ V", Band(None, 0)),   # -inf / sqrt(d)
    ("softmax(mask(Q @ K^T, j <= i) - 0.5 * abs(i - j)) @ V", Band(None, 0)),  # -inf + finite bias
    ("sigmoid(mask(Q @ K^T, j <= i)) @ V", Band(None, 0)),                      # sigmoid(-inf) = 0
    ("where(j <= i, Q @ K^T, 0) @ V / n", Band(None, 0)),
    ("relu(mask(Q @ K^T, abs(i - j) <= 1)) ^ 2 @ V", Band(-1, 1)),
    # no band: nothing to skip
    ("softmax(Q @ K^T / sqrt(d)) @ V", None),
    ("softmax(Q @ K^T - 0.5 * abs(i - j)) @ V", None),                  # ALiBi without a mask
    ("softmax(mask(Q @ K^T, abs(i - j) <= n / 4)) @ V", None),          # window grows with n
    ("softmax(mask(Q @ K^T, j <= i | j >= i + 100)) @ V", None),        # two disjoint regions
    ("softmax(mask(Q @ K^T, j <= i) * (-1)) @ V", None),                # +inf outside: not empty
    ("where(j <= i, Q @ K^T, 1) @ V", None),                            # weight 1 outside
    ("sigmoid(where(j <= i, Q @ K^T, 0)) @ V", None),                   # sigmoid(0) = 1/2 outside
    ("softmax(mask(Q @ K^T, j != i)) @ V", None),
])
def test_mask_band(formula, band):
    assert band_of(formula) == band


@pytest.mark.parametrize("formula,interval", [
    ("softmax(Q @ K^T) @ V", (0.0, 1.0)),
    ("sigmoid(Q @ K^T) @ V", (0.0, 1.0)),
    ("tanh(Q @ K^T) @ V", (-1.0, 1.0)),
    ("softsign(Q @ K^T) @ V", (-1.0, 1.0)),
    ("sigmoid(2 - dist(Q, K)) @ V / n", (0.0, 1 / (1 + math.exp(-2)))),
    ("(3 * sigmoid(Q @ K^T) - 1) @ V", (-1.0, 2.0)),
    ("relu(Q @ K^T) @ V", (0.0, math.inf)),
    ("relu(Q @ K^T) ^ 2 @ V / n ^ 2", (-math.inf, math.inf)),
    ("exp(cos(Q, K)) @ V", (math.exp(-1), math.e)),
])
def test_weight_interval(formula, interval):
    g = attnc.analyze(formula).simplified
    plan = classify(g).plan
    lo, hi = weight_interval(g, plan)
    assert lo == pytest.approx(interval[0]) and hi == pytest.approx(interval[1])
    assert weights_fit_fp16(g, plan) == (max(abs(lo), abs(hi)) <= 2 ** 15)


# ---- block ranges ------------------------------------------------------------------------------

def test_block_ranges_by_hand():
    causal, window = Band(None, 0), Band(-3, 3)
    # query block [16, 32) under a causal mask: keys [0, 32); the last block [32, 48) is skipped
    assert key_block_range(causal, 16, 16, 16, 100) == (0, 32)
    assert key_block_range(causal, 32, 16, 16, 40) == (0, 40)          # clipped at n
    assert key_block_range(causal, 0, 32, 16, 100) == (0, 32)          # BLOCK_M != BLOCK_N
    # a window of 3 around [32, 48): keys 29..50, from the block starting at 16
    assert key_block_range(window, 32, 16, 16, 100) == (16, 51)
    assert key_block_range(window, 0, 16, 16, 100) == (0, 19)
    assert key_block_range(None, 32, 16, 16, 100) == (0, 100)
    # key block [32, 48): queries with i >= j under causal; the window reaches 29..50
    assert query_block_range(causal, 32, 16, 16, 100) == (32, 100)
    assert query_block_range(causal, 32, 16, 32, 100) == (32, 100)
    assert query_block_range(causal, 48, 16, 32, 100) == (32, 100)     # floor to a BLOCK_M start
    assert query_block_range(window, 32, 16, 16, 100) == (16, 51)
    assert query_block_range(Band(1, None), 32, 16, 16, 100) == (0, 47)   # i <= j - 1
    # the last query row 64 of n = 65 reaches keys 54..62 only: the key block [64, 65) is not
    # visited; from the key block [64, 65) no query 66..74 exists: an empty loop
    assert key_block_range(Band(-10, -2), 64, 32, 32, 65) == (32, 63)
    assert query_block_range(Band(-10, -2), 64, 32, 32, 65)[1] == 0
    # causal at n = 1024 with 128 x 64 blocks: blocks on and below the diagonal, 36 of 64 rows
    assert computed_entries(causal, 1024, 128, 64) == 128 * 128 * sum(range(1, 9))
    assert computed_entries(None, 37, 16, 16) == 37 * 37


@pytest.mark.parametrize("seed", range(4))
def test_block_ranges_cover_the_band_and_skip_only_empty_blocks(seed):
    """Brute force: every (i, j) in the band lies in a visited block, and every visited block
    holds at least one pair of the band (a block the mask hides wholly is never visited)."""
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.randint(1, 70)
        bm, bn = rng.choice([16, 32]), rng.choice([16, 32])
        lo = rng.choice([None, rng.randint(-20, 5)])
        hi = rng.choice([None, rng.randint(-5, 20)])
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        band = None if lo is None and hi is None else Band(lo, hi)
        inside = {(i, j) for i in range(n) for j in range(n) if band is None or band.contains(j - i)}
        # forward: key blocks per query block; backward: query blocks per key block
        assert inside <= _visited(key_block_range, band, inside, n, bm, bn, queries_outer=True)
        assert inside <= _visited(query_block_range, band, inside, n, bn, bm, queries_outer=False)


def _visited(block_range, band, inside, n, outer, inner, queries_outer):
    """The (i, j) pairs of the blocks `block_range` visits, each checked to hold a pair of the band."""
    seen = set()
    for s_out in range(0, n, outer):
        a, b = block_range(band, s_out, outer, inner, n)
        assert a % inner == 0
        for s_in in range(a, b, inner):
            (sm, bm), (sn, bn) = ((s_out, outer), (s_in, inner)) if queries_outer else ((s_in, inner), (s_out, outer))
            block = {(i, j) for i in range(sm, min(sm + bm, n)) for j in range(sn, min(sn + bn, n))}
            assert block & inside, (band, n, bm, bn, sm, sn)
            seen |= block
    return seen


def test_bench_flops_count_computed_blocks():
    kw = dict(batch=2, heads=3, seq=1024, dim=64, backward=False)
    dense = 4.0 * 2 * 3 * 1024 * 1024 * 64
    std = bench_flops("softmax(Q @ K^T / sqrt(d)) @ V", **kw)
    assert std["flops"] == dense and std["computed_fraction"] == 1.0 and std["band"] is None
    causal = bench_flops("softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V", **kw)
    bm, bn = causal["blocks"]
    assert (bm, bn) == (128, 64)
    assert causal["flops"] == dense * 36 / 64 and causal["dense_flops"] == dense
    window = bench_flops("softmax(mask(Q @ K^T, abs(i - j) <= 8)) @ V", **{**kw, "backward": True})
    # each 128-row block visits its own two key blocks of 64 plus one neighbour on each side
    keys = [min(s + 128 + 64, 1024) - max(s - 64, 0) for s in range(0, 1024, 128)]
    assert keys[:2] == [192, 256]
    entries = sum(128 * k for k in keys)
    assert window["flops"] == 3.5 * dense * entries / 1024 ** 2


# ---- through the kernels -------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("blocks", ["32,16", "16,32"])
@pytest.mark.parametrize("name", ["causal", "causal_strict", "sliding_window"])
def test_banded_formulas_match_torch_with_unequal_blocks(name, blocks, monkeypatch):
    """Skipping blocks changes no output or gradient with BLOCK_M != BLOCK_N at n = 37 (no
    multiple of either); the catalogue checks every banded formula with 16 x 16 blocks."""
    monkeypatch.setenv("ATTNC_TRITON_BLOCKS", blocks)
    case = BY_NAME[name]
    check_formula(case.formula, n=37, d=16, mask=case.mask)


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")   # the NaN rows, deliberately
def test_skipped_blocks_are_never_read():
    """NaN in rows that only masked-out pairs touch reaches nothing, which holds only if those
    blocks are never loaded (0 * NaN is NaN): causal mask, 16 x 16 blocks, n = 48."""
    fn = attnc.compile("softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V", backend="triton")
    ref = attnc.compile("softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V", backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    nan = float("nan")
    # forward: query rows < 32 never visit the key block [32, 48)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 32:] = nan
    v2[:, :, 32:] = nan
    out = fn(q=q, k=k2, v=v2)
    torch.testing.assert_close(out[:, :, :32], ref(q=q, k=k, v=v)[:, :, :32])
    assert out[:, :, 32:].isnan().all()
    # backward: key blocks >= 16 never visit the query block [0, 16) (dK, dV), and query rows
    # < 32 never visit the key block [32, 48) (dQ)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        qs[:, :, :16] = nan
    out = fn(q=qs, k=ks, v=vs)
    dq, dk, dv = torch.autograd.grad(out, [qs, ks, vs], torch.ones_like(out))
    assert dk[:, :, 16:].isfinite().all() and dv[:, :, 16:].isfinite().all()
    assert dk[:, :, :16].isnan().any()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = ref(q=qr, k=kr, v=vr)
    want = torch.autograd.grad(out, [qr, kr, vr], torch.ones_like(out))
    torch.testing.assert_close(dk[:, :, 16:], want[1][:, :, 16:], atol=1e-5, rtol=1e-4)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        ks[:, :, 32:] = nan
        vs[:, :, 32:] = nan
    out = fn(q=qs, k=ks, v=vs)
    dq, = torch.autograd.grad(out[:, :, :32], [qs], torch.ones_like(out[:, :, :32]))
    torch.testing.assert_close(dq[:, :, :32], want[0][:, :, :32], atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("name,mask", [("standard", None), ("autobert_l2", None), ("causal", None),
                                       ("epilogue_gate", "pad"), ("relu_sq", None)])
def test_even_blocks_without_bounds_masks(name, mask, monkeypatch):
    """n a multiple of both blocks and head dim = BLOCK_D: the bounds masks are compile-time
    constants (EVEN_M, EVEN_N); results equal the torch backend, with and without padding."""
    monkeypatch.setenv("ATTNC_TRITON_BLOCKS", "32,16")
    check_formula(BY_NAME[name].formula, n=32, d=16, mask=mask)


def test_generated_loops_are_bounded_by_the_band():
    from attnc.kernels import triton_source

    causal = triton_source(attnc.analyze("softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V"))
    assert "hi_n = tl.minimum(start_m + BLOCK_M, n_ctx)" in causal
    assert "for start_n in range(lo_n, hi_n, BLOCK_N):" in causal
    assert "lo_m = start_n\n" in causal
    assert "for start_m in range(lo_m, hi_m, BLOCK_M):" in causal
    window = triton_source(attnc.analyze("softmax(mask(Q @ K^T, abs(i - j) <= 3)) @ V"))
    assert "lo_n = tl.maximum(start_m - 3, 0)" in window
    assert "hi_m = tl.minimum(start_n + BLOCK_N + 3, n_ctx)" in window
    assert "hi_n = tl.minimum(start_m + BLOCK_M, n_ctx) - 1" in triton_source(
        attnc.analyze("softmax(mask(Q @ K^T, j < i)) @ V"))
    plain = triton_source(attnc.analyze("softmax(Q @ K^T / sqrt(d)) @ V"))
    assert "for start_n in range(0, n_ctx, BLOCK_N):" in plain and "lo_n" not in plain


def test_explain_says_what_is_skipped_and_why_not():
    from attnc.kernels import explain

    def line(formula):
        return next(x for x in explain(attnc.analyze(formula)).splitlines() if x.startswith("key blocks"))

    assert line("softmax(mask(Q @ K^T, j <= i)) @ V") == (
        "key blocks: only those meeting j - i <= 0 (causal mask); the rest are skipped")
    assert "-3 <= j - i <= 3 (banded mask)" in line("softmax(mask(Q @ K^T, abs(i - j) <= 3)) @ V")
    assert line("softmax(Q @ K^T) @ V") == "key blocks: all (no causal or banded mask in the formula)"
    why = line("softmax(mask(Q @ K^T, abs(i - j) <= n / 4)) @ V")
    assert why.startswith("key blocks: all: the mask (abs((i - j)) <= (n / 4)) is not a band")
