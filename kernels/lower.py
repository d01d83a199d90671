"""Lower a streaming plan into tile statements, and differentiate them (reverse mode).

Every value inside the fused kernel has a *kind*, the shape of the tile that holds it:

    S   scalar (a literal, or a runtime argument s0, s1, ... computed on the host from n and d)
    QD  (BLOCK_M, BLOCK_D) query-row tile      Q1  (BLOCK_M,) query-row feature
    KD  (BLOCK_N, BLOCK_D) key-row tile        K1  (BLOCK_N,) key-row feature
    P   (BLOCK_M, BLOCK_N) score tile

`TileLowering` turns IR nodes into a list of `Stmt` (one tile op each, in topological order):
elementwise ops directly, structural operations through their entry's `triton` lowering
(compiler/structural.py), which composes the tile vocabulary here (dot, rowsum, rowsoftmax,
safesqrt, where, elementwise ops);
`forward_expr` prints them as Triton; `reverse_lines` prints the adjoint code. Local
derivatives of the elementwise ops come from SymPy (`sympy.diff` of the op's definition,
printed as Triton by `TritonPrinter`); row reductions (row sum, row softmax over the head
dim) and the pairwise dot product have their vector-Jacobian products written out here.

Padded head-dim columns and padded / masked tokens may hold garbage in intermediate tiles:
they are masked (with tl.where, never by multiplication) wherever values are *consumed* across
lanes: row reductions, dot products, and stores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import networkx as nx
import sympy as sp
from attnc.compiler import elementwise, structural
from attnc.compiler import torch_ops as ops
from attnc.compiler.codegen_torch import op_expr
from attnc.compiler.elementwise import LogSigmoid, Relu, Sigmoid, Softplus, Step  # noqa: F401
from attnc.compiler.ir import GroupOp, Op, fn_op, is_fn, node_of


# ---- SymPy definitions of the elementwise ops ----------------------------------------------
# Elementwise functions come from the table (compiler/elementwise.py: `kernel_expr`, with the
# stable helper functions Sigmoid, Softplus, ... defined there); the structural helpers below
# exist only inside the kernels.

class SafeSqrtGrad(sp.Function):
    def fdiff(self, argindex=1):  # pragma: no cover - second derivatives are never taken
        raise NotImplementedError


class SafeSqrt(sp.Function):
    """sqrt(x) for x > 0, else 0, with a zero derivative there (compiler/structural.py `_safe_sqrt`)."""

    def fdiff(self, argindex=1):
        return SafeSqrtGrad(self.args[0])


class RowSoftmax1(sp.Function):
    """softmax over a single column: 1 (0 for -inf); derivative 0."""

    def fdiff(self, argindex=1):
        return sp.Integer(0)


def sym_op(op, args: list):
    """The SymPy expression of one elementwise op applied to `args`."""
    a = args[0]
    if is_fn(op):
        return elementwise.get(op.value).kernel_expr(a)
    b = args[1] if len(args) > 1 else None
    table = {
        Op.NEG: lambda: -a, Op.ADD: lambda: a + b, Op.SUB: lambda: a - b, Op.MUL: lambda: a * b,
        Op.DIV: lambda: a / b, Op.POW: lambda: a ** b, Op.MAX: lambda: sp.Max(a, b),
        Op.MIN: lambda: sp.Min(a, b), "safesqrt": lambda: SafeSqrt(a),
        "softmax1": lambda: RowSoftmax1(a),
    }
    return table[op]()


def sym_const(value: float):
    if float(value).is_integer() and abs(value) < 2 ** 31:
        return sp.Integer(int(value))
    return sp.Float(value, 17)


# ---- SymPy -> Triton printer ----------------------------------------------------------------

_FUNCS = {"exp": "tl.exp", "log": "tl.log", "Abs": "tl.abs", "sign": "_sign", "tanh": "_tanh",
          "Sigmoid": "_sigmoid", "Softplus": "_softplus", "LogSigmoid": "_logsigmoid",
          "Step": "_step", "SafeSqrt": "_safe_sqrt", "SafeSqrtGrad": "_safe_sqrt_grad",
          "Heaviside": "_heaviside", "Relu": "_relu", "RowSoftmax1": "_softmax1"}


def literal(value: float) -> str:
    if math.isnan(value):
        return 'float("nan")'
    if value in (math.inf, -math.inf):
        return 'float("inf")' if value > 0 else '-float("inf")'
    text = repr(float(value))
    return f"({text})" if value < 0 else text


def to_triton(expr, names: dict[str, str]) -> str:
    """Print a SymPy expression as a Triton expression; symbols are renamed through `names`."""
    if expr.is_Symbol:
        return names.get(expr.name, expr.name)
    if expr.is_number:
        return literal(float(expr))
    if expr.is_Add:
        terms = list(expr.as_ordered_terms())
        out = to_triton(terms[0], names)
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += f" - {to_triton(-t, names)}"
            else:
                out += f" + {to_triton(t, names)}"
        return f"({out})"
    if expr.is_Mul:
        coeff, rest = expr.as_coeff_Mul()
        num, den = [], []
        for f in sp.Mul.make_args(rest):
            if f.is_Pow and f.exp.is_number and f.exp < 0:
                den.append(f.base ** (-f.exp))
            else:
                num.append(f)
        parts = ([] if coeff == 1 else [literal(float(coeff))]) + [to_triton(f, names) for f in num]
        text = " * ".join(parts) if parts else "1.0"
        if den:
            text = f"{text} / ({' * '.join(to_triton(f, names) for f in den)})"
        return f"({text})"
    if expr.is_Pow:
        base = to_triton(expr.base, names)
        e = expr.exp
        if e.is_number:
            ev = float(e)
            if ev.is_integer() and 1 <= abs(ev) <= 8:
                prod = " * ".join([base] * int(abs(ev)))
                return f"({prod})" if ev > 0 else f"(1.0 / ({prod}))"
            if ev == 0.5:
                return f"tl.sqrt({base})"
            if ev == -0.5:
                return f"(1.0 / tl.sqrt({base}))"
            return f"_pow({base}, {literal(ev)})"
        return f"_pow({base}, {to_triton(e, names)})"
    if isinstance(expr, (sp.Max, sp.Min)):
        fn = "tl.maximum" if isinstance(expr, sp.Max) else "tl.minimum"
        # tensor operands first: tl.maximum(python float, tensor) is not reliable
        args = [to_triton(a, names) for a in sorted(expr.args, key=lambda a: bool(a.is_number))]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out
    if isinstance(expr, sp.Heaviside):
        return f"_heaviside({to_triton(expr.args[0], names)})"
    if expr.is_Function:
        name = type(expr).__name__
        if name in _FUNCS:
            return f"{_FUNCS[name]}({', '.join(to_triton(a, names) for a in expr.args)})"
    raise NotImplementedError(f"cannot print {expr!r} as Triton")  # pragma: no cover


def _op_key(op):
    """A cache key for `_derivative`: an elementwise function with its current definition (a
    name can be unregistered and registered again with another)."""
    return (op, elementwise.get(op.value)) if is_fn(op) else (op, None)


@lru_cache(maxsize=4096)
def _derivative(op_key, arg_keys: tuple, wrt: int):
    """d op(args) / d args[wrt] as a SymPy expression over the arg symbols and O (the output)."""
    args = [sp.Symbol(k, real=True) if isinstance(k, str) else sym_const(k) for k in arg_keys]
    f = sym_op(op_key[0], args)
    d = sp.diff(f, args[wrt])
    if f.is_Function or f.is_Pow:
        d = d.subs(f, sp.Symbol("O__", real=True))
    return d


# ---- tile statements ------------------------------------------------------------------------

@dataclass(frozen=True)
class Val:
    text: str            # a variable name, a literal, or a runtime scalar name
    kind: str            # S QD Q1 KD K1 P
    is_bool: bool = False
    value: float | None = None   # for literal scalars
    raw: bool = False            # a loaded input: `{text}_in` holds it in the input dtype

    @property
    def scalar(self) -> bool:
        return self.kind == "S"


@dataclass
class Stmt:
    var: str
    kind: str
    op: object            # an Op, or one of: load index acc rowsum rowsoftmax dot round where
    args: tuple = ()
    is_bool: bool = False
    name: str | None = None      # input name for loads
    note: str = ""               # comment


def join_kinds(kinds) -> str:
    ks = {k for k in kinds if k != "S"}
    if not ks:
        return "S"
    if "P" in ks or (ks & {"QD", "Q1"} and ks & {"KD", "K1"}):
        return "P"
    side = "Q" if ks & {"QD", "Q1"} else "K"
    return side + ("D" if ks & {"QD", "KD"} else "1")


# A score tile (kind P) is (BLOCK_M, BLOCK_N), queries x keys, or transposed, (BLOCK_N, BLOCK_M):
# the dK/dV kernel computes S^T = K' Q'^T, so that its products with the resident key-side
# tiles need no transposes (FlashAttention-2's backward). `t` below is that layout.

def tile_shape(kind: str, t: bool = False) -> str:
    if kind == "P":
        return "(BLOCK_N, BLOCK_M)" if t else "(BLOCK_M, BLOCK_N)"
    return {"QD": "(BLOCK_M, BLOCK_D)", "KD": "(BLOCK_N, BLOCK_D)", "Q1": "(BLOCK_M,)",
            "K1": "(BLOCK_N,)"}[kind]


def tile_bcast(v: Val, to: str, t: bool = False) -> str:
    """Text of `v` broadcast to a tile of kind `to` (a score tile transposed when `t`)."""
    if v.kind == to or v.scalar:
        return v.text
    if v.kind in ("Q1", "K1") and to in ("QD", "KD"):
        return f"{v.text}[:, None]"
    if v.kind in ("Q1", "K1") and to == "P":
        return f"{v.text}[:, None]" if (v.kind == "Q1") != t else f"{v.text}[None, :]"
    raise ValueError(f"cannot broadcast {v.kind} to {to}")  # pragma: no cover


BLOCK_OF = {"Q": "BLOCK_M", "K": "BLOCK_N"}
ROWS_OF = {"Q": "offs_m", "K": "offs_n"}


def reduce_to(expr: str, frm: str, to: str, t: bool = False) -> str:
    """Sum a contribution of kind `frm` down to kind `to` (the adjoint of a broadcast)."""
    if frm == to:
        return expr
    if frm in ("QD", "KD") and to == frm[0] + "1":
        return f"tl.sum(tl.where(d_mask[None, :], {expr}, 0.0), 1)"
    if frm == "P" and to in ("Q1", "K1"):
        axis = 1 if (to == "Q1") != t else 0
        return f"tl.sum(tl.where(valid, {expr}, 0.0), {axis})"
    raise ValueError(f"cannot reduce {frm} to {to}")  # pragma: no cover


def full(expr: str, kind: str, t: bool = False) -> str:
    """`expr` (maybe smaller) as a full tile of `kind` (adjoint invariant: full shapes)."""
    return f"tl.broadcast_to({expr}, {tile_shape(kind, t)})"


def tile_mask(kind: str) -> str:
    # key rows use key_ok (in bounds and not padded): padded K / V / P rows are never read, so
    # inf or NaN written there cannot reach a product with a real row (issue 11)
    side = kind[0]
    return f"{'m_mask' if side == 'Q' else 'key_ok'}[:, None] & d_mask[None, :]"


class ScalarTable:
    """Scalar sub-expressions: folded to literals, or computed on the host (Python text written by
    the PyTorch backend's printer, compiler/codegen_torch.op_expr). Those of constants and the head
    dim d are Python floats passed to every kernel (`args`, `host_lines`); those that depend on n,
    each sequence's own length, are (B,) float64 tensors over n = torch_ops.seq_lengths (`seq_args`,
    `seq_lines`), which the kernels read at their batch row."""

    def __init__(self, g: nx.DiGraph):
        self.g = g
        self.values: dict = {}       # key -> Val
        self.host_lines: list[str] = []
        self.args: list[str] = []    # runtime scalar names passed to kernels
        self.seq_lines: list[str] = []
        self.seq_args: list[str] = []   # per-sequence scalars, read from one (B, k) tensor
        self._tmp: dict = {}
        self._count = 0

    def get(self, nid: int) -> Val:
        key = ("node", nid)
        if key not in self.values:
            self.values[key] = self._val(*self._host(nid))
        return self.values[key]

    def rsqrt(self, dim) -> Val:
        key = ("rsqrt", dim)
        if key not in self.values:
            if dim == 1:
                self.values[key] = Val(literal(1.0), "S", value=1.0)
            else:
                seq = dim == "n"
                sqrt = _expr(fn_op("sqrt"), [(dim, seq)], seq)
                self.values[key] = self._val(_expr(Op.DIV, [("1.0", False), (sqrt, seq)], seq), None, seq)
        return self.values[key]

    def literal(self, value: float) -> Val:
        return Val(literal(value), "S", value=float(value))

    def combine(self, factors: tuple) -> Val:
        """The product of scalar factors, each (Op.MUL or Op.DIV, item) with item ("node", nid)
        or ("lit", value): one literal, or one runtime scalar computed on the host."""
        key = ("combine", factors)
        if key not in self.values:
            text, value, seq = None, 1.0, False
            for op, item in factors:
                t, v, sq = self._item(item)
                if text is None and op is Op.MUL:
                    text = t
                else:
                    text = _expr(op, [(text or "1.0", seq), (t, sq)], seq or sq)
                seq = seq or sq
                value = _fold(op, [value, v]) if value is not None and v is not None else None
            self.values[key] = self._val(text, value, seq)
        return self.values[key]

    def _item(self, item):
        kind, x = item
        if kind == "node":
            return self._host(x)
        return _py_float(x), float(x), False

    def _val(self, text: str, value, seq: bool = False) -> Val:
        if value is not None:
            return Val(literal(value), "S", value=float(value))
        name = f"s{self._count}"
        self._count += 1
        (self.seq_lines if seq else self.host_lines).append(f"    {name} = {text}")
        (self.seq_args if seq else self.args).append(name)
        return Val(name, "S")

    def _host(self, nid: int):
        """(python text over n, d and host temporaries, folded value or None, depends on n)."""
        if nid in self._tmp:
            return self._tmp[nid]
        node = node_of(self.g, nid)
        op = node.op
        if op is Op.CONST:
            res = (_py_float(node.value), float(node.value), False)
        elif op is Op.SYMBOL:
            res = (node.name, None, node.name == "n")
        else:
            args = [self._host(o) for o in node.operands]
            if all(v is not None for _, v, _ in args):
                value = _fold(op, [v for _, v, _ in args])
                res = (_py_float(value), value, False)
            else:
                seq = any(sq for _, _, sq in args)
                res = (_expr(op, [(t, sq) for t, _, sq in args], seq), None, seq)
        self._tmp[nid] = res
        return res


def _expr(op, args: list[tuple[str, bool]], seq: bool) -> str:
    """Host text of `op` on (text, per-sequence) operands: the PyTorch backend's scalar forms, or
    its tensor forms on the per-sequence (B,) tensors of n."""
    shapes = [(1, 1) if sq else () for _, sq in args]
    return op_expr(op, [t for t, _ in args], shapes, "n")


def _fold(op, values: list):
    """`op` on Python floats (a scalar both of whose operands are known)."""
    if is_fn(op):
        return elementwise.get(op.value).scalar_fn()(*values)
    return _FOLD[op](*values)


def _py_float(value: float) -> str:
    """A float as Python source (inf and nan included)."""
    value = float(value)
    if math.isfinite(value):
        return repr(value)
    return f'float("{value}")' if value == value else 'float("nan")'


_FOLD = {
    Op.NEG: lambda a: -a, Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b, Op.DIV: ops.s_div, Op.POW: ops.s_pow, Op.MAX: max, Op.MIN: min,
    Op.LT: lambda a, b: a < b, Op.LE: lambda a, b: a <= b, Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b, Op.EQ: lambda a, b: a == b, Op.NE: lambda a, b: a != b,
    Op.AND: lambda a, b: a and b, Op.OR: lambda a, b: a or b, Op.NOT: lambda a: not a,
    Op.WHERE: lambda c, a, b: a if c else b,
}


class TileLowering:
    """IR nodes of a streaming plan -> tile statements, per side (q rows, k rows, score tile)."""

    def __init__(self, g: nx.DiGraph, plan, fold: str = "q", scalars: ScalarTable | None = None):
        """fold: the side ("q" or "k") that scalar factors of a product are folded into, the side
        whose tiles a kernel holds for its whole loop (queries in the forward and dQ kernels, keys
        in dK/dV). `scalars` may be shared between the lowerings of one module."""
        self.g = g
        self.plan = plan
        self.fold = fold
        self.stmts: list[Stmt] = []
        self.by_var: dict[str, Stmt] = {}
        self.memo: dict = {}
        self.scalars = scalars if scalars is not None else ScalarTable(g)
        self._n = 0

    # -- building ------------------------------------------------------------------------------
    def add(self, kind: str, op, args: tuple, *, is_bool=False, name=None, note="", prefix=None) -> Val:
        prefix = prefix or {"Q": "q", "K": "k", "P": "p"}[kind[0]]
        var = f"{prefix}{self._n}"
        self._n += 1
        st = Stmt(var, kind, op, tuple(args), is_bool, name, note)
        self.stmts.append(st)
        self.by_var[var] = st
        return Val(var, kind, is_bool)

    def ew(self, op, args, note="") -> Val:
        kind = join_kinds(a.kind for a in args)
        return self.add(kind, op, args, note=note)

    def val(self, nid: int, side: str) -> Val:
        key = (nid, side)
        if key not in self.memo:
            self.memo[key] = self._lower(nid, side)
        return self.memo[key]

    def _kind(self, shape, side: str) -> str:
        if side == "p":
            return "P"
        feat = shape[1] if shape[0] == "n" else shape[0]
        return side.upper() + ("D" if feat == "d" else "1")

    def _lower(self, nid: int, side: str) -> Val:
        g = self.g
        node = node_of(g, nid)
        shape, op = node.shape, node.op
        if shape == ():
            return self.scalars.get(nid)
        if side == "p" and shape == ("n", 1):
            return self.val(nid, "q")
        if side == "p" and shape == (1, "n"):
            return self.val(nid, "k")
        note = f"{op.value} {shape}"
        if nid == self.plan.matmul:
            return self.add("QD", "acc", (), note="W @ v'", prefix="q")
        kind = self._kind(shape, side)
        if op is Op.INPUT:
            v = self.add(kind, "load", (), name=node.name, note=f"{node.name}")
            return Val(v.text, v.kind, raw=True)
        if op is Op.INDEX:
            return self.add(kind, "index", (), note=f"position {node.name}")
        spec = structural.get(op)
        if spec is not None and not spec.tile_operands:    # transpose: a view of its operand
            return spec.triton(self, node, side, None, note)
        args = [self.val(o, side) for o in node.operands]
        if op in GroupOp.Boolean:
            return self.add(join_kinds(a.kind for a in args), op, args, is_bool=True, note=note)
        if op in (Op.MUL, Op.DIV) and side == "p" and self._scalar_factor(nid) is not None \
                and self._reaches_dot(self._scalar_factor(nid)[0]):
            # (q' @ k'^T) * s  ->  (q' * s) @ k'^T: the scalar scales q' once per query tile
            other, factor = self._scalar_factor(nid)
            return self.scaled(other, side, (factor,))
        if op in GroupOp.Unary or op in GroupOp.Binary or is_fn(op):
            return self.ew(op, args, note)
        if spec is not None:     # matmul, softmax, cos, where, ...: its entry's tile lowering
            return spec.triton(self, node, side, args, note)
        raise NotImplementedError(op)  # pragma: no cover - classify() rejects the rest

    # -- scalar factors pushed into q' ------------------------------------------------------------
    def _scalar_factor(self, nid: int):
        """(tile operand, (op, ("node", scalar))) when `nid` is x * s, s * x or x / s."""
        node = node_of(self.g, nid)
        if node.op not in (Op.MUL, Op.DIV) or node.shape == ():
            return None
        a, b = node.operands
        sa, sb = (node_of(self.g, o).shape == () for o in (a, b))
        if sb and not sa:
            return a, (node.op, ("node", b))
        if sa and not sb and node.op is Op.MUL:
            return b, (Op.MUL, ("node", a))
        return None

    def _single_use_product(self, nid: int) -> bool:
        node = node_of(self.g, nid)
        if node.op is not Op.MATMUL or node.shape != ("n", "n"):
            return False
        uses = sum(list(node_of(self.g, s).operands).count(nid) for s in self.g.successors(nid))
        return uses == 1

    def _reaches_dot(self, nid: int) -> bool:
        """Whether scalar factors on `nid` can be pushed down to a pairwise product."""
        node = node_of(self.g, nid)
        if self._single_use_product(nid):
            return True
        if node.op is Op.NEG:
            return self._reaches_dot(node.operands[0])
        f = self._scalar_factor(nid)
        return f is not None and self._reaches_dot(f[0])

    def scaled(self, nid: int, side: str, factors: tuple, spread: bool = False) -> Val:
        """`nid` times the scalar `factors`, pushed down to the pairwise product where possible so
        that they scale q' once per query tile rather than every score. spread=True also pushes
        them through +, - and where (the softmax score times log2(e))."""
        if not factors:
            return self.val(nid, side)
        key = (nid, side, factors, spread)
        if key in self.memo:
            return self.memo[key]
        g = self.g
        node = node_of(g, nid)
        op = node.op
        res = None
        if node.shape == ():
            res = self.scalars.combine(((Op.MUL, ("node", nid)),) + factors)
        elif self._scalar_factor(nid) is not None:
            other, factor = self._scalar_factor(nid)
            res = self.scaled(other, side, (factor,) + factors, spread)
        elif op is Op.NEG:
            res = self.scaled(node.operands[0], side, ((Op.MUL, ("lit", -1.0)),) + factors, spread)
        elif self._single_use_product(nid):
            a, b = self.val(node.operands[0], "q"), self.val(node.operands[1], "k")
            s = self.scalars.combine(factors)
            if self.fold == "k":
                res = self.pdot(a, self.ew(Op.MUL, [b, s], "k' scaled once per key block"),
                                f"{op.value} {node.shape}")
            elif a.raw and a.kind == "QD":
                # q' as loaded goes to the product straight from memory (a Hopper wgmma reads it
                # from shared memory, not registers): the scale multiplies the score instead
                res = self.ew(Op.MUL, [self.pdot(a, b, f"{op.value} {node.shape}"), s],
                              "scaled score (q' as loaded)")
            else:
                res = self.pdot(self.ew(Op.MUL, [a, s], "q' scaled once per tile"), b,
                                f"{op.value} {node.shape}")
        elif spread and op in (Op.ADD, Op.SUB):
            xs = [self.scaled(o, side, factors, spread) for o in node.operands]
            res = self.ew(op, xs, f"{op.value} {node.shape}")
        elif spread and op is Op.WHERE:
            c = self.val(node.operands[0], side)
            a, b = (self.scaled(o, side, factors, spread) for o in node.operands[1:])
            res = self.add(join_kinds(x.kind for x in (c, a, b)), "where", [c, a, b],
                           note=f"where {node.shape}")
        else:
            res = self.ew(Op.MUL, [self.val(nid, side), self.scalars.combine(factors)])
        self.memo[key] = res
        return res

    def rounded(self, x: Val) -> Val:
        """x as the dot product sees it (rounded to DOT_DTYPE); a loaded input already is."""
        if x.raw:
            return x
        return self.add(x.kind, "round", [x], note="rounded like the dot operand")

    def sqnorm(self, x: Val) -> Val:
        sq = self.ew(Op.MUL, [x, x])
        if x.kind in ("Q1", "K1"):
            return sq
        return self.add(x.kind[0] + "1", "rowsum", [sq])

    def pdot(self, a: Val, b: Val, note="") -> Val:
        if a.kind == "QD" and b.kind == "KD":
            return self.add("P", "dot", [a, b], note=note)
        return self.ew(Op.MUL, [a, b], note)

    # -- queries -------------------------------------------------------------------------------
    def closure(self, targets) -> list[Stmt]:
        """The statements `targets` (var names) depend on, in order."""
        need: set[str] = set()
        stack = [t for t in targets if t in self.by_var]
        while stack:
            v = stack.pop()
            if v in need:
                continue
            need.add(v)
            stack.extend(a.text for a in self.by_var[v].args if a.text in self.by_var)
        return [s for s in self.stmts if s.var in need]


# ---- printing -------------------------------------------------------------------------------

def _arg_key(a: Val):
    if a.scalar and a.value is not None:
        return a.value
    return a.text


def dot_operand(x: Val, kind: str, dtype: str = "DOT_DTYPE") -> str:
    """A (BLOCK, BLOCK_D) tile as a tl.dot operand: a loaded input goes in its own dtype (its
    masked lanes loaded as 0); a computed tile is masked (padded lanes may hold anything)."""
    if x.raw:
        return f"{x.text}_in.to({dtype})"
    return f"tl.where({tile_mask(kind)}, {x.text}, 0.0).to({dtype})"


def forward_expr(st: Stmt, t: bool = False) -> str:
    """The Triton expression of one statement (score tiles transposed when `t`)."""
    op, args, kind = st.op, st.args, st.kind
    if op == "rowsum":
        return f"tl.sum(tl.where(d_mask[None, :], {args[0].text}, 0.0), 1)"
    if op == "rowsoftmax":
        return f"_row_softmax({args[0].text}, d_mask[None, :])"
    if op == "dot":
        a, b = args
        if t:     # S^T = k' q'^T
            return (f"tl.dot({dot_operand(b, 'KD')}, tl.trans({dot_operand(a, 'QD')}), "
                    "input_precision=DOT_PREC)")
        return (f"tl.dot({dot_operand(a, 'QD')}, tl.trans({dot_operand(b, 'KD')}), "
                "input_precision=DOT_PREC)")
    if op == "round":
        return f"{args[0].text}.to(DOT_DTYPE).to(tl.float32)"
    if op == "where":
        c, a, b = (tile_bcast(x, kind, t) for x in args)
        return f"tl.where({c}, {a}, {b})"
    if isinstance(op, Op) and op in GroupOp.Boolean:
        xs = [tile_bcast(x, kind, t) for x in args]
        if op is Op.NOT:
            return f"~({xs[0]})"
        sym = {Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
               Op.AND: "&", Op.OR: "|"}[op]
        return f"({xs[0]} {sym} {xs[1]})"
    # elementwise, through SymPy
    keys = tuple(_arg_key(a) for a in args)
    syms = [sp.Symbol(k, real=True) if isinstance(k, str) else sym_const(k) for k in keys]
    names = {a.text: tile_bcast(a, kind, t) for a in args if not a.scalar}
    expr = sym_op(op, syms)
    if not (expr.free_symbols & {s for s, a in zip(syms, args) if not a.scalar}):
        # the op cancelled its tile operands (x - x): still a full tile
        return f"tl.full({tile_shape(kind, t)}, {to_triton(expr, names)}, tl.float32)"
    return to_triton(expr, names)


@dataclass
class Reverse:
    lines: list[str] = field(default_factory=list)
    grads: dict[str, list[str]] = field(default_factory=dict)   # wrt var -> contributions


def reverse_lines(low: TileLowering, seeds: dict[str, list[str]], wrt: set[str], indent: str,
                  tag: str = "", t: bool = False) -> Reverse:
    """Adjoint code: propagate `seeds` (var -> adjoint expressions) back to the `wrt` vars.

    Statements not on a path from a wrt var to a seeded var are skipped. Returns the printed
    lines and, for each wrt var, the list of contribution expressions (full tiles).
    """
    by_var = low.by_var
    # forward reachability from wrt
    desc: set[str] = set(wrt)
    for st in low.stmts:
        if any(a.text in desc for a in st.args) and not st.is_bool:
            desc.add(st.var)
    # backward reachability from seeds
    anc: set[str] = set()
    stack = [s for s in seeds]
    while stack:
        v = stack.pop()
        if v in anc:
            continue
        anc.add(v)
        if v in by_var:
            stack.extend(a.text for a in by_var[v].args)
    active = desc & anc
    contribs: dict[str, list[str]] = {v: list(exprs) for v, exprs in seeds.items() if v in active}
    res = Reverse()
    for st in reversed(low.stmts):
        if st.var not in active or st.var in wrt or st.var not in contribs:
            continue
        g = f"g{tag}_{st.var}"
        parts = contribs[st.var]
        res.lines.append(f"{indent}{g} = {parts[0]}")
        for p in parts[1:]:
            res.lines.append(f"{indent}{g} = {g} + {p}")
        for a, expr in _vjp(st, g, t):
            if a.text in active:
                contribs.setdefault(a.text, []).append(expr)
    for st in low.stmts:   # in statement order, not set order: the source is the same in every process
        if st.var in wrt and st.var in contribs:
            res.grads[st.var] = contribs[st.var]
    return res


def _vjp(st: Stmt, g: str, t: bool = False):
    """(arg, contribution text) for each differentiable argument of `st`, given adjoint `g`."""
    op, args, kind = st.op, st.args, st.kind
    seen: set[str] = set()
    diff_args = []
    for a in args:
        if a.scalar or a.is_bool or a.text in seen:
            continue
        seen.add(a.text)
        diff_args.append(a)
    if op in ("load", "index", "acc") or st.is_bool:
        return []
    if op == "rowsum":
        (a,) = diff_args
        return [(a, full(f"{g}[:, None]", a.kind))]
    if op == "round":   # straight through: d round(x) / dx = 1
        (a,) = diff_args
        return [(a, g)]
    if op == "rowsoftmax":
        (a,) = diff_args
        o = st.var
        return [(a, f"{o} * ({g} - tl.sum(tl.where(d_mask[None, :], {g} * {o}, 0.0), 1)[:, None])")]
    if op == "dot":
        # score adjoints are weights-like tiles: W_DTYPE keeps unbounded ones out of fp16
        a, b = args
        gm = f"tl.where(valid, {g}, 0.0).to(W_DTYPE)"
        out = []
        g_qk, g_kq = (f"tl.trans({gm})", gm) if t else (gm, f"tl.trans({gm})")
        for x in diff_args:
            if x is a or x.text == a.text:
                out.append((a, (f"tl.dot({g_qk}, {dot_operand(b, 'KD', 'W_DTYPE')}, "
                                "input_precision=W_PREC)")))
            if x is b or x.text == b.text:
                out.append((b, (f"tl.dot({g_kq}, {dot_operand(a, 'QD', 'W_DTYPE')}, "
                                "input_precision=W_PREC)")))
        return out
    if op == "where":
        c, a, b = args
        cond = tile_bcast(c, kind, t)
        out = []
        for x in diff_args:
            terms = []
            if x.text == a.text:
                terms.append(f"tl.where({cond}, {g}, 0.0)")
            if x.text == b.text:
                terms.append(f"tl.where({cond}, 0.0, {g})")
            out.append((x, reduce_to(" + ".join(terms), kind, x.kind, t)))
        return out
    keys = tuple(_arg_key(a) for a in args)
    names = {a.text: tile_bcast(a, kind, t) for a in args if not a.scalar}
    names["O__"] = st.var
    out = []
    for x in diff_args:
        idx = keys.index(x.text)
        d = _derivative(_op_key(op), keys, idx)
        if d == 0:
            continue
        if d == 1:
            expr = g
        elif d == -1:
            expr = f"-{g}"
        else:
            expr = f"{g} * {to_triton(d, names)}"
        out.append((x, reduce_to(expr, kind, x.kind, t)))
    return out


__all__ = [
    "TileLowering",
    "Stmt",
    "dot_operand",
    "Val",
    "tile_bcast",
    "tile_shape",
    "full",
    "join_kinds",
    "literal",
    "reduce_to",
    "reverse_lines",
    "sym_op",
    "tile_mask",
    "to_triton",
]
