"""Fused Triton kernels (attnc.kernels): classification, generated source, and numerics.

On a machine without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1,
set by the fixture below for these tests only); shapes stay small because it is slow.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from attnc.compiler.errors import BackendError
from attnc.kernels import classify, explain, triton_source
from kernel_catalogue import BY_NAME, CATALOGUE, check_formula, make_mask

import attnc

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

pytestmark = pytest.mark.usefixtures("kernel_env")


# ---- the catalogue: forward and input gradients against the torch backend ---------------------

@needs_triton
@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_catalogue_fp32(case):
    assert classify(attnc.analyze(case.formula).simplified).streaming, case.name
    tri = check_formula(case.formula, n=case.n, d=case.d, mask=case.mask)
    assert tri.backend == "triton" and tri.plan == "streaming"


def test_catalogue_covers_every_plan_feature():
    """Each feature of a streaming plan is exercised by some catalogue formula (classified
    independently of the catalogue's own labels), and names are unique."""
    from attnc.kernels.codegen import plan_sides
    from attnc.kernels.structure import mask_band, weights_fit_fp16

    seen = {"pairwise": set(), "normalization": set(), "epilogue": set(), "band": set(),
            "fits_fp16": set(), "mask": set(), "both_sides": set(), "n_is_d": set()}
    for c in CATALOGUE:
        g = attnc.analyze(c.formula).simplified
        plan = classify(g).plan
        seen["pairwise"] |= {k for k, _, _ in plan.pairwise} or {"none"}
        seen["normalization"].add(plan.normalization)
        seen["epilogue"].add(plan.epilogue)
        band = mask_band(g, plan)
        seen["band"].add(band.kind if band else None)
        seen["fits_fp16"].add(weights_fit_fp16(g, plan))
        seen["mask"].add(c.mask)
        q_side, k_side = plan_sides(g, plan)
        seen["both_sides"].add(bool(set(q_side) & set(k_side)))
        seen["n_is_d"].add(c.n == c.d)
    assert seen == {"pairwise": {"dot", "cos", "dist", "outer"}, "normalization": {"softmax", "none"},
                    "epilogue": {True, False}, "band": {None, "causal", "banded"},
                    "fits_fp16": {True, False}, "mask": {None, "pad", "head", "full"},
                    "both_sides": {True, False}, "n_is_d": {False}}
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["standard", "autobert_l2", "cosine", "sigmoid", "causal_head_padding",
                                  "euclidean", "dist_sigmoid", "dist_tanh", "relu_sq", "sliding_window"])
def test_half_precision(name, dtype):
    case = BY_NAME[name]
    check_formula(case.formula, n=case.n, d=case.d, mask=case.mask, dtype=dtype)


PADDED = [c for c in CATALOGUE if c.mask in ("pad", "head")]
POISONABLE = [c for c in PADDED if c.name not in
              ("p_two_scores", "max_min")]   # these read P at query rows too: nothing key-only


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the poison, deliberately
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("case", POISONABLE, ids=[c.name for c in POISONABLE])
def test_padding_isolates_inf_and_nan(case):
    """inf / NaN in padded K, V, P rows reach no output or gradient (issue 11)."""
    check_formula(case.formula, n=12, d=16, mask=case.mask, poison=True)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # NaN rows, deliberately
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("case", PADDED, ids=[c.name for c in PADDED])
def test_padding_isolates_inputs_read_at_query_rows(case):
    """inf / NaN in the padded rows of every input, those read at query rows too (Q, and P in
    p_two_scores): the output rows of real tokens stay exact (forward)."""
    check_formula(case.formula, n=12, d=16, mask=case.mask, poison="all", grad=False)


@needs_triton
def test_batch_and_heads():
    check_formula("softmax(Q @ K^T / sqrt(d)) @ V + K", n=11, d=16, batch=2, heads=2, mask="pad")


@needs_triton
def test_fully_padded_rows_are_zero_and_finite():
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="triton")
    q, k, v = (torch.randn(2, 1, 9, 16, requires_grad=True) for _ in range(3))
    mask = make_mask("full", 2, 9)
    out = fn(q=q, k=k, v=v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max().item() == 0.0
    out.sum().backward()
    ref = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="torch")
    want = torch.autograd.grad(ref(q=q, k=k, v=v, key_padding_mask=mask).sum(), [q, k, v])
    for t, w in zip((q, k, v), want):
        assert torch.isfinite(t.grad).all()
        assert t.grad[1].abs().max().item() == 0.0        # a fully padded batch gets no gradient
        torch.testing.assert_close(t.grad, w, atol=1e-5, rtol=1e-4)


@needs_triton
def test_non_contiguous_inputs_and_inputs_without_grad():
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="triton")
    ref = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="torch")
    q = torch.randn(1, 9, 2, 16).transpose(1, 2)   # (B, H, n, d), not contiguous
    k = torch.randn(1, 2, 9, 16, requires_grad=True)
    v = torch.randn(1, 2, 9, 16)
    out = fn(q=q, k=k, v=v)
    torch.testing.assert_close(out, ref(q=q, k=k, v=v), atol=1e-5, rtol=1e-5)
    (gk,) = torch.autograd.grad(out.sum(), [k])
    (rk,) = torch.autograd.grad(ref(q=q, k=k, v=v).sum(), [k])
    torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-4)


# ---- equivalent forms classify alike ------------------------------------------------------------

EQUIVALENT = [
    ("softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)", "softmax(Q @ softplus(K)^T / sqrt(d)) @ (K + Q)"),
    ("softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V", "softmax(Q @ (K^T / sqrt(d) + V^T) / sqrt(d)) @ V"),
    ("softmax(scale(Q @ K^T)) @ V", "softmax(Q @ K^T * (1 / sqrt(n))) @ V"),
    ("softmax((2 * Q) @ K^T) @ V", "softmax(2 * (Q @ K^T)) @ V"),
    ("softmax(Q @ K^T + 3) @ V", "softmax(Q @ K^T) @ V"),
    ("softmax(Q @ (sigmoid(K^T) * 2)) @ V", "softmax(Q @ (sigmoid(K) * 2)^T) @ V"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_forms_are_both_streaming(a, b):
    ca, cb = (classify(attnc.analyze(f).simplified) for f in (a, b))
    assert ca.streaming and cb.streaming
    assert ca.plan.normalization == cb.plan.normalization
    assert [k for k, _, _ in ca.plan.pairwise] == [k for k, _, _ in cb.plan.pairwise]


@needs_triton
@pytest.mark.parametrize("a,b", EQUIVALENT[:2])
def test_equivalent_forms_run(a, b):
    check_formula(b, n=10, d=16, mask="pad")


# ---- not streaming: reasons, and the fallback plan ----------------------------------------------

NOT_STREAMING = [
    ("softmax(Q @ K^T) @ (softmax(K @ V^T) @ V)", "products over the token axis"),
    ("softmax(softmax(Q @ K^T) @ softmax(K @ Q^T)) @ V", "products over the token axis"),
    ("Q @ (K^T @ V)", "linear attention"),
    ("softmax(Q @ K^T)^T @ V", "transposed"),
    ("softmax(norm(Q @ K^T) * Q @ K^T) @ V", "norm over the keys"),
    ("sigmoid(Q) * K + V", "no product over the token axis"),
    ("softmax(Q @ K^T) @ (V @ (K^T @ Q))", "2 products"),
]


@pytest.mark.parametrize("formula,why", NOT_STREAMING)
def test_not_streaming_reasons(formula, why):
    c = classify(attnc.analyze(formula).simplified)
    assert not c.streaming and c.plan is None
    assert why in c.reason
    text = explain(attnc.analyze(formula))
    assert "fallback" in text and why in text


@needs_triton
def test_fallback_plan_matches_torch():
    formula = "softmax(Q @ K^T) @ (softmax(K @ V^T) @ V)"
    fn = attnc.compile(formula, backend="triton")
    ref = attnc.compile(formula, backend="torch")
    assert fn.backend == "triton" and fn.plan == "torch-fallback"
    assert not fn.classification.streaming
    q, k, v = (torch.randn(2, 1, 7, 8, requires_grad=True) for _ in range(3))
    mask = make_mask("pad", 2, 7)
    out = fn(q=q, k=k, v=v, key_padding_mask=mask)
    torch.testing.assert_close(out, ref(q=q, k=k, v=v, key_padding_mask=mask))
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    want = torch.autograd.grad(ref(q=q, k=k, v=v, key_padding_mask=mask).sum(), [q, k, v])
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp)
    assert grads[0].abs().max() > 0
    with pytest.raises(BackendError, match="does not stream"):
        attnc.compile(formula, backend="triton", fallback="error")
    with pytest.raises(BackendError, match="does not stream"):
        triton_source(attnc.analyze(formula))


# ---- explain, source, cache ---------------------------------------------------------------------

def test_explain_streaming():
    text = explain(attnc.analyze("softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)"))
    assert "class: streaming" in text
    assert "softmax over j" in text
    assert "q' = Q" in text and "v' = (K + Q)" in text
    text = explain(attnc.analyze("sigmoid(cos(Q, K)) @ V"))
    assert "cosine" in text and "no row normalisation" in text


def test_source_is_readable_and_specialised():
    a = attnc.analyze("softmax(Q @ K^T / sqrt(d)) @ V")
    src = triton_source(a, dtype="float16", head_dim=48)
    for name in ("def _attn_fwd(", "def _attn_bwd_pre(", "def _attn_bwd_dkv(", "def _attn_bwd_dq(",
                 "def attn_forward(", "def attn_backward(", "_TUNER.launch(_attn_fwd", "@triton.jit"):
        assert name in src
    # every tensor has its own strides; no copies on the host
    for x in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        assert f"stride_{x}n" in src and f"stride_{x}d" in src, x
    assert ".contiguous()" not in src.replace("mask.to(torch.uint8).contiguous()", "")
    assert "HEAD_DIM = 48" in src and "BLOCK_D = 64" in src and "DTYPE = 'float16'" in src
    assert a.hash in src
    compile(src, "<generated>", "exec")   # valid python (not executed)
    assert "eval(" not in src and "exec(" not in src


def test_source_errors():
    a = attnc.analyze("softmax(Q @ K^T) @ V")
    with pytest.raises(BackendError, match="float64"):
        triton_source(a, dtype="float64")
    with pytest.raises(BackendError, match="head dim"):
        triton_source(a, head_dim=1000)


@needs_triton
def test_source_cached_by_hash_dtype_head_dim(tmp_path):
    formula = "softmax(Q @ K^T / sqrt(d)) @ V"
    fn = attnc.compile(formula, backend="triton", cache_dir=tmp_path)
    assert fn.source_path is not None and fn.source_path.exists()
    assert fn.source_path.read_text() == fn.source
    q = torch.randn(1, 1, 5, 24)
    fn(q=q, k=q, v=q)
    files = sorted(p.name for p in (tmp_path / "triton").iterdir() if p.suffix == ".py")
    assert any(fn.hash in f and "float32_d24" in f for f in files)
    assert any(fn.hash in f and "float32_d64" in f for f in files)


# ---- errors --------------------------------------------------------------------------------------

@needs_triton
def test_cpu_without_interpreter_is_a_backend_error(monkeypatch):
    if HAS_CUDA:
        pytest.skip("a CUDA device is present")
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        attnc.compile("softmax(Q @ K^T / 7) @ V - K * 3", backend="triton")
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        fn(q=x, k=x, v=x)


@needs_triton
def test_call_errors():
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="triton")
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(BackendError, match="float64"):
        fn(q=x, k=x, v=x)
    y = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendError, match="dtype"):
        fn(q=y, k=y.half(), v=y)
    with pytest.raises(BackendError, match="option"):
        attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="triton", block_m=64)


def test_import_does_not_import_triton():
    import subprocess
    import sys
    code = "import sys, attnc, attnc.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- GPU ---------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("name", ["standard", "autobert_l2", "autobert_l12", "cosine", "euclidean",
                                  "softsign", "alibi", "causal", "sigmoid", "epilogue_gate",
                                  "p_two_scores", "dist_tanh", "relu_sq", "causal_alibi",
                                  "banded_sigmoid"])
def test_gpu_catalogue(name, dtype):
    case = BY_NAME[name]
    check_formula(case.formula, n=300, d=64, mask="pad", dtype=dtype, batch=2, heads=3, device="cuda")
    check_formula(case.formula, n=129, d=48, mask="head", dtype=dtype, device="cuda")
    check_formula(case.formula, n=64, d=128, mask=None, dtype=dtype, device="cuda")


# ---- bench CLI -----------------------------------------------------------------------------------

@needs_triton
def test_bench_cli_on_cpu_checks_correctness(tmp_path, capsys):
    if HAS_CUDA:
        pytest.skip("on a GPU the bench times instead")
    import json

    from attnc.cli import main
    path = tmp_path / "r.json"
    assert main(["bench", "softmax(Q @ K^T / sqrt(d)) @ V", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["mode"] == "correctness" and data["ok"] and data["plan"] == "streaming"
    assert {"device", "torch", "triton"} <= set(data)
    assert main(["bench", "softmax(Q @ K^T) @ V", "--backends", "nope"]) == 2
