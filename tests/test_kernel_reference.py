"""The hand-written FlashAttention-2 (kernels/fa2_reference.py), the yardstick `attnc bench --aot
--reference` compiles the standard formula's kernels against, is itself right: under the Triton
interpreter (or on a GPU) its output and Q, K, V gradients match float64 attention, within the
error of the same-dtype eager computation (tests/kernel_catalogue.py's rule)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from kernel_catalogue import _check

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
              pytest.mark.usefixtures("kernel_env")]


def _reference():
    from attnc.kernels import aot
    return aot.load_module(Path(aot.__file__).with_name("fa2_reference.py").read_text(), "fa2_reference_test")


def _attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return w @ v


@pytest.mark.parametrize("dtype,n,d", [(torch.float32, 37, 16), (torch.float16, 32, 32), (torch.float16, 20, 16)])
def test_reference_fa2_matches_float64_attention(dtype, n, d):
    ref = _reference()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 2, n, d, generator=g) for _ in range(3)]
    dout = torch.randn(2, 2, n, d, generator=g)
    gold_in = [t.double().requires_grad_() for t in base]
    gold = _attention(*gold_in)
    gold_grads = torch.autograd.grad(gold, gold_in, dout.double())
    eager_in = [t.to(dtype).requires_grad_() for t in base]
    eager = _attention(*eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in, dout.to(dtype))
    inputs = {x: t.to(device, dtype) for x, t in zip("QKV", base)}
    out, acc, lse = ref.attn_forward(inputs)
    assert out.dtype == dtype and acc is out
    _check("fa2 [out]", out.cpu(), eager, gold, dtype)
    # lse: log2 of the row's sum of exp2 of the scores in log2 units
    s = (base[0].double() @ base[1].double().transpose(-1, -2)) / math.sqrt(d) * math.log2(math.e)
    want = torch.logsumexp(s * math.log(2), -1) / math.log(2)
    assert (lse.cpu().double().view(2, 2, n) - want).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)
    grads = ref.attn_backward(inputs, None, out, acc, lse, dout.to(device, dtype))
    for x, ge, gg in zip("QKV", eager_grads, gold_grads):
        assert grads[x].dtype == dtype
        _check(f"fa2 [d{x}]", grads[x].cpu(), ge, gg, dtype)


def test_reference_fa2_refuses_what_it_does_not_do():
    ref = _reference()
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="no key padding mask"):
        ref.attn_forward({"Q": q, "K": q, "V": q}, torch.ones(1, 8, dtype=torch.bool))
    q = torch.zeros(1, 1, 8, 24)
    with pytest.raises(ValueError, match="d in 16..256"):
        ref.attn_forward({"Q": q, "K": q, "V": q})
