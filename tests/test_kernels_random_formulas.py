"""Random formulas of the whole op set (the compiler's Hypothesis generator, not one made for
kernels): whatever classifies as streaming must match the torch backend through the Triton
kernels, forward and every input gradient. float64 golden vs fp32 eager vs fp32 Triton: the
Triton error may be at most 10x the eager error plus a small tolerance."""
import importlib.util

import pytest
import torch
from formulas import attention_formulas
from hypothesis import HealthCheck, assume, given, settings

import attnc
from attnc.compiler.check import CheckOptions
from attnc.kernels import classify

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
LOOSE = CheckOptions(min_inputs=1)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _run(fn, ins, mask, dtype):
    xs = [t.to(dtype).clone().requires_grad_() for t in ins]
    out = fn(q=xs[0], k=xs[1], v=xs[2], p=xs[3], key_padding_mask=mask)
    grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
    return out, grads


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(attention_formulas(3))
def test_streaming_random_formulas_match_torch(text):
    a = attnc.analyze(text, checks=LOOSE)
    assume(classify(a.simplified).streaming)
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(1, 2, 11, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 8:] = False
    ref = attnc.compile(text, checks=LOOSE)
    gold, ggold = _run(ref, ins, mask, torch.float64)
    assume(torch.isfinite(gold).all())
    eager, geager = _run(ref, ins, mask, torch.float32)
    tri, gtri = _run(attnc.compile(text, backend="triton", checks=LOOSE), ins, mask, torch.float32)
    rows = mask[:, None, :, None].expand_as(gold)

    def err(x, y):
        return (x.double() - y)[rows].abs().max().item()

    scale = gold[rows].abs().max().item() + 1
    assert err(tri, gold) <= 10 * err(eager, gold) + 1e-5 * scale, (text, a.canonical)
    for name, t_, e_, g_ in zip("QKVP", gtri, geager, ggold):
        if g_ is None:
            continue
        assert t_ is not None, (text, name)
        gs = g_.abs().max().item() + 1
        te, ee = (t_.double() - g_).abs().max().item(), (e_.double() - g_).abs().max().item()
        assert te <= 10 * ee + 1e-4 * gs, (text, a.canonical, name, te, ee)
