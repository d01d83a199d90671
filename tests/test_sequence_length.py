"""`n` in a formula is each sequence's own length: its real tokens, not the padded length of the
batch. A batch of sequences of different lengths, right-padded and run with a key padding mask,
must give every real row and every input gradient that each sequence gives when it runs alone,
unpadded, on every backend: the torch path (float64), and the fused Triton kernels (fp32; the CPU
interpreter without a GPU) with their PyTorch fallback for formulas that do not stream."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import attnc

LENGTHS = (11, 7, 4)          # one batch: right-padded to 11
D = 16

FORMULAS = {
    "sqrt_n": "softmax(Q @ K^T / sqrt(n)) @ V",
    "scale_nn": "softmax(scale(Q @ K^T)) @ V",                       # scale of an n x n: / sqrt(n)
    "linear_over_n": "(Q @ K^T / n) @ V",                              # not streaming: fallback
    "bias_over_n": "softmax(Q @ K^T / sqrt(d) - abs(i - j) / n) @ V",  # n inside an i/j expression
    "window_of_n": "sigmoid(mask(Q @ K^T, abs(i - j) <= n / 4)) @ V",  # n in a condition on i, j
    "epilogue_over_n": "softsign(Q @ K^T / sqrt(d)) @ V / n + Q",
    "log_n_scale": "softmax(Q @ K^T * log(n + 1) / max(sqrt(n), 2)) @ (V + P)",
    "query_feature": "softmax((Q * (i + 1) / n) @ K^T) @ V",
    "scalar_where": "softmax(Q @ K^T / where(n > 6, sqrt(n), 1)) @ V",
}

BACKENDS = [("torch", torch.float64, 1e-10)]
if importlib.util.find_spec("triton") is not None:
    BACKENDS.append(("triton", torch.float32, 2e-5))


@pytest.fixture(autouse=True)
def _kernels(kernel_env):
    pass


def _inputs(fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(LENGTHS)
    ins = {x: torch.randn(len(LENGTHS), 2, n, D, generator=g, dtype=torch.float64) for x in fn.inputs}
    weights = torch.randn(len(LENGTHS), 2, n, D, generator=g, dtype=torch.float64)
    return ins, weights


def _run(fn, ins, weights, rows, mask, dtype):
    """Output and input gradients of sum(out * weights) over the first `rows[b]` rows of each b."""
    xs = {x: t.to(dtype).clone().requires_grad_() for x, t in ins.items()}
    out = fn(**{x.lower(): t for x, t in xs.items()}, key_padding_mask=mask)
    real = torch.zeros_like(out, dtype=torch.bool)
    for b, length in enumerate(rows):
        real[b, :, :length] = True
    loss = (out * weights.to(dtype)).masked_fill(~real, 0).sum()
    return out.detach(), dict(zip(xs, torch.autograd.grad(loss, list(xs.values()))))


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=[b[0] for b in BACKENDS])
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_n_is_each_sequences_length(name, backend, dtype, tol):
    fn = attnc.compile(FORMULAS[name], backend=backend)
    ins, weights = _inputs(fn)
    n = max(LENGTHS)
    mask = torch.arange(n)[None, :] < torch.tensor(LENGTHS)[:, None]      # right padding
    out, grads = _run(fn, ins, weights, LENGTHS, mask, dtype)
    for b, length in enumerate(LENGTHS):
        alone = {x: t[b:b + 1, :, :length] for x, t in ins.items()}
        want, want_grads = _run(fn, alone, weights[b:b + 1, :, :length], (length,), None, dtype)
        scale = 1 + want.abs().max().item()
        err = (out[b:b + 1, :, :length] - want).abs().max().item()
        assert err <= tol * scale, f"{name} {backend}: sequence {b} (length {length}): output differs by {err:.3g}"
        for x, gx in grads.items():
            gscale = 1 + want_grads[x].abs().max().item()
            gerr = (gx[b:b + 1, :, :length] - want_grads[x]).abs().max().item()
            assert gerr <= tol * gscale, f"{name} {backend}: d{x} of sequence {b} differs by {gerr:.3g}"
            if length < n:
                assert gx[b, :, length:].abs().max().item() == 0.0, \
                    f"{name} {backend}: d{x} is not 0 at the padded rows of sequence {b}"


def test_the_formulas_cover_both_kernel_plans():
    """The Triton cases run the fused kernels except where the formula does not stream."""
    from attnc.kernels import classify

    streaming = {k: classify(attnc.analyze(f).simplified).streaming for k, f in FORMULAS.items()}
    assert not streaming["linear_over_n"]
    assert all(v for k, v in streaming.items() if k != "linear_over_n"), streaming


def test_a_fully_padded_sequence_stays_finite():
    """A sequence with no real token has n = 1 (not 0): its rows are finite, and no NaN reaches
    the gradients of the other sequences."""
    fn = attnc.compile("(Q @ K^T / n) @ V + softmax(Q @ K^T / sqrt(n)) @ V")
    q, k, v = (torch.randn(2, 1, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True] * 5, [False] * 5])
    out = fn(q=q, k=k, v=v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    out[0].sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
