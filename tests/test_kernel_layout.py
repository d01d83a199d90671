"""Strided inputs: the fused kernels read every tensor through its own strides (no copies).

The runtime passes `proj.view(B, n, h, dh).transpose(1, 2)`: (B, h, n, dh) views whose rows
are h * dh apart. The kernels must give bit-for-bit the results of contiguous copies, forward
and backward, with the output and the gradients in the layout of the inputs, and dOut of any
layout.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_catalogue import BY_NAME, make_mask

import attnc

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"), pytest.mark.usefixtures("kernel_env")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"




def _run(fn, ts: dict, mask, dout):
    xs = {x: t.detach().requires_grad_() for x, t in ts.items()}
    out = fn(**{x.lower(): t for x, t in xs.items()}, key_padding_mask=mask)
    grads = torch.autograd.grad(out, list(xs.values()), dout, retain_graph=True)
    return out, dict(zip(xs, grads)), xs


@pytest.mark.parametrize("name,dtype", [("standard", torch.float32), ("autobert_l2", torch.float32),
                                        ("p_two_scores", torch.float32), ("epilogue_gate", torch.float16)])
def test_transposed_views_match_contiguous(name, dtype):
    """Q, K, V, P as the runtime passes them (transposed views of (B, n, h, d) projections)."""
    formula = BY_NAME[name].formula
    fn = attnc.compile(formula, backend="triton")
    B, n, h, d = 2, 12, 2, 16
    g = torch.Generator().manual_seed(0)
    views = {x: torch.randn(B, n, h * d, generator=g).to(DEVICE, dtype).view(B, n, h, d).transpose(1, 2)
             for x in fn.inputs}
    assert not any(t.is_contiguous() for t in views.values())
    mask = make_mask("pad", B, n).to(DEVICE)
    # dOut also a transposed view (as a following transpose(1, 2).reshape(...) hands it back)
    dout_view = torch.randn(B, n, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    out, grads, xs = _run(fn, views, mask, dout_view)
    ref_out, ref_grads, _ = _run(fn, {x: t.contiguous() for x, t in views.items()}, mask,
                                 dout_view.contiguous())
    assert torch.equal(out, ref_out)
    for x in fn.inputs:
        assert torch.equal(grads[x], ref_grads[x]), x
    # the output and the gradients come back in the layout of the inputs: no copies needed
    first = xs[fn.inputs[0]]
    assert out.stride() == first.stride()
    for x in fn.inputs:
        assert grads[x].stride() == xs[x].stride() and grads[x].dtype == dtype, x
    # and the inputs were not copied: autograd saved the caller's tensors
    saved = out.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved[:len(fn.inputs)]] == [xs[x].data_ptr() for x in fn.inputs]


def test_sliced_and_broadcast_inputs_match_contiguous():
    """Rows farther apart than d (a slice of a wider tensor), a head dim with stride 2, and a
    key tensor broadcast over the batch (stride 0)."""
    fn = attnc.compile("softmax(Q @ softplus(K)^T / sqrt(d)) @ (V + Q)", backend="triton")
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 2, 13, 40, generator=g).to(DEVICE)
    q = wide[..., 3:19]                                    # row stride 40
    v = wide[..., ::2][..., :16]                           # head-dim stride 2
    k = torch.randn(1, 2, 13, 16, generator=g).to(DEVICE).expand(2, 2, 13, 16)   # batch stride 0
    dout = torch.randn(2, 2, 13, 16, generator=g).to(DEVICE)
    ts = {"Q": q, "K": k, "V": v}
    out, grads, _ = _run(fn, ts, None, dout)
    ref_out, ref_grads, _ = _run(fn, {x: t.contiguous() for x, t in ts.items()}, None, dout)
    assert torch.equal(out, ref_out)
    for x in ts:
        assert torch.equal(grads[x], ref_grads[x]), x
    want = attnc.compile(fn.formula, backend="torch")(q=q, k=k, v=v)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
