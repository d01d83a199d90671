"""Named streaming formulas for the Triton kernel tests, and helpers to check them.

Discipline (as in flex_attention's tests): a float64 golden from the torch backend, an eager
result from the torch backend in the test dtype, and the Triton result in the test dtype. The
Triton error against the golden must stay within a small multiple of the eager error plus a
tiny absolute tolerance, for the output and for every input gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import attnc


@dataclass(frozen=True)
class Case:
    name: str
    formula: str
    n: int = 20
    d: int = 16
    mask: str | None = "pad"     # None | "pad" (tail of batch 1) | "head" (first 3 of batch 1) | "full"


CATALOGUE: tuple[Case, ...] = (
    Case("standard", "softmax(Q @ K^T / sqrt(d)) @ V"),
    Case("standard_scale", "softmax(scale(Q @ K^T)) @ V"),
    Case("standard_simplified", "softmax(Q @ K^T * (1 / sqrt(d))) @ V", mask=None),
    Case("standard_scalar_out", "0.5 * (softmax(Q @ K^T) @ V)"),
    Case("autobert_l2", "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)"),
    Case("autobert_l2_simplified", "softmax(Q @ softplus(K)^T / sqrt(d)) @ (K + Q)"),
    Case("autobert_l12", "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V"),
    Case("autobert_l12_simplified", "softmax(Q @ (K^T / sqrt(d) + V^T) / sqrt(d)) @ V"),
    Case("cosine", "softmax(cos(Q, K) * 4) @ V"),
    Case("cosine_softsign", "softsign(cos(Q, K)) @ V"),
    Case("cosine_by_norms", "softmax((Q / norm(Q)) @ (K / norm(K))^T * 4) @ V"),
    Case("euclidean", "softmax(-dist(Q, K)) @ V"),
    Case("sq_euclidean", "softmax(-dist(Q, K) ^ 2 / d) @ V"),
    Case("softsign", "softsign(Q @ K^T / sqrt(d)) @ V"),
    Case("sigmoid", "sigmoid(Q @ K^T / sqrt(d)) @ V"),
    Case("logsigmoid", "logsigmoid(Q @ K^T / sqrt(d)) @ V / n"),
    Case("no_normalisation_causal", "where(j <= i, Q @ K^T, 0) @ V / n"),
    Case("relu", "relu(Q @ K^T) @ V / n"),
    Case("tanh", "tanh(Q @ K^T) @ V"),
    Case("kv_shared", "softmax(Q @ K^T / sqrt(d)) @ K"),
    Case("qk_shared", "softmax(Q @ Q^T / sqrt(d)) @ V"),
    Case("p_two_scores", "softmax(Q @ K^T / sqrt(d) + P @ K^T / d) @ (V + P)"),
    Case("p_value", "softmax(Q @ P^T) @ P"),
    Case("dist_p_values", "softmax(-dist(Q, K)) @ (V + P)"),
    Case("alibi", "softmax(Q @ K^T / sqrt(d) - 0.5 * abs(i - j)) @ V"),
    Case("causal", "softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V"),
    Case("causal_where", "softmax(where(j <= i, Q @ K^T, -inf) / sqrt(d)) @ V"),
    Case("causal_sigmoid", "sigmoid(mask(Q @ K^T, j <= i)) @ V"),
    Case("sliding_window", "softmax(mask(Q @ K^T, abs(i - j) <= 3)) @ V"),
    Case("epilogue_gate", "(softmax(Q @ K^T / sqrt(d)) @ V) * sigmoid(Q)"),
    Case("epilogue_residual", "softmax(Q @ K^T / sqrt(d)) @ V + Q"),
    Case("query_norm_feature", "softmax(Q @ K^T / (norm(Q) + 1)) @ V"),
    Case("key_norm_feature", "softmax(Q @ K^T + norm(K)^T) @ V"),
    Case("exp_values", "softmax(Q @ K^T / sqrt(d)) @ exp(V / 4)"),
    Case("softmax_values", "softmax(Q @ K^T) @ softmax(V)"),
    Case("outer_norms", "softmax(norm(Q) @ norm(K)^T) @ V"),
    Case("max_min", "softmax(max(Q @ K^T, P @ K^T) + min(i - j, j - i)) @ V"),
    Case("pow_score", "((Q @ K^T / d) ^ 2) @ V / n"),
    Case("dist_sigmoid", "sigmoid(2 - dist(Q, K)) @ V / n"),
    Case("dist_tanh", "softmax(-dist(2 * tanh(Q), 2 * tanh(K))) @ V"),   # dist of computed features
    Case("relu_sq", "relu(Q @ K^T) ^ 2 @ V / n ^ 2"),                   # unbounded weights
    Case("causal_alibi", "softmax(mask(Q @ K^T / sqrt(d) - 0.5 * abs(i - j), j <= i)) @ V", n=37),
    Case("causal_strict", "softmax(mask(Q @ K^T, j < i)) @ V", n=37),   # row 0 sees no key
    Case("causal_bias_after_mask", "softmax(mask(Q @ K^T, i >= j) - 0.5 * abs(i - j)) @ V", n=37),
    Case("banded_sigmoid", "sigmoid(mask(Q @ K^T / sqrt(d), abs(i - j) <= 2)) @ V", n=37),
    Case("odd_n", "softmax(Q @ K^T / sqrt(d)) @ V", n=37),
    Case("head_dim_48", "softmax(Q @ K^T / sqrt(d)) @ V", d=48),
    Case("head_dim_64", "softmax(Q @ softplus(K)^T / sqrt(d)) @ (K + Q)", n=18, d=64),
    Case("head_dim_20_cos", "softmax(cos(Q, K) * 3) @ V", n=9, d=20),
    Case("fully_padded_rows", "softmax(Q @ K^T / sqrt(d)) @ V", mask="full"),
    Case("causal_head_padding", "softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V", mask="head"),
)

BY_NAME = {c.name: c for c in CATALOGUE}


def make_mask(kind: str | None, batch: int, n: int) -> torch.Tensor | None:
    if kind is None:
        return None
    mask = torch.ones(batch, n, dtype=torch.bool, device="cpu")
    if kind == "pad":
        mask[-1, n - max(n // 4, 1):] = False
    elif kind == "head":
        mask[-1, :3] = False          # with a causal mask, rows 0-2 of batch 1 see no key
    elif kind == "full":
        mask[-1, :] = False           # every row of batch 1 is fully padded
    else:  # pragma: no cover
        raise ValueError(kind)
    return mask


TOL = {torch.float32: (10.0, 2e-5), torch.float16: (5.0, 2e-3), torch.bfloat16: (5.0, 1e-2)}


def _check(name: str, tri: torch.Tensor, eager: torch.Tensor, gold: torch.Tensor, dtype) -> None:
    mult, atol = TOL[dtype]
    scale = max(1.0, gold.abs().max().item())
    assert torch.isfinite(tri).all(), f"{name}: non-finite values"
    err_tri = (tri.double() - gold).abs().max().item()
    err_eager = (eager.double() - gold).abs().max().item()
    bound = mult * err_eager + atol * scale
    assert err_tri <= bound, (f"{name}: triton error {err_tri:.3g} > {bound:.3g} "
                              f"(eager error {err_eager:.3g}, scale {scale:.3g})")


def check_formula(formula: str, *, n: int = 20, d: int = 16, dtype=torch.float32,
                  mask: str | None = "pad", batch: int = 2, heads: int = 1, grad: bool = True,
                  cache_dir=None, seed: int = 0, device=None,
                  poison: bool = False) -> attnc.CompiledAttention:
    """Run `formula` on the triton and torch backends and compare (forward and gradients).

    Inputs are drawn on the CPU (same numbers on every machine), then moved to `device`: CUDA
    where there is one (the kernels compile for the GPU), else the CPU (Triton interpreter).
    poison=True: the Triton run gets inf / NaN in the padded rows of every input the kernels read
    only at key rows; padded keys contribute nothing, so it must still match the clean references.
    poison="all": inf / NaN in the padded rows of every input, also those read at query rows; the
    output rows of real tokens must match (forward only: a padded query row's own output, and the
    gradients it sends to every key, are NaN in every backend)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    ref = attnc.compile(formula, backend="torch", cache_dir=cache_dir)
    tri = attnc.compile(formula, backend="triton", cache_dir=cache_dir)
    names = tri.inputs
    base = {x: torch.randn(batch, heads, n, d, generator=gen, device="cpu").to(device, dtype)
            for x in names}
    m = make_mask(mask, batch, n)
    m = m.to(device) if m is not None else None

    bad = {}
    if poison:
        from attnc.kernels.codegen import plan_sides
        q_side, k_side = plan_sides(tri.runner.analysis.simplified, tri.runner.plan)
        pad = (~m)[:, None, :, None]
        fill = torch.tensor([float("inf"), float("nan"), -float("inf")], device=device)
        fill = fill[torch.arange(n, device=device) % 3][None, None, :, None].to(dtype)
        poisoned = names if poison == "all" else [x for x in k_side if x not in q_side]
        bad = {x: torch.where(pad, fill, base[x]) for x in poisoned}
        assert bad, f"{formula}: no input read only at key rows to poison"

    def run(fn, dt, src=base):
        ts = {x: src[x].to(dt).requires_grad_(grad) for x in names}
        out = fn(**{x.lower(): t for x, t in ts.items()}, key_padding_mask=m)
        return out, ts

    gold, gold_in = run(ref, torch.float64)
    eager, eager_in = run(ref, dtype)
    out, tri_in = run(tri, dtype, {**base, **bad})
    assert out.dtype == dtype and out.shape == (batch, heads, n, d)
    if poison == "all":
        real = m[:, None, :, None].expand_as(gold)
        _check(f"{formula} [out, real rows]", out[real], eager[real], gold[real], dtype)
        return tri
    _check(f"{formula} [out]", out, eager, gold, dtype)
    if not grad:
        return tri
    g = torch.randn(batch, heads, n, d, generator=gen, device="cpu").to(device, dtype)
    gg = torch.autograd.grad(gold, list(gold_in.values()), g.double())
    ge = torch.autograd.grad(eager, list(eager_in.values()), g)
    gt = torch.autograd.grad(out, list(tri_in.values()), g)
    for x, a, b, c in zip(names, gt, ge, gg):
        assert a.dtype == dtype
        _check(f"{formula} [d{x}]", a, b, c, dtype)
    return tri
