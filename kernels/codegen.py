"""Streaming plan -> readable Triton source: forward and backward kernels plus host launchers.

Kernels (grid: blocks of rows x batch*heads):

    _attn_fwd      per query block: q-side features once, then one pass over key blocks
                   (k-side features, score tile, online softmax or direct accumulation),
                   epilogue; saves the log-sum-exp (softmax) and, with an epilogue, M = W @ v'.
    _attn_bwd_pre  per query block: dM from dOut through the epilogue; delta = rowsum(dM * M).
    _attn_bwd_dkv  per key block: recompute the score tiles over the query blocks, accumulate
                   the adjoints of v' and of the key-side features, then back to K/V/Q/P.
    _attn_bwd_dq   per query block: the same over the key blocks for the query-side features.

Every (B, H, n, d) tensor comes with its own four strides (inputs, output, dOut, gradients:
transposed views need no copies). The softmax runs in log2 units with exp2: log2(e) and the
formula's scalar factors are folded into q' once per query tile (lower.TileLowering.scaled).
A causal or banded mask in the formula bounds the loops (structure.mask_band): blocks that it
masks wholly are never visited. EVEN_M / EVEN_N (n a multiple of the block) and a head dim equal
to BLOCK_D turn the bounds masks into constants, which the compiler removes. Loaded inputs go to
tl.dot in their own dtype; weights that fp16 cannot hold go to fp32 (TF32) products
(tune.dot_types). Block configs come from tune.Tuner (autotuned on a GPU, cached on disk).

Inputs used on both sides (K in softmax(Q @ softplus(K)^T) @ (K + Q)) get one gradient buffer
per side; the host launcher adds them.
"""
from __future__ import annotations

import networkx as nx
from attnc.compiler.ir import Op, output_of

from .lower import (TileLowering, Stmt, dot_operand, forward_expr, literal, reverse_lines, tile_bcast,
                    tile_shape)
from .plan import StreamingPlan, render
from .structure import mask_band, position_conditions, weights_fit_fp16
from .tune import block_d

GEN_VERSION = "triton-5"
DTYPES = ("float32", "float16", "bfloat16")
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

_HELPERS = '''
@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _logsigmoid(x):
    return -_softplus(-x)


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _relu(x):
    return tl.maximum(x, 0.0)


@triton.jit
def _step(x):
    return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _heaviside(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, 0.0, 0.5))


@triton.jit
def _safe_sqrt(x):
    pos = x > 0
    return tl.where(pos, tl.sqrt(tl.where(pos, x, 1.0)), 0.0)


@triton.jit
def _safe_sqrt_grad(x):
    pos = x > 0
    return tl.where(pos, 0.5 / tl.sqrt(tl.where(pos, x, 1.0)), 0.0)


@triton.jit
def _softmax1(x):
    return tl.where(x > -float("inf"), 1.0, 0.0)


@triton.jit
def _pow(x, y):
    ax = tl.abs(x)
    r = tl.exp(y * tl.log(ax))
    yi = tl.floor(y)
    is_int = yi == y
    odd = is_int & ((yi - 2.0 * tl.floor(0.5 * yi)) != 0.0)
    r = tl.where((x < 0) & odd, -r, r)
    r = tl.where((x < 0) & (~is_int), float("nan"), r)
    return tl.where(y == 0, 1.0, r)


@triton.jit
def _lanes(offs, bound, EVEN: tl.constexpr):
    """offs < bound, or a constant all-true mask when no block crosses the bound (EVEN): the
    compiler then drops the masks of the loads, stores and selects that use it."""
    if EVEN:
        ok = tl.full(offs.shape, 1, tl.int1)
    else:
        ok = offs < bound
    return ok


@triton.jit
def _row_softmax(x, cols_ok):
    x = tl.where(cols_ok, x, -float("inf"))
    m = tl.max(x, 1)
    m = tl.where(m == -float("inf"), 0.0, m)
    e = tl.exp(x - m[:, None])
    s = tl.sum(e, 1)
    return e / tl.where(s > 0, s, 1.0)[:, None]
'''

class _Gen:
    """The kernels of one plan. fold / t: the resident side that takes the scalar factors of the
    score and the layout of the score tiles ("q", queries x keys: forward, pre, dQ; "k" with
    transposed tiles, keys x queries: dK/dV, FlashAttention-2's S^T = K Q^T)."""

    def __init__(self, g: nx.DiGraph, plan: StreamingPlan, fold: str = "q", scalars=None):
        self.g = g
        self.plan = plan
        self.t = fold == "k"
        low = self.low = TileLowering(g, plan, fold=fold, scalars=scalars)
        self.out = low.val(output_of(g), "q")
        self.softmax = plan.normalization == "softmax"
        if self.softmax:   # the score in log2 units: exp2 needs no multiply per score
            self.z = low.scaled(plan.score, "p", ((Op.MUL, ("lit", LOG2E)),), spread=True)
        else:
            self.z = low.val(plan.score, "p")
        self.v = low.val(plan.value, "k")
        self.acc = low.val(plan.matmul, "q")
        stmts = low.stmts
        after_acc: set[str] = {self.acc.text}
        for st in stmts:
            if any(a.text in after_acc for a in st.args):
                after_acc.add(st.var)
        self.after_acc = after_acc
        self.qregion = [s for s in stmts if s.kind[0] == "Q" and s.var not in after_acc]
        self.epilogue = [s for s in stmts if s.var in after_acc]
        self.pstmts = low.closure([self.z.text]) if self.z.kind == "P" else []
        self.pstmts = [s for s in self.pstmts if s.kind == "P"]
        qvars = {s.var for s in self.qregion}
        kvars = {s.var for s in stmts if s.kind[0] == "K"}
        self.p_qvars = sorted({a.text for s in self.pstmts for a in s.args if a.text in qvars},
                              key=self._order)
        self.p_kvars = sorted({a.text for s in self.pstmts for a in s.args if a.text in kvars},
                              key=self._order)
        if self.z.kind in ("Q1", "QD"):
            self.p_qvars = sorted(set(self.p_qvars) | {self.z.text}, key=self._order)
        if self.z.kind in ("K1", "KD"):
            self.p_kvars = sorted(set(self.p_kvars) | {self.z.text}, key=self._order)
        self.epi_qvars = sorted({a.text for s in self.epilogue for a in s.args if a.text in qvars},
                                key=self._order)
        # which statements depend (differentiably) on a loaded input
        live: set[str] = set()
        for st in stmts:
            if st.op == "load" or (not st.is_bool and any(a.text in live for a in st.args)):
                live.add(st.var)
        self.live = live
        self.loads_q = [s for s in stmts if s.op == "load" and s.kind[0] == "Q" and s.var not in after_acc]
        self.loads_k = [s for s in stmts if s.op == "load" and s.kind[0] == "K"]
        self.inputs = tuple(x for x in ("Q", "K", "V", "P")
                            if any(s.name == x for s in self.loads_q + self.loads_k))
        self.q_side = tuple(x for x in self.inputs if any(s.name == x for s in self.loads_q))
        self.k_side = tuple(x for x in self.inputs if any(s.name == x for s in self.loads_k))
        self.band = mask_band(g, plan)
        self.fits = weights_fit_fp16(g, plan)
        # a P-kind score is the usual case; a score without any key dependence is still a tile
        self.zt = self.z.text if self.z.kind == "P" else self._as_tile(self.z)

    def _order(self, var: str) -> int:
        return next(i for i, s in enumerate(self.low.stmts) if s.var == var)

    def _as_tile(self, v) -> str:
        shape = tile_shape("P", self.t)
        if v.kind in ("Q1", "K1"):
            return f"tl.broadcast_to({tile_bcast(v, 'P', self.t)}, {shape})"
        return f"tl.full({shape}, {v.text}, tl.float32)"

    # -- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def tile(tensor: str, rows: str) -> str:
        """Pointers of a (rows, BLOCK_D) tile of a (B, H, n, d) tensor, through its own strides."""
        x = _STRIDE[tensor]
        return f"{tensor}_ptr + {rows}[:, None] * stride_{x}n + offs_d[None, :] * stride_{x}d"

    def leaf(self, st: Stmt, acc_text: str | None = None):
        if st.op == "load":
            q = st.kind[0] == "Q"
            tile = self.tile(st.name, "offs_m" if q else "offs_n")
            mask = "q_tile_mask" if q else "k_tile_mask"
            return [f"{st.var}_in = tl.load({tile}, mask={mask}, other=0.0)  # {st.name}",
                    f"{st.var} = {st.var}_in.to(tl.float32)"]
        if st.op == "index":
            return f"{'offs_m' if st.kind[0] == 'Q' else 'offs_n'}.to(tl.float32)"
        if st.op == "acc":
            return acc_text
        raise AssertionError(st.op)  # pragma: no cover

    def lines(self, stmts, indent, acc_text=None, emitted=None):
        stmts = [s for s in stmts if emitted is None or s.var not in emitted]
        if emitted is not None:
            emitted.update(s.var for s in stmts)
        out = []
        for st in stmts:
            if st.op in ("load", "index", "acc"):
                text = self.leaf(st, acc_text)
                if isinstance(text, list):
                    out += [indent + t for t in text]
                    continue
            else:
                text = forward_expr(st, self.t)
            note = f"  # {st.note}" if st.note else ""
            out.append(f"{indent}{st.var} = {text}{note}")
        return out

    def params(self, tensors: list[str], rowvecs: list[str], grads: str = "dq_side"):
        """(kernel parameters, host arguments) in one order: pointers, scalars, strides.
        Gradient buffers D<X> are taken from the host dict `grads`."""
        def host_name(t):
            return f'{grads}["{t[1:]}"]' if t in _GRADS else _HOST[t]

        params, host = [], []
        for t in tensors:
            params.append(f"{t}_ptr")
            host.append(host_name(t))
        params.append("Mask_ptr")
        host.append("mask_arg")
        if self.low.scalars.seq_args:
            params.append("Seq_ptr")
            host.append("seq")
        for r in rowvecs:
            params.append(f"{r}_ptr")
            host.append(r.lower())
        params += self.low.scalars.args
        host += self.low.scalars.args
        for t in tensors:
            x = _STRIDE[t]
            params += [f"stride_{x}b", f"stride_{x}h", f"stride_{x}n", f"stride_{x}d"]
            host.append(f"*{host_name(t)}.stride()")
        params += ["stride_maskb", "n_ctx", "H"]
        host += ["mask_arg.stride(0)", "n_ctx", "H"]
        return params, host

    def signature(self, name: str, tensors: list[str], rowvecs: list[str]) -> list[str]:
        params, _ = self.params(tensors, rowvecs)
        args = params + [f"{c}: tl.constexpr" for c in _CONSTEXPRS]
        return [f"def {name}("] + _wrap(args, "        ", "):")

    @staticmethod
    def q_block(indent: str, start: str) -> list[str]:
        return [f"{indent}offs_m = {start} + tl.arange(0, BLOCK_M)",
                f"{indent}m_mask = _lanes(offs_m, n_ctx, EVEN_M)",
                f"{indent}q_tile_mask = m_mask[:, None] & d_mask[None, :]"]

    @staticmethod
    def k_block(indent: str, start: str) -> list[str]:
        return [f"{indent}offs_n = {start} + tl.arange(0, BLOCK_N)",
                f"{indent}n_mask = _lanes(offs_n, n_ctx, EVEN_N)",
                f"{indent}key_ok = n_mask",
                f"{indent}if HAS_MASK:",
                f"{indent}    keep = tl.load(Mask_ptr + offs_n, mask=n_mask, other=0)",
                f"{indent}    key_ok = key_ok & (keep != 0)",
                f"{indent}# padded key rows load as 0 (never their stored values) and get no gradient",
                f"{indent}k_tile_mask = key_ok[:, None] & d_mask[None, :]"]

    def head(self, tensors: list[str], rowvecs: list[str], pid_rows: str) -> list[str]:
        L = ["    pid = tl.program_id(0)",
             "    off_hz = tl.program_id(1)",
             "    off_b = (off_hz // H).to(tl.int64)",
             "    off_h = (off_hz % H).to(tl.int64)"]
        if tensors:
            L.append("    # this (batch, head) of every tensor, each through its own strides")
        for t in tensors:
            x = _STRIDE[t]
            L.append(f"    {t}_ptr += off_b * stride_{x}b + off_h * stride_{x}h")
        L.append("    Mask_ptr += off_b * stride_maskb")
        seq = self.low.scalars.seq_args
        if seq:
            L.append("    # scalars of this sequence's length n (its real tokens)")
            L.append(f"    Seq_ptr += off_b * {len(seq)}")
            L += [f"    {name} = tl.load(Seq_ptr + {i})" for i, name in enumerate(seq)]
        for r in rowvecs:
            L.append(f"    {r}_ptr += off_hz.to(tl.int64) * n_ctx")
        L += ["    offs_d = tl.arange(0, BLOCK_D)",
              "    d_mask = _lanes(offs_d, HEAD_DIM, BLOCK_D == HEAD_DIM)",
              f"    {pid_rows}"]
        return L

    def key_loop(self, indent: str) -> list[str]:
        """The loop over the key blocks a query block [start_m, start_m + BLOCK_M) must visit
        (the same bounds as structure.key_block_range)."""
        b = self.band
        if b is None:
            return [f"{indent}for start_n in range(0, n_ctx, BLOCK_N):"]
        return self._band_loop(indent, "n", "start_m + BLOCK_M", b.hi, "start_m", b.lo)

    def query_loop(self, indent: str) -> list[str]:
        """The loop over the query blocks a key block [start_n, start_n + BLOCK_N) must visit
        (the same bounds as structure.query_block_range)."""
        b = self.band
        if b is None:
            return [f"{indent}for start_m in range(0, n_ctx, BLOCK_M):"]
        return self._band_loop(indent, "m", "start_n + BLOCK_N", None if b.lo is None else -b.lo,
                               "start_n", None if b.hi is None else -b.hi)

    def _band_loop(self, indent, rows, block_end, end_shift, start, start_shift) -> list[str]:
        what = "key" if rows == "n" else "query"
        L = [f"{indent}# the mask keeps {self.band}: {what} blocks wholly outside it are skipped",
             f"{indent}hi_{rows} = {'n_ctx' if end_shift is None else _end(block_end, end_shift)}"]
        if start_shift is None:
            L.append(f"{indent}lo_{rows} = 0")
        else:
            first = _plus(start, start_shift)
            L += [f"{indent}lo_{rows} = {first if start_shift >= 0 else f'tl.maximum({first}, 0)'}",
                  f"{indent}hi_{rows} = tl.where(lo_{rows} < hi_{rows}, hi_{rows}, 0)  # none in reach: no loop",
                  f"{indent}lo_{rows} = lo_{rows} // BLOCK_{rows.upper()} * BLOCK_{rows.upper()}"]
        L.append(f"{indent}for start_{rows} in range(lo_{rows}, hi_{rows}, BLOCK_{rows.upper()}):")
        return L

    def v_operand(self, dtype: str) -> str:
        return dot_operand(self.v, "KD", dtype)

    # -- kernels --------------------------------------------------------------------------------
    def fwd(self) -> list[str]:
        low = self.low
        tensors, rowvecs = self.io("_attn_fwd")
        L = ["@triton.jit"] + self.signature("_attn_fwd", tensors, rowvecs)
        L.append('    """One query block: stream over key blocks, O(BLOCK_M x BLOCK_D) state."""')
        L += self.head(tensors, rowvecs, "start_m = pid * BLOCK_M")
        L += self.q_block("    ", "start_m")
        emitted: set[str] = set()
        p_need = low.closure([a.text for s in self.pstmts for a in s.args] + self.p_qvars + self.p_kvars)
        L.append("    # query-side features")
        L += self.lines([s for s in p_need if s.kind[0] == "Q"], "    ", emitted=emitted)
        if self.softmax:
            L += ["    m_i = tl.full((BLOCK_M,), -float(\"inf\"), tl.float32)",
                  "    l_i = tl.zeros((BLOCK_M,), tl.float32)"]
        L.append("    acc_o = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)")
        L += self.key_loop("    ")
        L += self.k_block("        ", "start_n")
        L.append("        valid = m_mask[:, None] & key_ok[None, :]")
        L.append("        # key-side features")
        kneed = low.closure([s.var for s in p_need if s.kind[0] == "K"] + [self.v.text])
        L += self.lines([s for s in kneed if s.kind[0] == "K"], "        ")
        L.append(f"        # score tile{' (log2 units: log2(e) is folded into the scale)' if self.softmax else ''}")
        L += self.lines(self.pstmts, "        ")
        if self.softmax:
            L += [f"        z = tl.where(valid, {self.zt}, -float(\"inf\"))",
                  "        m_new = tl.maximum(m_i, tl.max(z, 1))",
                  "        m_use = tl.where(m_new == -float(\"inf\"), 0.0, m_new)",
                  "        alpha = tl.exp2(m_i - m_use)",
                  "        p = tl.exp2(z - m_use[:, None])",
                  "        l_i = l_i * alpha + tl.sum(p, 1)",
                  "        acc_o = acc_o * alpha[:, None]",
                  "        m_i = m_new"]
        else:
            L.append(f"        p = tl.where(valid, {self.zt}, 0.0)")
        L.append(f"        acc_o = tl.dot(p.to(W_DTYPE), {self.v_operand('W_DTYPE')}, acc_o, "
                 "input_precision=W_PREC)")
        if self.softmax:
            L += ["    l_safe = tl.where(l_i > 0, l_i, 1.0)",
                  "    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float(\"inf\"))  # log2 units",
                  "    tl.store(Lse_ptr + offs_m, lse, mask=m_mask)"]
            acc_text = "acc_o / l_safe[:, None]"
        else:
            acc_text = "acc_o"
        L.append("    # epilogue")
        epi = low.closure([self.out.text])
        L += self.lines([s for s in epi if s.kind[0] == "Q"], "    ", acc_text=acc_text, emitted=emitted)
        if self.plan.epilogue:
            L.append(f"    tl.store({self.tile('Acc', 'offs_m')}, {self.acc.text}, mask=q_tile_mask)")
        L.append(f"    tl.store({self.tile('Out', 'offs_m')}, {self.out.text}.to(Out_ptr.dtype.element_ty), "
                 "mask=q_tile_mask)")
        return L

    def acc_load(self) -> str:
        return f"tl.load({self.tile('Acc', 'offs_m')}, mask=q_tile_mask, other=0.0).to(tl.float32)"

    def dout_load(self) -> str:
        return f"tl.load({self.tile('DOut', 'offs_m')}, mask=q_tile_mask, other=0.0).to(tl.float32)"

    @property
    def has_pre(self) -> bool:
        """Whether the backward needs the pre-pass: dM through an epilogue, or the softmax's delta."""
        return self.plan.epilogue or self.softmax

    def dm_tensor(self) -> str:
        """Where the kernels read dM, the adjoint of M = W @ v': dOut itself, in its own dtype, when
        out = M; with an epilogue, the fp32 dM the pre-pass computes."""
        return "DAcc" if self.plan.epilogue else "DOut"

    def io(self, kernel: str) -> tuple[list[str], list[str]]:
        """(tensors, row vectors) a kernel takes, in parameter order."""
        if kernel == "_attn_fwd":
            return list(self.inputs) + ["Out", "Acc"], ["Lse"]
        if kernel == "_attn_bwd_pre":
            if self.plan.epilogue:
                return list(self.inputs) + ["Acc", "DOut", "DAcc"], (["Delta"] if self.softmax else [])
            return ["Acc", "DOut"], ["Delta"]
        if kernel == "_attn_bwd_dkv":
            return list(self.inputs) + [self.dm_tensor()] + [f"D{x}" for x in self.k_side], ["Delta", "Lse"]
        dm = ["Acc", "DOut", "DAcc"] if self.plan.epilogue else ["DOut"]
        return list(self.inputs) + dm + [f"D{x}" for x in self.q_side], ["Delta", "Lse"]

    def bwd_pre(self) -> list[str]:
        if not self.has_pre:
            return []
        low = self.low
        tensors, rowvecs = self.io("_attn_bwd_pre")
        L = ["@triton.jit"] + self.signature("_attn_bwd_pre", tensors, rowvecs)
        if not self.plan.epilogue:
            L.append('    """delta = rowsum(dOut * Out) (out = M: dM is dOut, read in its own dtype later)."""')
            L += self.head([], [], "start_m = pid * BLOCK_M")
            L += self.q_block("    ", "start_m")
            # each base pointer next to its load (set up first, they cost ptxas registers here)
            L.append("    o = tl.load(Acc_ptr + off_b * stride_accb + off_h * stride_acch"
                     f" + {self.tile('Acc', 'offs_m').split(' + ', 1)[1]}, mask=q_tile_mask, other=0.0)")
            L.append("    do = tl.load(DOut_ptr + off_b * stride_dob + off_h * stride_doh"
                     f" + {self.tile('DOut', 'offs_m').split(' + ', 1)[1]}, mask=q_tile_mask, other=0.0)")
            L.append("    delta = tl.sum(tl.where(q_tile_mask, o.to(tl.float32) * do.to(tl.float32), 0.0), 1)")
            L.append("    tl.store(Delta_ptr + off_hz.to(tl.int64) * n_ctx + offs_m, delta, mask=m_mask)")
            return L
        L.append('    """dM = dOut pulled back through the epilogue; delta = rowsum(dM * M)."""')
        L += self.head(tensors, rowvecs, "start_m = pid * BLOCK_M")
        L += self.q_block("    ", "start_m")
        epi = low.closure([self.out.text])
        L += self.lines([s for s in epi if s.kind[0] == "Q"], "    ", acc_text=self.acc_load())
        L.append(f"    g_out = {self.dout_load()}")
        rev = reverse_lines(low, {self.out.text: ["g_out"]}, {self.acc.text}, "    ", tag="e")
        L += rev.lines
        parts = rev.grads.get(self.acc.text)
        L.append(f"    d_acc = {' + '.join(parts) if parts else 'tl.zeros((BLOCK_M, BLOCK_D), tl.float32)'}")
        L.append(f"    tl.store({self.tile('DAcc', 'offs_m')}, d_acc, mask=q_tile_mask)")
        if self.softmax:
            L.append(f"    delta = tl.sum(tl.where(q_tile_mask, d_acc * {self.acc.text}, 0.0), 1)")
            L.append("    tl.store(Delta_ptr + offs_m, delta, mask=m_mask)")
        return L

    def _score_seed(self, indent: str) -> list[str]:
        """p and its score's adjoint g_z in this kernel's layout (transposed in dK/dV)."""
        row = "[None, :]" if self.t else "[:, None]"      # a per-query vector along the tile
        L = []
        if self.softmax:
            L += [f"{indent}z = tl.where(valid, {self.zt}, -float(\"inf\"))",
                  f"{indent}p = tl.exp2(z - lse{row})"]
        else:
            L.append(f"{indent}p = tl.where(valid, {self.zt}, 0.0)")
        if self.t:     # dP^T = v' dM^T
            L.append(f"{indent}dp = tl.dot({self.v_operand('DOT_DTYPE')}, tl.trans(d_acc.to(DOT_DTYPE)), "
                     "input_precision=DOT_PREC)")
        else:
            L.append(f"{indent}dp = tl.dot(d_acc.to(DOT_DTYPE), tl.trans({self.v_operand('DOT_DTYPE')}), "
                     "input_precision=DOT_PREC)")
        if self.softmax:
            # d/dz2 of softmax over z2 * ln 2 (the score z2 is in log2 units)
            L.append(f"{indent}g_z = tl.where(valid, p * (dp - delta{row}), 0.0) * LN2")
        else:
            L.append(f"{indent}g_z = tl.where(valid, dp, 0.0)")
        return L

    def _zeros(self, kind: str) -> str:
        shape = {"QD": "(BLOCK_M, BLOCK_D)", "KD": "(BLOCK_N, BLOCK_D)", "Q1": "(BLOCK_M,)",
                 "K1": "(BLOCK_N,)"}[kind]
        return f"tl.zeros({shape}, tl.float32)"

    def _row_stats(self, indent: str) -> list[str]:
        src = self.dm_tensor()
        note = "  # dM = dOut, in its own dtype" if src == "DOut" else "  # dM (fp32, through the epilogue)"
        L = [f"{indent}d_acc = tl.load({self.tile(src, 'offs_m')}, mask=q_tile_mask, other=0.0){note}"]
        if self.softmax:
            L += [f"{indent}delta = tl.load(Delta_ptr + offs_m, mask=m_mask, other=0.0)",
                  f"{indent}lse = tl.load(Lse_ptr + offs_m, mask=m_mask, other=float(\"inf\"))"]
        return L

    def _seed_for_z(self, g_z: str):
        """Seed on the score var: from the score tile's adjoint g_z, reduced to z's kind."""
        kind = self.z.kind
        if kind == "P":
            return g_z
        if kind in ("Q1", "K1"):
            return f"tl.sum({g_z}, {1 if (kind == 'Q1') != self.t else 0})"
        return None

    def _store_grad(self, x: str, parts, rows: str) -> str:
        value = " + ".join(parts) if parts else self._zeros("QD" if rows == "offs_m" else "KD")
        if rows == "offs_m":
            return f"    tl.store({self.tile('D' + x, rows)}, ({value}).to(D{x}_ptr.dtype.element_ty), " \
                   "mask=q_tile_mask)"
        # every in-bounds key row is written: padded rows get 0 (the buffer is not zeroed)
        return (f"    tl.store({self.tile('D' + x, rows)}, tl.where(k_tile_mask, {value}, 0.0)"
                f".to(D{x}_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])")

    def bwd_dkv(self) -> list[str]:
        low = self.low
        tensors, rowvecs = self.io("_attn_bwd_dkv")
        L = ["@triton.jit"] + self.signature("_attn_bwd_dkv", tensors, rowvecs)
        L.append('    """One key block, resident: accumulate dv\' and the key-side feature adjoints over all '
                 'query blocks.')
        L.append("    Score tiles are transposed, (BLOCK_N, BLOCK_M) = keys x queries: S^T = k' q'^T, so the")
        L.append('    products with the resident key-side tiles need no transposes."""')
        L += self.head(tensors, rowvecs, "start_n = pid * BLOCK_N")
        L += self.k_block("    ", "start_n")
        p_need = low.closure([a.text for s in self.pstmts for a in s.args] + self.p_qvars + self.p_kvars)
        kneed = low.closure([s.var for s in p_need if s.kind[0] == "K"] + [self.v.text])
        L.append("    # key-side features")
        L += self.lines([s for s in kneed if s.kind[0] == "K"], "    ")
        accs = [v for v in self.p_kvars if v in self.live]
        if self.v.text in self.live and self.v.text not in accs:
            accs.append(self.v.text)
        for v in accs:
            L.append(f"    ga_{v} = {self._zeros(low.by_var[v].kind)}")
        L += self.query_loop("    ")
        L += self.q_block("        ", "start_m")
        L.append("        valid = key_ok[:, None] & m_mask[None, :]   # keys x queries")
        L += self.lines([s for s in p_need if s.kind[0] == "Q"], "        ")
        L += self._row_stats("        ")
        L += self.lines(self.pstmts, "        ")
        L += self._score_seed("        ")
        if self.v.text in accs:
            v = self.v.text
            L.append(f"        ga_{v} = tl.dot(p.to(W_DTYPE), d_acc.to(W_DTYPE), ga_{v}, "
                     "input_precision=W_PREC)")
        kaccs = [v for v in accs if v in self.p_kvars]
        seed = self._seed_for_z("g_z")
        if kaccs and seed is not None:
            rev = reverse_lines(low, {self.z.text: [seed]}, set(kaccs), "        ", tag="s", t=True)
            L += rev.lines
            for v, parts in rev.grads.items():
                for p in parts:
                    L.append(f"        ga_{v} += {p}")
        # back through the key-side features to the inputs
        loads = {s.var: s for s in self.loads_k}
        rev = reverse_lines(low, {v: [f"ga_{v}"] for v in accs}, set(loads), "    ", tag="k")
        L += rev.lines
        for var, st in loads.items():
            L.append(self._store_grad(st.name, rev.grads.get(var), "offs_n"))
        return L

    def bwd_dq(self) -> list[str]:
        low = self.low
        tensors, rowvecs = self.io("_attn_bwd_dq")
        L = ["@triton.jit"] + self.signature("_attn_bwd_dq", tensors, rowvecs)
        L.append('    """One query block: accumulate the query-side feature adjoints over all key blocks."""')
        L += self.head(tensors, rowvecs, "start_m = pid * BLOCK_M")
        L += self.q_block("    ", "start_m")
        emitted: set[str] = set()
        L.append("    # query-side features")
        L += self.lines(self.qregion, "    ", emitted=emitted)
        seeds: dict[str, list[str]] = {}
        epi_wrt = {v for v in self.epi_qvars if v in self.live}
        if epi_wrt:
            L.append("    # epilogue adjoints of the query-side features")
            L += self.lines(self.epilogue, "    ", acc_text=self.acc_load(), emitted=emitted)
            L.append(f"    g_out = {self.dout_load()}")
            rev = reverse_lines(low, {self.out.text: ["g_out"]}, epi_wrt, "    ", tag="e")
            L += rev.lines
            for v, parts in rev.grads.items():
                seeds.setdefault(v, []).extend(parts)
        L += self._row_stats("    ")
        accs = [v for v in self.p_qvars if v in self.live]
        for v in accs:
            L.append(f"    ga_{v} = {self._zeros(low.by_var[v].kind)}")
            seeds.setdefault(v, []).append(f"ga_{v}")
        seed = self._seed_for_z("g_z")
        if accs and seed is not None:
            L += self.key_loop("    ")
            L += self.k_block("        ", "start_n")
            L.append("        valid = m_mask[:, None] & key_ok[None, :]")
            p_need = low.closure([a.text for s in self.pstmts for a in s.args] + self.p_kvars)
            kneed = low.closure([s.var for s in p_need if s.kind[0] == "K"] + [self.v.text])
            L += self.lines([s for s in kneed if s.kind[0] == "K"], "        ")
            L += self.lines(self.pstmts, "        ")
            L += self._score_seed("        ")
            rev = reverse_lines(low, {self.z.text: [seed]}, set(accs), "        ", tag="s")
            L += rev.lines
            for v, parts in rev.grads.items():
                for p in parts:
                    L.append(f"        ga_{v} += {p}")
        loads = {s.var: s for s in self.loads_q}
        rev = reverse_lines(low, seeds, set(loads), "    ", tag="q")
        L += rev.lines
        for var, st in loads.items():
            L.append(self._store_grad(st.name, rev.grads.get(var), "offs_m"))
        return L

    # -- module ---------------------------------------------------------------------------------
    def launch(self, indent: str, kernel: str, rows: str) -> list[str]:
        tensors, rowvecs = self.io(kernel)
        _, host = self.params(tensors, rowvecs, "dk_side" if rows == "n" else "dq_side")
        L = _wrap(host, indent + "        ", ")", first=f"{indent}args = (")
        L.append(f"{indent}_TUNER.launch({kernel}, args, consts, n=n_ctx, batch_heads=B * H, "
                 f"rows={rows!r}, dtype=DTYPE)")
        return L

    def host(self) -> list[str]:
        unpack = (", ".join(self.low.scalars.args) + ", = ") if self.low.scalars.args else ""
        scalars = [f"    {unpack}scalar_args(HEAD_DIM)"] if unpack else []
        if self.low.scalars.seq_args:
            scalars.append("    seq = sequence_scalars(ops.seq_lengths(mask, ref), HEAD_DIM)  # (B, k)")
        both = [x for x in self.inputs if x in self.q_side and x in self.k_side]
        L = [
            "def _setup(inputs, mask, allow_tf32):",
            '    """Sizes, the key padding mask as uint8 and the constexprs every kernel takes."""',
            "    ref = inputs[INPUTS[0]]",
            "    B, H, n_ctx, _ = ref.shape",
            "    has_mask = mask is not None",
            "    mask_arg = mask.to(torch.uint8).contiguous() if has_mask else ref",
            "    dot_dtype, dot_prec, w_dtype, w_prec = tune.dot_types(",
            "        DTYPE, allow_tf32=allow_tf32, weights_fit_fp16=WEIGHTS_FIT_FP16)",
            "    consts = dict(HAS_MASK=has_mask, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,",
            "                  DOT_DTYPE=getattr(tl, dot_dtype), DOT_PREC=dot_prec,",
            "                  W_DTYPE=getattr(tl, w_dtype), W_PREC=w_prec)",
            "    return ref, B, H, n_ctx, mask_arg, consts",
            "",
            "",
            "def attn_forward(inputs, mask, allow_tf32=False):",
            '    """inputs: {name: (B, H, n, d) tensor, any strides}; mask: (B, n) bool or None.',
            "    Returns (out, acc, lse): out in the layout of the first input; acc = W @ v' (fp32, only",
            "    with an epilogue, else out); lse: log2-sum-exp2 of the log2-unit score rows (softmax).\"\"\"",
            "    ref, B, H, n_ctx, mask_arg, consts = _setup(inputs, mask, allow_tf32)",
            *scalars,
            "    out = torch.empty_like(ref)",
            "    acc = torch.empty(ref.shape, device=ref.device, dtype=torch.float32) if EPILOGUE else out",
            "    lse = torch.empty((B * H, n_ctx), device=ref.device, dtype=torch.float32)",
        ]
        L += self.launch("    ", "_attn_fwd", "m")
        L += [
            "    return out, acc, lse",
            "",
            "",
            "def _grad_buffer(t, fp32):",
            '    """A gradient buffer in the layout of its input (every entry is written by a kernel)."""',
            "    return torch.empty_like(t, dtype=torch.float32 if fp32 else t.dtype)",
            "",
            "",
            "def attn_backward(inputs, mask, out, acc, lse, dout, allow_tf32=False):",
            '    """Gradients {name: tensor like the input} of sum(out * dout) w.r.t. the inputs;',
            "    dout may have any strides.\"\"\"",
            "    ref, B, H, n_ctx, mask_arg, consts = _setup(inputs, mask, allow_tf32)",
            *scalars,
            *(["    d_acc = torch.empty(ref.shape, device=ref.device, dtype=torch.float32)  # dM"]
              if self.plan.epilogue else []),
            "    delta = torch.empty((B * H, n_ctx), device=ref.device, dtype=torch.float32)",
        ]
        if self.has_pre:
            L += self.launch("    ", "_attn_bwd_pre", "m")
        fp32 = f"x in {tuple(both)!r}" if both else "False"
        L += [f"    dq_side = {{x: _grad_buffer(inputs[x], {fp32}) for x in Q_SIDE}}",
              f"    dk_side = {{x: _grad_buffer(inputs[x], {fp32}) for x in K_SIDE}}"]
        if self.k_side:
            L += self.launch("    ", "_attn_bwd_dkv", "n")
        if self.q_side:
            L += self.launch("    ", "_attn_bwd_dq", "m")
        L.append("    grads = {**dk_side, **dq_side}")
        if both:
            L += [f"    for x in {tuple(both)!r}:   # read at query and at key rows: two fp32 parts",
                  "        grads[x] = (dq_side[x] + dk_side[x]).to(inputs[x].dtype)"]
        L.append("    return grads")
        return L

    @property
    def dkv_gen(self) -> "_Gen":
        """The dK/dV kernel's generator: keys resident, scalars folded into k', score tiles
        transposed; it shares this one's scalars (one host computation for all kernels)."""
        if not hasattr(self, "_dkv"):
            self._dkv = _Gen(self.g, self.plan, fold="k", scalars=self.low.scalars)
        return self._dkv

    def module(self, *, formula: str, canonical: str, digest: str, dtype: str, head_dim: int) -> str:
        g, plan = self.g, self.plan
        low = self.low
        self.dkv_gen   # lowered before any kernel is printed: every scalar exists when signatures are
        header = [
            f"# Generated by attnc ({GEN_VERSION}) -- do not edit; regenerated from the formula.",
            f"# formula:   {' '.join(formula.split())}",
            f"# canonical: {canonical}",
            f"# hash: {digest}   dtype: {dtype}   head dim: {head_dim}",
            "# class: streaming",
        ]
        for kind, a, b in plan.pairwise:
            header.append(f"#   score leaf {kind}: q' = {render(g, a)};  k' = {render(g, b)}")
        header += [f"#   score z = {render(g, plan.score)}",
                   f"#   weights: {'softmax over j (online, exp2)' if self.softmax else 'z (no normalisation)'}",
                   f"#   v' = {render(g, plan.value)}",
                   f"#   out = {render(g, plan.output)}",
                   f"#   key blocks: {describe_band(g, plan)}",
                   f"#   weights in fp16 products: {describe_fit(self.fits)}"]
        band = None if self.band is None else (self.band.lo, self.band.hi)
        L = header + [
            '"""Fused streaming attention kernels for one formula (see the header)."""',
            "import math",
            "",
            "import torch",
            "import triton",
            "import triton.language as tl",
            "",
            "from attnc.compiler import torch_ops as ops",
            "from attnc.kernels import tune",
            "",
            f"INPUTS = {self.inputs!r}",
            f"Q_SIDE = {self.q_side!r}   # inputs read at query rows",
            f"K_SIDE = {self.k_side!r}   # inputs read at key rows",
            f"NORMALIZATION = {plan.normalization!r}",
            f"EPILOGUE = {plan.epilogue!r}",
            f"BAND = {band!r}   # (lo, hi): only keys with lo <= j - i <= hi are computed",
            f"WEIGHTS_FIT_FP16 = {self.fits!r}",
            f"DTYPE = {dtype!r}",
            f"HEAD_DIM = {head_dim}",
            f"BLOCK_D = {block_d(head_dim)}",
            "LN2 = tl.constexpr(0.6931471805599453)   # the softmax runs in log2 units (exp2)",
            "_TUNER = tune.Tuner(__file__)   # block configs: autotuned on a GPU, cached on disk",
            "",
            "",
            *_scalar_functions(low.scalars),
            *_HELPERS.strip("\n").split("\n"),
            "",
            "",
        ]
        for kernel in (self.fwd(), self.bwd_pre(), self.dkv_gen.bwd_dkv(), self.bwd_dq()):
            if kernel:
                L += kernel + ["", ""]
        L += self.host()
        return "\n".join(L) + "\n"


_STRIDE = {"Q": "q", "K": "k", "V": "v", "P": "p", "Out": "o", "Acc": "acc", "DOut": "do",
           "DAcc": "dacc", "DQ": "dq", "DK": "dk", "DV": "dv", "DP": "dp"}
_HOST = {"Q": 'inputs["Q"]', "K": 'inputs["K"]', "V": 'inputs["V"]', "P": 'inputs["P"]',
         "Out": "out", "Acc": "acc", "DOut": "dout", "DAcc": "d_acc"}
_GRADS = ("DQ", "DK", "DV", "DP")
_CONSTEXPRS = ("HAS_MASK", "HEAD_DIM", "BLOCK_D", "DOT_DTYPE", "DOT_PREC", "W_DTYPE", "W_PREC",
               "EVEN_M", "EVEN_N", "BLOCK_M", "BLOCK_N")


def _scalar_functions(scalars) -> list[str]:
    """The host functions computing the kernels' runtime scalars (none when there are none)."""
    L = []
    if scalars.args:
        L += ["def scalar_args(d):",
              '    """Scalars of the formula that depend on the head dim d (kernel arguments)."""',
              *scalars.host_lines,
              f"    return ({', '.join(scalars.args)}{',' if len(scalars.args) == 1 else ''})",
              "", ""]
    if scalars.seq_args:
        L += ["def sequence_scalars(n, d):",
              '    """Scalars of the formula that depend on n, each sequence\'s own length (its real tokens):',
              "    n is a (B,) float64 tensor; returns (B, k) float32, read by the kernels at their batch",
              '    row (Seq_ptr)."""',
              *scalars.seq_lines,
              f"    return torch.stack(({', '.join(scalars.seq_args)}{',' if len(scalars.seq_args) == 1 else ''}), 1)"
              ".to(torch.float32)",
              "", ""]
    return L


def _plus(x: str, c: int) -> str:
    return x if c == 0 else f"{x} + {c}" if c > 0 else f"{x} - {-c}"


def _end(block_end: str, c: int) -> str:
    """min(min(block_end, n_ctx) + c, n_ctx): one past the last row the band reaches from a block
    whose last row is min(block_end, n_ctx) - 1 (structure.key_block_range)."""
    if c <= 0:
        return _plus(f"tl.minimum({block_end}, n_ctx)", c)
    return f"tl.minimum({block_end} + {c}, n_ctx)"


def _wrap(items: list[str], indent: str, end: str, first: str | None = None, width: int = 100) -> list[str]:
    """Comma-separated `items` over lines of at most `width` characters, closed by `end`."""
    out = []
    line = first if first is not None else indent
    for i, a in enumerate(items):
        piece = a + (", " if i < len(items) - 1 else "")
        if len(line) + len(piece) > width and line.strip():
            out.append(line.rstrip())
            line = indent
        line += piece
    out.append(line.rstrip() + end)
    return out


def describe_band(g: nx.DiGraph, plan: StreamingPlan) -> str:
    """What the kernels skip: the band of the formula's mask, or why they skip nothing."""
    band = mask_band(g, plan)
    if band is not None:
        return f"only those meeting {band} ({band.kind} mask); the rest are skipped"
    conds = position_conditions(g, plan)
    if not conds:
        return "all (no causal or banded mask in the formula)"
    return (f"all: the mask {render(g, conds[0])} is not a band lo <= j - i <= hi of constant "
            "width that empties the weights, so no block can be skipped")


def describe_fit(fits: bool) -> str:
    if fits:
        return "yes (softmax or bounded weights)"
    return "no: the weights are unbounded, so fp16 inputs use fp32 (TF32) products for them"


def plan_inputs(g: nx.DiGraph, plan: StreamingPlan) -> tuple[str, ...]:
    """The inputs the fused kernels read (in Q K V P order)."""
    return _Gen(g, plan).inputs


def plan_sides(g: nx.DiGraph, plan: StreamingPlan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs read at query rows, inputs read at key rows) by the fused kernels."""
    gen = _Gen(g, plan)
    return gen.q_side, gen.k_side


def generate(g: nx.DiGraph, plan: StreamingPlan, *, formula: str, canonical: str, digest: str,
             dtype: str = "float32", head_dim: int = 64) -> str:
    """The Triton module (kernels + host launchers) for a streaming plan."""
    return _Gen(g, plan).module(formula=formula, canonical=canonical, digest=digest, dtype=dtype,
                                head_dim=head_dim)


__all__ = ["DTYPES", "GEN_VERSION", "MAX_HEAD_DIM", "block_d", "describe_band", "describe_fit",
           "generate", "literal", "plan_inputs", "plan_sides"]
