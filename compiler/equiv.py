"""Numeric evaluation of IR graphs in float64: fingerprints and equivalence checks.

The rules catch most equivalences; `equivalent` falls back to evaluating both formulas on
the same fixed random inputs (several sizes, with and without key padding) and reports
"numerically equivalent" when they agree everywhere.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import networkx as nx

from . import cache as _cache
from .codegen_torch import generate
from .ir import INPUT_NAMES

# (batch, heads, n, d, pad) draws: n != d so shape mix-ups show, one draw with padding
DRAWS = ((2, 2, 7, 5, False), (1, 2, 6, 9, True), (2, 1, 11, 4, True))
FINGERPRINT_DRAW = (1, 1, 6, 4, False)


def graph_function(g: nx.DiGraph, cache_dir=None):
    """A torch function (q, k, v, p, key_padding_mask) for any IR graph."""
    source = generate(g, formula=g.graph.get("source") or "", canonical="(unsimplified)", digest="-")
    return _load(source, str(cache_dir) if cache_dir is not None else None)


@lru_cache(maxsize=512)
def _load(source: str, cache_dir: str | None):
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = _cache.resolve(cache_dir) / "graphs" / f"g_{digest}.py"
    _cache.ensure_source(path, source)
    return _cache.load_module(path, f"attnc_gen.graph_{digest}").forward


def random_inputs(batch: int, heads: int, n: int, d: int, pad: bool, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = {name: torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64)
         for name in INPUT_NAMES}
    mask = None
    if pad:
        mask = torch.ones(batch, n, dtype=torch.bool)
        mask[-1, n - n // 3:] = False
    return t, mask


def evaluate(g: nx.DiGraph, draw=FINGERPRINT_DRAW, seed: int = 0):
    t, mask = random_inputs(*draw, seed=seed)
    fn = graph_function(g)
    return fn(t["Q"], t["K"], t["V"], t["P"], mask), mask


def fingerprint(g: nx.DiGraph) -> str:
    """Hash of the output on fixed float64 inputs, rounded to 6 significant digits."""
    out, _ = evaluate(g)
    vals = out.flatten().tolist()
    text = ",".join("nan" if v != v else f"{v:.6g}" for v in vals)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Equivalence:
    equal: bool
    how: str          # "rules" (same canonical form), "numerically", or "" when not equal
    max_diff: float   # largest |a - b| over the draws (0 for rules)


def numeric_diff(a: nx.DiGraph, b: nx.DiGraph, rtol: float = 1e-7, atol: float = 1e-9) -> tuple[bool, float]:
    import torch

    worst, same = 0.0, True
    for k, draw in enumerate(DRAWS):
        x, mask = evaluate(a, draw, seed=k)
        y, _ = evaluate(b, draw, seed=k)
        if mask is not None:   # rows of padded queries may hold anything
            rows = mask[:, None, :, None].expand_as(x)
            x, y = x[rows], y[rows]
        both_nan = torch.isnan(x) & torch.isnan(y)
        diff = (x - y).abs().masked_fill(both_nan, 0.0)
        if torch.isnan(diff).any():
            return False, float("nan")
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        same &= bool(torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))
    return same, worst


def equivalent(a, b) -> Equivalence:
    """a, b: Analysis objects."""
    if a.hash == b.hash:
        return Equivalence(True, "rules", 0.0)
    same, worst = numeric_diff(a.simplified, b.simplified)
    return Equivalence(same, "numerically" if same else "", worst)
