"""Random formulas of the whole op set (the compiler's Hypothesis generator, not one made for
kernels): whatever classifies as streaming must match the torch backend through the Triton
kernels, forward and every input gradient, and the rest must be planned as the PyTorch fallback;
nothing drawn is filtered out, and a floor on the examples compared through the kernels keeps the
test from passing on formulas that never stream. float64 golden vs fp32 eager vs fp32 Triton: the
Triton error may be at most 10x the eager error plus a small tolerance."""
import importlib.util

import pytest
import torch
from formulas import attention_formulas
from hypothesis import HealthCheck, given, settings

import attnc
from attnc.compiler.errors import BackendError, CheckError
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


EXAMPLES = 60
STREAMING_FLOOR = 25      # of the 60 derandomized examples, at least this many must stream


def _check_streaming(text, a):
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(1, 2, 11, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 8:] = False
    ref = attnc.compile(text, checks=LOOSE)
    gold, ggold = _run(ref, ins, mask, torch.float64)
    rows = mask[:, None, :, None].expand_as(gold)
    if not torch.isfinite(gold[rows]).all():
        return False       # the formula overflows in float64 itself: nothing to compare with
    eager, geager = _run(ref, ins, mask, torch.float32)
    tri, gtri = _run(attnc.compile(text, backend="triton", checks=LOOSE), ins, mask, torch.float32)

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
    return True


def test_random_formulas_on_the_triton_backend():
    """Every drawn formula is checked, none filtered out: a streaming one must match the torch
    backend through the fused kernels; any other must be planned as the PyTorch fallback (and be
    refused with fallback="error"); one the checker refuses (no input left after simplification)
    must be refused by the triton backend too. At least STREAMING_FLOOR of the examples must have been
    compared through the kernels, so the test cannot pass by drawing nothing that streams."""
    seen = {"compared": 0, "fallback": 0, "overflow": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(attention_formulas(3))
    def one(text):
        try:
            a = attnc.analyze(text, checks=LOOSE)
        except CheckError:       # uses no input after simplification (Q - Q): refused by every backend
            with pytest.raises(CheckError):
                attnc.compile(text, backend="triton", checks=LOOSE)
            seen["refused"] += 1
            return
        if not classify(a.simplified).streaming:
            fn = attnc.compile(text, backend="triton", checks=LOOSE)
            assert "fallback" in fn.plan, (text, fn.plan)
            with pytest.raises(BackendError):
                attnc.compile(text, backend="triton", checks=LOOSE, fallback="error")
            seen["fallback"] += 1
            return
        seen["compared" if _check_streaming(text, a) else "overflow"] += 1

    one()
    assert seen["compared"] >= STREAMING_FLOOR, seen
