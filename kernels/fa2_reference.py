"""A hand-written FlashAttention-2 for standard attention, softmax(Q K^T / sqrt(d)) V: the yardstick
the generated kernels are compiled against (`attnc bench --aot --reference`, kernels/aot.py).

It is FlashAttention-2's algorithm written plainly, with the generated kernels' host protocol
(`INPUTS`, `attn_forward`, `attn_backward`, launches through `_TUNER`) so that the same AOT
harness compiles both at the same block configs:

    _attn_fwd      one query block resident; online softmax in base 2 over key blocks; saves
                   the log2-sum-exp2 per row
    _attn_bwd_pre  delta = rowsum(dO * O)
    _attn_bwd_dkv  one key block resident (K, V in registers); per query block S^T = K Q^T,
                   P^T from the saved statistics, dV += P^T dO, dP^T = V dO^T,
                   dS^T = P^T (dP^T - delta), dK += dS^T Q
    _attn_bwd_dq   one query block resident (Q, dO); per key block S, P, dP = dO V^T,
                   dS = P (dP - delta), dQ += dS K

Five products per (query block, key block) pair in the backward are FlashAttention-2's; with dQ
in its own kernel (no atomics) S and dP are computed twice, so 4 + 3 products. Inputs are
(B, H, n, d) of one dtype with any strides, d a power of two from 16 to 256; no key padding mask
(this is a yardstick, not a backend). Under TRITON_INTERPRET=1 it runs on the CPU
(tests/test_kernel_reference.py checks it against float64 attention).
"""
import math

import torch
import triton
import triton.language as tl

from attnc.kernels import tune

INPUTS = ("Q", "K", "V")
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
_TUNER = tune.Tuner(__file__)


@triton.jit
def _load(ptrs, ok, EVEN: tl.constexpr):
    """A tile of rows; rows past n (ok False) read as 0. EVEN (n a multiple of the block): no mask."""
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=ok, other=0.0)
    return x


@triton.jit
def _store(ptrs, x, ok, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=ok)


@triton.jit
def _program(H, BLOCK: tl.constexpr):
    """(first row of this program's block, batch*head index, batch, head)."""
    bh = tl.program_id(1)
    return tl.program_id(0) * BLOCK, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _rows(start, n_ctx, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(row indices of the block from `start`, head-dim columns, which rows exist)."""
    rows = start + tl.arange(0, BLOCK)
    return rows, tl.arange(0, HEAD_DIM), rows < n_ctx


@triton.jit
def _attn_fwd(Q, K, V, O, Lse, qk_scale, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
              sob, soh, son, sod, n_ctx, H, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
              EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h = _program(H, BLOCK_M)
    K += b * skb + h * skh
    V += b * svb + h * svh
    rows, cols, row_ok = _rows(start_m, n_ctx, BLOCK_M, HEAD_DIM)
    q = _load(Q + b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :] * sqd, row_ok[:, None], EVEN_M)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_ctx
        k = _load(K + keys[:, None] * skn + cols[None, :] * skd, key_ok[:, None], EVEN_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale     # log2 units
        if not EVEN_N:
            s = tl.where(key_ok[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = _load(V + keys[:, None] * svn + cols[None, :] * svd, key_ok[:, None], EVEN_N)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m = m_new
    _store(Lse + bh.to(tl.int64) * n_ctx + rows, m + tl.log2(l), row_ok, EVEN_M)
    _store(O + b * sob + h * soh + rows[:, None] * son + cols[None, :] * sod,
           (acc / l[:, None]).to(O.dtype.element_ty), row_ok[:, None], EVEN_M)


@triton.jit
def _attn_bwd_pre(O, DO, Delta, sob, soh, son, sod, sdb, sdh, sdn, sdd, n_ctx, H, HEAD_DIM: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h = _program(H, BLOCK_M)
    rows, cols, row_ok = _rows(start_m, n_ctx, BLOCK_M, HEAD_DIM)
    o = _load(O + b * sob + h * soh + rows[:, None] * son + cols[None, :] * sod, row_ok[:, None], EVEN_M)
    do = _load(DO + b * sdb + h * sdh + rows[:, None] * sdn + cols[None, :] * sdd, row_ok[:, None], EVEN_M)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    _store(Delta + bh.to(tl.int64) * n_ctx + rows, delta, row_ok, EVEN_M)


@triton.jit
def _attn_bwd_dkv(Q, K, V, DO, DK, DV, Lse, Delta, qk_scale, sm_scale, sqb, sqh, sqn, sqd, skb, skh, skn,
                  skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd, n_ctx, H, HEAD_DIM: tl.constexpr,
                  DOT_PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, bh, b, h = _program(H, BLOCK_N)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    Lse += bh.to(tl.int64) * n_ctx
    Delta += bh.to(tl.int64) * n_ctx
    keys, cols, key_ok = _rows(start_n, n_ctx, BLOCK_N, HEAD_DIM)
    k_off = b * skb + h * skh + keys[:, None] * skn + cols[None, :] * skd
    v_off = b * svb + h * svh + keys[:, None] * svn + cols[None, :] * svd
    k = _load(K + k_off, key_ok[:, None], EVEN_N)
    v = _load(V + v_off, key_ok[:, None], EVEN_N)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for start_m in range(0, n_ctx, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_ctx
        q = _load(Q + rows[:, None] * sqn + cols[None, :] * sqd, row_ok[:, None], EVEN_M)
        lse = _load(Lse + rows, row_ok, EVEN_M)
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse[None, :])   # P^T
        if not (EVEN_M and EVEN_N):
            pt = tl.where(key_ok[:, None] & row_ok[None, :], pt, 0.0)
        do = _load(DO + rows[:, None] * sdn + cols[None, :] * sdd, row_ok[:, None], EVEN_M)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = _load(Delta + rows, row_ok, EVEN_M)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    # DK, DV are laid out like K, V (empty_like)
    _store(DK + k_off, (dk * sm_scale).to(DK.dtype.element_ty), key_ok[:, None], EVEN_N)
    _store(DV + v_off, dv.to(DV.dtype.element_ty), key_ok[:, None], EVEN_N)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, Lse, Delta, qk_scale, sm_scale, sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                 svb, svh, svn, svd, sdb, sdh, sdn, sdd, n_ctx, H, HEAD_DIM: tl.constexpr,
                 DOT_PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h = _program(H, BLOCK_M)
    K += b * skb + h * skh
    V += b * svb + h * svh
    rows, cols, row_ok = _rows(start_m, n_ctx, BLOCK_M, HEAD_DIM)
    q_off = b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :] * sqd
    q = _load(Q + q_off, row_ok[:, None], EVEN_M)
    do = _load(DO + b * sdb + h * sdh + rows[:, None] * sdn + cols[None, :] * sdd, row_ok[:, None], EVEN_M)
    lse = _load(Lse + bh.to(tl.int64) * n_ctx + rows, row_ok, EVEN_M)
    delta = _load(Delta + bh.to(tl.int64) * n_ctx + rows, row_ok, EVEN_M)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_ctx
        k = _load(K + keys[:, None] * skn + cols[None, :] * skd, key_ok[:, None], EVEN_N)
        v = _load(V + keys[:, None] * svn + cols[None, :] * svd, key_ok[:, None], EVEN_N)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if not (EVEN_M and EVEN_N):
            p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    _store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), row_ok[:, None], EVEN_M)


def _setup(inputs, mask, allow_tf32):
    q = inputs["Q"]
    if mask is not None:
        raise ValueError("the reference FlashAttention-2 takes no key padding mask")
    B, H, n_ctx, d = q.shape
    if d not in (16, 32, 64, 128, 256) or any(inputs[x].shape != q.shape for x in INPUTS):
        raise ValueError(f"the reference takes Q, K, V of one shape with d in 16..256, a power of two; got {d}")
    prec = "tf32" if (q.dtype != torch.float32 or allow_tf32) else "ieee"
    consts = dict(HEAD_DIM=d, DOT_PREC=prec)
    return q, B, H, n_ctx, d, consts


def _strides(*ts):
    return [s for t in ts for s in t.stride()]


def attn_forward(inputs, mask=None, allow_tf32=False):
    """(out, acc, lse) as the generated modules return them (acc is out: no epilogue)."""
    q, B, H, n_ctx, d, consts = _setup(inputs, mask, allow_tf32)
    k, v = inputs["K"], inputs["V"]
    out = torch.empty_like(q)
    lse = torch.empty((B * H, n_ctx), device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, LOG2E / math.sqrt(d), *_strides(q, k, v, out), n_ctx, H)
    _TUNER.launch(_attn_fwd, args, consts, n=n_ctx, batch_heads=B * H, rows="m", dtype=str(q.dtype)[6:])
    return out, out, lse


def attn_backward(inputs, mask, out, acc, lse, dout, allow_tf32=False):
    """{name: gradient} of sum(out * dout) w.r.t. Q, K, V."""
    q, B, H, n_ctx, d, consts = _setup(inputs, mask, allow_tf32)
    k, v = inputs["K"], inputs["V"]
    dtype = str(q.dtype)[6:]
    delta = torch.empty((B * H, n_ctx), device=q.device, dtype=torch.float32)
    args = (out, dout, delta, *_strides(out, dout), n_ctx, H)
    _TUNER.launch(_attn_bwd_pre, args, {"HEAD_DIM": d}, n=n_ctx, batch_heads=B * H, rows="m", dtype=dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scales = (LOG2E / math.sqrt(d), 1 / math.sqrt(d))
    args = (q, k, v, dout, dk, dv, lse, delta, *scales, *_strides(q, k, v, dout), n_ctx, H)
    _TUNER.launch(_attn_bwd_dkv, args, consts, n=n_ctx, batch_heads=B * H, rows="n", dtype=dtype)
    args = (q, k, v, dout, dq, lse, delta, *scales, *_strides(q, k, v, dout), n_ctx, H)
    _TUNER.launch(_attn_bwd_dq, args, consts, n=n_ctx, batch_heads=B * H, rows="m", dtype=dtype)
    return {"Q": dq, "K": dk, "V": dv}
