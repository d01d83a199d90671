"""The PyTorch backend against hand-written torch, SDPA (with padding) and gradcheck."""
import math
import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F

import attnc
from attnc.compiler.api import analyze
from attnc.compiler.backends import build_torch


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def qkvp(b=2, h=3, n=9, d=8, dtype=torch.float64):
    return [rand(b, h, n, d, dtype=dtype, seed=s) for s in range(4)]


def pad_mask(b, n, lengths):
    m = torch.zeros(b, n, dtype=torch.bool)
    for row, length in enumerate(lengths):
        m[row, :length] = True
    return m


# hand-written references, masks as additive -inf on keys
def ref_standard(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.softmax(s, -1) @ v


def ref_layer2(q, k, v, mask=None):
    s = q @ torch.log(1 + torch.exp(k.transpose(-1, -2))) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.softmax(s, -1) @ (k + q)


def ref_layer12(q, k, v, mask=None):
    d = q.shape[-1]
    s = q @ (k / math.sqrt(d) + v).transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.softmax(s, -1) @ v


PAPER = [("softmax(Q @ K^T / sqrt(d)) @ V", ref_standard),
         ("softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)", ref_layer2),
         ("softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V", ref_layer12)]


@pytest.mark.parametrize("text,ref", PAPER)
@pytest.mark.parametrize("padded", [False, True])
def test_paper_formulas_match_hand_written(text, ref, padded):
    q, k, v, _ = qkvp()
    mask = pad_mask(2, 9, [9, 5]) if padded else None
    fn = attnc.compile(text)
    out = fn(q=q, k=k, v=v, key_padding_mask=mask)
    want = ref(q, k, v, mask)
    rows = mask[:, None, :, None].expand_as(out) if padded else torch.ones_like(out, dtype=torch.bool)
    torch.testing.assert_close(out[rows], want[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_matches_sdpa_with_padding(dtype):
    q, k, v, _ = qkvp(b=3, h=2, n=13, d=16, dtype=dtype)
    mask = pad_mask(3, 13, [13, 7, 1])
    out = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V")(q=q, k=k, v=v, key_padding_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_padded_keys_contribute_nothing():
    q, k, v, p = qkvp(n=10)
    mask = pad_mask(2, 10, [10, 6])
    for text in ["softmax(Q @ K^T / sqrt(d)) @ V", "softsign(Q @ K^T) @ V", "sigmoid(cos(Q, K)) @ V",
                 "softmax(-dist(Q, K)) @ (V + P)", "(Q @ K^T) @ V / n"]:
        fn = attnc.compile(text)
        out = fn(q=q, k=k, v=v, p=p, key_padding_mask=mask)
        k2, v2, p2 = k.clone(), v.clone(), p.clone()
        for t in (k2, v2, p2):
            t[1, :, 6:] = 1e3 * torch.randn_like(t[1, :, 6:])   # garbage in padded positions
        q2 = q.clone()
        q2[1, :, 6:] = 7.0
        out2 = fn(q=q2, k=k2, v=v2, p=p2, key_padding_mask=mask)
        torch.testing.assert_close(out[1, :, :6], out2[1, :, :6], rtol=1e-10, atol=1e-10, msg=text)
        assert torch.isfinite(out2).all()


def test_fully_padded_rows_are_finite():
    q, k, v, _ = qkvp(n=6)
    mask = pad_mask(2, 6, [6, 0])
    for text in ["softmax(Q @ K^T / sqrt(d)) @ V", "softmax(mask(Q @ K^T, j <= i)) @ V"]:
        out = attnc.compile(text)(q=q, k=k, v=v, key_padding_mask=mask)
        assert torch.isfinite(out).all()


def test_causal_mask_and_alibi_against_manual():
    q, k, v, _ = qkvp(n=8)
    fn = attnc.compile("softmax(mask(Q @ K^T / sqrt(d) - 0.5 * abs(i - j), j <= i)) @ V")
    i = torch.arange(8.0).view(8, 1)
    j = torch.arange(8.0).view(1, 8)
    s = q @ k.transpose(-1, -2) / math.sqrt(8) - 0.5 * (i - j).abs()
    s = s.masked_fill(j > i, -math.inf)
    torch.testing.assert_close(fn(q=q, k=k, v=v), torch.softmax(s, -1) @ v)


def test_elementwise_max_min_with_scalars_and_matrices():
    q, k, v, _ = qkvp(n=5, d=4)
    got = attnc.compile("max(Q, 0) * K + min(V, 0.5) + max(Q, K) - min(0, K)")(q=q, k=k, v=v)
    want = q.clamp(min=0) * k + v.clamp(max=0.5) + torch.maximum(q, k) - k.clamp(max=0)
    torch.testing.assert_close(got, want)


def test_cos_and_dist_against_manual():
    q, k, v, _ = qkvp(n=7, d=5)
    cos = F.cosine_similarity(q[..., :, None, :], k[..., None, :, :], dim=-1)
    dist = torch.cdist(q, k)
    got = attnc.compile("softmax(cos(Q, K)) @ V + softsign(dist(Q, K)) @ V")(q=q, k=k, v=v)
    want = torch.softmax(cos, -1) @ v + F.softsign(dist) @ v
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("text", [p for p, _ in PAPER] + [
    "softsign(cos(Q, K)) @ V + dist(Q, P) @ V / n", "softmax(mask(Q @ K^T - abs(i - j), j <= i)) @ V"])
def test_gradcheck_float64(text):
    q, k, v, p = (t.requires_grad_() for t in qkvp(b=1, h=2, n=5, d=3))
    mask = pad_mask(1, 5, [4])
    fn = attnc.compile(text)
    assert torch.autograd.gradcheck(
        lambda q, k, v, p: fn(q=q, k=k, v=v, p=p, key_padding_mask=mask), (q, k, v, p))


def test_unused_inputs_allowed_missing_used_input_is_an_error():
    q, k, v, p = qkvp()
    fn = attnc.compile("softmax(Q @ K^T) @ V")
    assert fn.inputs == ("Q", "K", "V")
    fn(q=q, k=k, v=v, p=p)       # P unused: fine
    with pytest.raises(attnc.BackendError, match="uses V"):
        fn(q=q, k=k)
    with pytest.raises(attnc.BackendError, match="key_padding_mask"):
        fn(q=q, k=k, v=v, key_padding_mask=torch.ones(2, 9))
    with pytest.raises(attnc.BackendError, match="batch, heads, n, d"):
        fn(q=q[0], k=k[0], v=v[0])


def test_generated_source_is_readable_and_cached(tmp_path):
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", cache_dir=tmp_path)
    assert fn.source_path is not None and fn.source_path.read_text() == fn.source
    assert fn.source_path.parent.parent == tmp_path and fn.hash in fn.source_path.name
    assert "def forward(q, k, v, p, key_padding_mask=None):" in fn.source
    assert "ops.softmax(" in fn.source and "# (n, n)" in fn.source
    compile(fn.source, "generated", "exec", dont_inherit=True)  # valid Python (not executed)


def _compile_in_child(args):
    cache_dir, text = args
    fn = attnc.compile(text, cache_dir=cache_dir)
    q = torch.ones(1, 1, 4, 3)
    return fn.hash, float(fn(q=q, k=q, v=q).sum())


def test_cache_safe_under_concurrent_processes(tmp_path):
    text = "softmax(Q @ K^T / sqrt(d) + 0.25) @ (V + K)"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_compile_in_child, [(str(tmp_path), text)] * 8)
    assert len(set(results)) == 1
    files = list((tmp_path / "torch").iterdir())
    assert len(files) == 1 and not any(f.name.endswith(".tmp") for f in files)


def test_unwritable_cache_still_compiles(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fn = build_torch(analyze("softmax(K @ Q^T) @ V"), blocker)
    q = torch.ones(1, 1, 3, 2)
    assert fn.source_path is None and fn(q=q, k=q, v=q).shape == (1, 1, 3, 2)
