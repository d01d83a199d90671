"""Streaming plan -> readable Triton source: forward and backward kernels plus host launchers.

Kernels (grid: blocks of rows x batch*heads):

    _attn_fwd      per query block: q-side features once, then one pass over key blocks
                   (k-side features, score tile, online softmax or direct accumulation),
                   epilogue; saves the log-sum-exp (softmax) and, with an epilogue, M = W @ v'.
    _attn_bwd_pre  per query block: dM from dOut through the epilogue; delta = rowsum(dM * M).
    _attn_bwd_dkv  per key block: recompute the score tiles over all query blocks, accumulate
                   the adjoints of v' and of the key-side features, then back to K/V/Q/P.
    _attn_bwd_dq   per query block: the same over all key blocks for the query-side features.

Inputs used on both sides (K in softmax(Q @ softplus(K)^T) @ (K + Q)) get one gradient buffer
per side; the host launcher adds them.
"""
from __future__ import annotations

import networkx as nx
from attnc.compiler.ir import output_of

from .lower import TileLowering, Stmt, forward_lines, literal, reverse_lines, tile_mask
from .plan import StreamingPlan, render

GEN_VERSION = "triton-3"
DTYPES = ("float32", "float16", "bfloat16")
MAX_HEAD_DIM = 256

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
def _row_softmax(x, cols_ok):
    x = tl.where(cols_ok, x, -float("inf"))
    m = tl.max(x, 1)
    m = tl.where(m == -float("inf"), 0.0, m)
    e = tl.exp(x - m[:, None])
    s = tl.sum(e, 1)
    return e / tl.where(s > 0, s, 1.0)[:, None]
'''

_CONFIGS = '''
def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(kind):
    """Autotuning space on a GPU (pruned by head dim); one small config under the CPU interpreter.

    ATTNC_TRITON_AUTOTUNE=0 keeps only the first (default) config of each kernel: tests on a GPU
    use it so that every (formula, dtype, head dim) compiles one kernel variant, not dozens.
    """
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    big = BLOCK_D > 64
    if kind == "pre":
        space = [(64, 16, 4, 1), (128, 16, 4, 1), (128, 16, 8, 1)]
    elif kind == "fwd":
        space = ([(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)] if big else
                 [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (128, 128, 8, 3)])
    else:
        space = ([(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)] if big else
                 [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)])
    if os.environ.get("ATTNC_TRITON_AUTOTUNE", "1") == "0":
        space = space[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in space]
'''


def block_d(head_dim: int) -> int:
    b = 16
    while b < head_dim:
        b *= 2
    return b


class _Gen:
    def __init__(self, g: nx.DiGraph, plan: StreamingPlan):
        self.g = g
        self.plan = plan
        low = self.low = TileLowering(g, plan)
        self.out = low.val(output_of(g), "q")
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
        self.softmax = plan.normalization == "softmax"
        # a P-kind score is the usual case; a score without any key dependence is still a tile
        self.zt = self.z.text if self.z.kind == "P" else self._as_tile(self.z)

    def _order(self, var: str) -> int:
        return next(i for i, s in enumerate(self.low.stmts) if s.var == var)

    @staticmethod
    def _as_tile(v) -> str:
        if v.kind == "Q1":
            return f"tl.broadcast_to({v.text}[:, None], (BLOCK_M, BLOCK_N))"
        if v.kind == "K1":
            return f"tl.broadcast_to({v.text}[None, :], (BLOCK_M, BLOCK_N))"
        return f"tl.full((BLOCK_M, BLOCK_N), {v.text}, tl.float32)"

    # -- pieces ---------------------------------------------------------------------------------
    def leaf(self, st: Stmt, acc_text: str | None = None):
        if st.op == "load":
            if st.kind[0] == "Q":
                return f"tl.load({st.name}_ptr + q_offs, mask=q_tile_mask, other=0.0).to(tl.float32)"
            return f"tl.load({st.name}_ptr + k_offs, mask=k_tile_mask, other=0.0).to(tl.float32)"
        if st.op == "index":
            return f"{'offs_m' if st.kind[0] == 'Q' else 'offs_n'}.to(tl.float32)"
        if st.op == "acc":
            return acc_text
        raise AssertionError(st.op)  # pragma: no cover

    def lines(self, stmts, indent, acc_text=None, emitted=None):
        stmts = [s for s in stmts if emitted is None or s.var not in emitted]
        if emitted is not None:
            emitted.update(s.var for s in stmts)
        return forward_lines(stmts, indent, lambda st: self.leaf(st, acc_text))

    def signature(self, name: str, extra: list[str], block_n: bool = True) -> list[str]:
        ptrs = [f"{x}_ptr" for x in self.inputs] + ["Mask_ptr"] + extra
        scal = self.low.scalars.args
        args = ptrs + scal + ["stride_b", "stride_h", "stride_n", "stride_d", "stride_mb", "n_ctx", "H",
                              "HAS_MASK: tl.constexpr", "HEAD_DIM: tl.constexpr",
                              "BLOCK_D: tl.constexpr", "DOT_DTYPE: tl.constexpr",
                              "DOT_PREC: tl.constexpr", "BLOCK_M: tl.constexpr",
                              "BLOCK_N: tl.constexpr"]
        out = [f"def {name}("]
        line = "        "
        for a in args:
            piece = a + ", "
            if len(line) + len(piece) > 100:
                out.append(line.rstrip())
                line = "        "
            line += piece
        out.append(line.rstrip().rstrip(",") + "):")
        return out

    @staticmethod
    def q_block(indent: str, start: str) -> list[str]:
        return [f"{indent}offs_m = {start} + tl.arange(0, BLOCK_M)",
                f"{indent}m_mask = offs_m < n_ctx",
                f"{indent}q_offs = base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d",
                f"{indent}q_tile_mask = m_mask[:, None] & d_mask[None, :]"]

    @staticmethod
    def k_block(indent: str, start: str) -> list[str]:
        return [f"{indent}offs_n = {start} + tl.arange(0, BLOCK_N)",
                f"{indent}n_mask = offs_n < n_ctx",
                f"{indent}k_offs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d",
                f"{indent}key_ok = n_mask",
                f"{indent}if HAS_MASK:",
                f"{indent}    keep = tl.load(Mask_ptr + off_b * stride_mb + offs_n, mask=n_mask, other=0)",
                f"{indent}    key_ok = key_ok & (keep != 0)",
                f"{indent}# padded key rows load as 0 (never their stored values) and get no gradient",
                f"{indent}k_tile_mask = key_ok[:, None] & d_mask[None, :]"]

    @staticmethod
    def head(pid_rows: str) -> list[str]:
        return ["    pid = tl.program_id(0)",
                "    off_hz = tl.program_id(1)",
                "    off_b = off_hz // H",
                "    base = off_b.to(tl.int64) * stride_b + (off_hz % H).to(tl.int64) * stride_h",
                "    offs_d = tl.arange(0, BLOCK_D)",
                "    d_mask = offs_d < HEAD_DIM",
                f"    {pid_rows}"]

    def vmasked(self) -> str:
        return f"tl.where({tile_mask('KD')}, {self.v.text}, 0.0)"

    # -- kernels --------------------------------------------------------------------------------
    def fwd(self) -> list[str]:
        low = self.low
        extra = ["Out_ptr", "Acc_ptr", "Lse_ptr"]
        L = ["@triton.autotune(configs=_configs(\"fwd\"), key=[\"n_ctx\"])", "@triton.jit"]
        L += self.signature("_attn_fwd", extra)
        L.append('    """One query block: stream over key blocks, O(BLOCK_M x BLOCK_D) state."""')
        L += self.head("start_m = pid * BLOCK_M")
        L += self.q_block("    ", "start_m")
        emitted: set[str] = set()
        p_need = low.closure([a.text for s in self.pstmts for a in s.args] + self.p_qvars + self.p_kvars)
        L.append("    # query-side features")
        L += self.lines([s for s in p_need if s.kind[0] == "Q"], "    ", emitted=emitted)
        L += ["    m_i = tl.full((BLOCK_M,), -float(\"inf\"), tl.float32)",
              "    l_i = tl.zeros((BLOCK_M,), tl.float32)",
              "    acc_o = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)",
              "    for start_n in range(0, n_ctx, BLOCK_N):"]
        L += self.k_block("        ", "start_n")
        L.append("        valid = m_mask[:, None] & key_ok[None, :]")
        L.append("        # key-side features")
        kneed = low.closure([s.var for s in p_need if s.kind[0] == "K"] + [self.v.text])
        L += self.lines([s for s in kneed if s.kind[0] == "K"], "        ")
        L.append("        # score tile")
        L += self.lines(self.pstmts, "        ")
        if self.softmax:
            L += [f"        z = tl.where(valid, {self.zt}, -float(\"inf\"))",
                  "        m_new = tl.maximum(m_i, tl.max(z, 1))",
                  "        m_use = tl.where(m_new == -float(\"inf\"), 0.0, m_new)",
                  # exp2 with log2(e) applied in one fused multiply-add per score
                  "        alpha = tl.exp2((m_i - m_use) * LOG2E)",
                  "        p = tl.exp2(z * LOG2E - (m_use * LOG2E)[:, None])",
                  "        l_i = l_i * alpha + tl.sum(p, 1)",
                  "        acc_o = acc_o * alpha[:, None]",
                  "        m_i = m_new"]
        else:
            L.append(f"        p = tl.where(valid, {self.zt}, 0.0)")
        L.append(f"        acc_o += tl.dot(p.to(DOT_DTYPE), {self.vmasked()}.to(DOT_DTYPE), "
                 "input_precision=DOT_PREC)")
        if self.softmax:
            L += ["    l_safe = tl.where(l_i > 0, l_i, 1.0)",
                  "    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float(\"inf\"))",
                  "    tl.store(Lse_ptr + off_hz * n_ctx + offs_m, lse, mask=m_mask)"]
            acc_text = "acc_o / l_safe[:, None]"
        else:
            acc_text = "acc_o"
        L.append("    # epilogue")
        epi = low.closure([self.out.text])
        L += self.lines([s for s in epi if s.kind[0] == "Q"], "    ", acc_text=acc_text, emitted=emitted)
        if self.plan.epilogue:
            L.append(f"    tl.store(Acc_ptr + q_offs, {self.acc.text}, mask=q_tile_mask)")
        L.append(f"    tl.store(Out_ptr + q_offs, {self.out.text}.to(Out_ptr.dtype.element_ty), "
                 "mask=q_tile_mask)")
        return L

    def bwd_pre(self) -> list[str]:
        low = self.low
        extra = ["M_ptr", "DOut_ptr", "DAcc_ptr", "Delta_ptr"]
        L = ["@triton.autotune(configs=_configs(\"pre\"), key=[\"n_ctx\"])", "@triton.jit"]
        L += self.signature("_attn_bwd_pre", extra)
        L.append('    """dM = dOut pulled back through the epilogue; delta = rowsum(dM * M)."""')
        L += self.head("start_m = pid * BLOCK_M")
        L += self.q_block("    ", "start_m")
        acc_text = "tl.load(M_ptr + q_offs, mask=q_tile_mask, other=0.0).to(tl.float32)"
        epi = low.closure([self.out.text])
        L += self.lines([s for s in epi if s.kind[0] == "Q"], "    ", acc_text=acc_text)
        L.append("    g_out = tl.load(DOut_ptr + q_offs, mask=q_tile_mask, other=0.0).to(tl.float32)")
        rev = reverse_lines(low, {self.out.text: ["g_out"]}, {self.acc.text}, "    ", tag="e")
        L += rev.lines
        parts = rev.grads.get(self.acc.text)
        L.append(f"    d_acc = {' + '.join(parts) if parts else 'tl.zeros((BLOCK_M, BLOCK_D), tl.float32)'}")
        L.append("    tl.store(DAcc_ptr + q_offs, d_acc, mask=q_tile_mask)")
        if self.softmax:
            L.append(f"    delta = tl.sum(tl.where(q_tile_mask, d_acc * {self.acc.text}, 0.0), 1)")
            L.append("    tl.store(Delta_ptr + off_hz * n_ctx + offs_m, delta, mask=m_mask)")
        return L

    def _score_seed(self, indent: str) -> list[str]:
        L = []
        if self.softmax:
            L += [f"{indent}z = tl.where(valid, {self.zt}, -float(\"inf\"))",
                  f"{indent}p = tl.exp2(z * LOG2E - (lse * LOG2E)[:, None])"]
        else:
            L.append(f"{indent}p = tl.where(valid, {self.zt}, 0.0)")
        L.append(f"{indent}dp = tl.dot(d_acc.to(DOT_DTYPE), tl.trans({self.vmasked()}).to(DOT_DTYPE), "
                 "input_precision=DOT_PREC)")
        if self.softmax:
            L.append(f"{indent}g_z = tl.where(valid, p * (dp - delta[:, None]), 0.0)")
        else:
            L.append(f"{indent}g_z = tl.where(valid, dp, 0.0)")
        return L

    def _zeros(self, kind: str) -> str:
        shape = {"QD": "(BLOCK_M, BLOCK_D)", "KD": "(BLOCK_N, BLOCK_D)", "Q1": "(BLOCK_M,)",
                 "K1": "(BLOCK_N,)"}[kind]
        return f"tl.zeros({shape}, tl.float32)"

    def _row_stats(self, indent: str) -> list[str]:
        L = [f"{indent}d_acc = tl.load(DAcc_ptr + q_offs, mask=q_tile_mask, other=0.0)"]
        if self.softmax:
            L += [f"{indent}delta = tl.load(Delta_ptr + off_hz * n_ctx + offs_m, mask=m_mask, other=0.0)",
                  (f"{indent}lse = tl.load(Lse_ptr + off_hz * n_ctx + offs_m, mask=m_mask, "
                   "other=float(\"inf\"))")]
        return L

    def _seed_for_z(self, g_z: str):
        """Seed on the score var: from the (BLOCK_M, BLOCK_N) adjoint g_z, reduced to z's kind."""
        kind = self.z.kind
        if kind == "P":
            return g_z
        if kind == "Q1":
            return f"tl.sum({g_z}, 1)"
        if kind == "K1":
            return f"tl.sum({g_z}, 0)"
        return None

    def bwd_dkv(self) -> list[str]:
        low = self.low
        extra = ["DAcc_ptr", "Delta_ptr", "Lse_ptr"] + [f"D{x}_ptr" for x in self.k_side]
        L = ["@triton.autotune(configs=_configs(\"bwd\"), key=[\"n_ctx\"])", "@triton.jit"]
        L += self.signature("_attn_bwd_dkv", extra)
        L.append('    """One key block: accumulate dv\' and the key-side feature adjoints over all '
                 'query blocks."""')
        L += self.head("start_n = pid * BLOCK_N")
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
        L.append("    for start_m in range(0, n_ctx, BLOCK_M):")
        L += self.q_block("        ", "start_m")
        L.append("        valid = m_mask[:, None] & key_ok[None, :]")
        L += self.lines([s for s in p_need if s.kind[0] == "Q"], "        ")
        L += self._row_stats("        ")
        L += self.lines(self.pstmts, "        ")
        L += self._score_seed("        ")
        if self.v.text in accs:
            L.append(f"        ga_{self.v.text} += tl.dot(tl.trans(p).to(DOT_DTYPE), d_acc.to(DOT_DTYPE), "
                     "input_precision=DOT_PREC)")
        kaccs = [v for v in accs if v in self.p_kvars]
        seed = self._seed_for_z("g_z")
        if kaccs and seed is not None:
            rev = reverse_lines(low, {self.z.text: [seed]}, set(kaccs), "        ", tag="s")
            L += rev.lines
            for v, parts in rev.grads.items():
                for p in parts:
                    L.append(f"        ga_{v} += {p}")
        # back through the key-side features to the inputs
        loads = {s.var: s for s in self.loads_k}
        rev = reverse_lines(low, {v: [f"ga_{v}"] for v in accs}, set(loads), "    ", tag="k")
        L += rev.lines
        for var, st in loads.items():
            parts = rev.grads.get(var)
            if parts:
                L.append(f"    tl.store(D{st.name}_ptr + k_offs, {' + '.join(parts)}, mask=k_tile_mask)")
        return L

    def bwd_dq(self) -> list[str]:
        low = self.low
        extra = ["M_ptr", "DOut_ptr", "DAcc_ptr", "Delta_ptr", "Lse_ptr"] + [f"D{x}_ptr" for x in self.q_side]
        L = ["@triton.autotune(configs=_configs(\"bwd\"), key=[\"n_ctx\"])", "@triton.jit"]
        L += self.signature("_attn_bwd_dq", extra)
        L.append('    """One query block: accumulate the query-side feature adjoints over all key blocks."""')
        L += self.head("start_m = pid * BLOCK_M")
        L += self.q_block("    ", "start_m")
        emitted: set[str] = set()
        L.append("    # query-side features")
        L += self.lines(self.qregion, "    ", emitted=emitted)
        seeds: dict[str, list[str]] = {}
        epi_wrt = {v for v in self.epi_qvars if v in self.live}
        if epi_wrt:
            L.append("    # epilogue adjoints of the query-side features")
            acc_text = "tl.load(M_ptr + q_offs, mask=q_tile_mask, other=0.0).to(tl.float32)"
            L += self.lines(self.epilogue, "    ", acc_text=acc_text, emitted=emitted)
            L.append("    g_out = tl.load(DOut_ptr + q_offs, mask=q_tile_mask, other=0.0).to(tl.float32)")
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
            L.append("    for start_n in range(0, n_ctx, BLOCK_N):")
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
            parts = rev.grads.get(var)
            if parts:
                L.append(f"    tl.store(D{st.name}_ptr + q_offs, {' + '.join(parts)}, mask=q_tile_mask)")
        return L

    # -- module ---------------------------------------------------------------------------------
    def host(self, dtype: str, head_dim: int) -> list[str]:
        ins = ", ".join(f'inputs["{x}"]' for x in self.inputs)
        scal = "".join(f"{s}, " for s in self.low.scalars.args)
        common = "stride_b, stride_h, stride_n, stride_d, stride_mb, n_ctx, H"
        cexpr = ("HAS_MASK=has_mask, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, DOT_DTYPE=dot_dtype, "
                 "DOT_PREC=dot_prec")
        unpack = (", ".join(self.low.scalars.args) + ", = ") if self.low.scalars.args else ""
        dq_out = ", ".join(f'dq_side["{x}"]' for x in self.q_side)
        dk_out = ", ".join(f'dk_side["{x}"]' for x in self.k_side)
        L = [
            "def _setup(inputs, mask):",
            f'    ref = inputs["{self.inputs[0]}"]',
            "    B, H, n_ctx, d = ref.shape",
            "    stride_b, stride_h, stride_n, stride_d = ref.stride()",
            "    has_mask = mask is not None",
            "    mask_arg = mask.to(torch.uint8).contiguous() if has_mask else ref",
            "    stride_mb = mask_arg.stride(0) if has_mask else 0",
            "    lowp = ref.dtype in (torch.float16, torch.bfloat16)",
            "    if _interpreting() and ref.dtype == torch.bfloat16:",
            "        lowp = False  # the interpreter's bf16 tl.dot is not reliable",
            ("    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(ref.dtype) "
             "if lowp else tl.float32"),
            "    dot_prec = \"tf32\" if lowp else \"ieee\"",
            "    return (ref, B, H, n_ctx, d, stride_b, stride_h, stride_n, stride_d, has_mask, mask_arg,",
            "            stride_mb, dot_dtype, dot_prec)",
            "",
            "",
            "def attn_forward(inputs, mask):",
            '    """inputs: {name: contiguous (B, H, n, d) tensor}; mask: (B, n) bool or None.',
            "    Returns (out, m, lse): m = W @ v' (fp32, only with an epilogue), lse (fp32, softmax).\"\"\"",
            "    (ref, B, H, n_ctx, d, stride_b, stride_h, stride_n, stride_d, has_mask, mask_arg,",
            "     stride_mb, dot_dtype, dot_prec) = _setup(inputs, mask)",
            f"    {unpack}scalar_args(n_ctx, d)",
            "    out = torch.empty_like(ref)",
            "    m = torch.empty(ref.shape, device=ref.device, dtype=torch.float32) if EPILOGUE else out",
            "    lse = torch.empty((B * H, n_ctx), device=ref.device, dtype=torch.float32)",
            "    grid = lambda META: (triton.cdiv(n_ctx, META[\"BLOCK_M\"]), B * H)",
            f"    _attn_fwd[grid]({ins}, mask_arg, out, m, lse, {scal}{common},",
            f"                    {cexpr})",
            "    return out, m, lse",
            "",
            "",
            "def attn_backward(inputs, mask, out, m, lse, dout):",
            '    """Gradients {name: fp32 (B, H, n, d)} of sum(out * dout) w.r.t. the inputs."""',
            "    (ref, B, H, n_ctx, d, stride_b, stride_h, stride_n, stride_d, has_mask, mask_arg,",
            "     stride_mb, dot_dtype, dot_prec) = _setup(inputs, mask)",
            f"    {unpack}scalar_args(n_ctx, d)",
            "    dout = dout.contiguous()",
            "    d_acc = torch.empty(ref.shape, device=ref.device, dtype=torch.float32)",
            "    delta = torch.empty((B * H, n_ctx), device=ref.device, dtype=torch.float32)",
            "    grid_m = lambda META: (triton.cdiv(n_ctx, META[\"BLOCK_M\"]), B * H)",
            "    grid_n = lambda META: (triton.cdiv(n_ctx, META[\"BLOCK_N\"]), B * H)",
            f"    _attn_bwd_pre[grid_m]({ins}, mask_arg, m, dout, d_acc, delta, {scal}{common},",
            f"                          {cexpr})",
            "    dq_side = {x: torch.zeros(ref.shape, device=ref.device, dtype=torch.float32) for x in Q_SIDE}",
            "    dk_side = {x: torch.zeros(ref.shape, device=ref.device, dtype=torch.float32) for x in K_SIDE}",
        ]
        if self.k_side:
            L += [f"    _attn_bwd_dkv[grid_n]({ins}, mask_arg, d_acc, delta, lse, {dk_out}, {scal}{common},",
                  f"                          {cexpr})"]
        if self.q_side:
            L += [(f"    _attn_bwd_dq[grid_m]({ins}, mask_arg, m, dout, d_acc, delta, lse, {dq_out}, "
                   f"{scal}{common},"),
                  f"                         {cexpr})"]
        L += [
            "    grads = {}",
            "    for x in INPUTS:",
            "        parts = [s[x] for s in (dq_side, dk_side) if x in s]",
            "        grads[x] = parts[0] if len(parts) == 1 else parts[0] + parts[1]",
            "    return grads",
        ]
        return L

    def module(self, *, formula: str, canonical: str, digest: str, dtype: str, head_dim: int) -> str:
        g, plan = self.g, self.plan
        low = self.low
        scal_lines = low.scalars.host_lines or []
        scal_ret = ", ".join(low.scalars.args)
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
                   f"#   weights: {'softmax over j (online)' if self.softmax else 'z (no normalisation)'}",
                   f"#   v' = {render(g, plan.value)}",
                   f"#   out = {render(g, plan.output)}"]
        L = header + [
            '"""Fused streaming attention kernels for one formula (see the header)."""',
            "import math",
            "import os",
            "",
            "import torch",
            "import triton",
            "import triton.language as tl",
            "",
            "from attnc.compiler import torch_ops as ops",
            "",
            f"INPUTS = {self.inputs!r}",
            f"Q_SIDE = {self.q_side!r}   # inputs read at query rows",
            f"K_SIDE = {self.k_side!r}   # inputs read at key rows",
            f"NORMALIZATION = {plan.normalization!r}",
            f"EPILOGUE = {plan.epilogue!r}",
            f"DTYPE = {dtype!r}",
            f"HEAD_DIM = {head_dim}",
            f"BLOCK_D = {block_d(head_dim)}",
            "LOG2E = tl.constexpr(1.4426950408889634)   # exp(x) = exp2(x * log2(e))",
            "",
            "",
            "def scalar_args(n, d):",
            '    """Scalars of the formula that depend on the sizes n and d (kernel arguments)."""',
            *scal_lines,
            f"    return ({scal_ret}{',' if len(low.scalars.args) == 1 else ''})",
            "",
            *_CONFIGS.strip("\n").split("\n"),
            "",
            *_HELPERS.rstrip("\n").split("\n"),
            "",
            "",
        ]
        for kernel in (self.fwd(), self.bwd_pre(), self.bwd_dkv(), self.bwd_dq()):
            L += kernel + ["", ""]
        L += self.host(dtype, head_dim)
        return "\n".join(L) + "\n"


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


__all__ = ["DTYPES", "GEN_VERSION", "MAX_HEAD_DIM", "block_d", "generate", "literal", "plan_inputs",
           "plan_sides"]
