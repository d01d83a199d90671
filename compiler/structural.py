"""Structural operations, each in one place: matmul, transpose, scale, softmax, norm, cos, dist
and where (with its spelling mask).

Elementwise functions are data (compiler/elementwise.py). The operations here are a small fixed
set, because each has a shape rule of its own or reduces, compares or selects rows. One class
holds everything about one operation, and every stage reads it from `TABLE`:

    parser / ir      DSL names, arities, call hints, the `attnc ops` line        calls, syntax, doc
    shapes           the shape rule (a ShapeError names the op, the shapes, a fix)     shape
    SymPy stage      IR -> SymPy (its own MatrixExpr class when SymPy has none)       sympy, expr_cls
                     its rewrite laws, and how a transpose moves through it           rules, transposed
    printer / to_ir  canonical text and SymPy -> IR: generic for `expr_cls` ops (name(args))
    torch backend    the generated call and the function it calls                     torch, run
    Triton kernels   the tile lowering, composed from the kernel's tile vocabulary     triton
                     (dot, rowsum, rowsoftmax, safesqrt, where and elementwise ops, each
                     with its forward and adjoint in kernels/lower.py), so the fused
                     backward needs nothing per op
    kernel plan      facts the streaming classifier reads                             pairwise,
                                                                                   reduces_rows, ...
    FLOP counter     cost per (batch, head)                                           flops
    fp16 analysis    the range of its values                                          interval

Arithmetic (+ - * / ^ max min, comparisons, logic) is elementwise and broadcasting; it lives in
the IR's Op groups. The Op members of the operations below are in compiler/ir.py (the IR's
vocabulary): adding a structural operation is one Op member and one class here.

This module imports neither torch nor the kernels: `run` imports torch when called, and
`triton` gets the kernel's TileLowering as an argument.
"""
from __future__ import annotations

import math

import sympy as sp
from sympy import MatMul, MatrixExpr, Transpose

from .errors import ShapeError, Span
from .ir import ARITH_TEXT, Op, Shape, shape_str
from .matexpr import ONE, EwN, bcast_to, coeff_and_mat, d, is_mat, n, row_constant

COS_EPS = 1e-8   # row norms are clamped to this in cos (torch and Triton alike)
# Matrix-chain order is chosen for these sizes (n long, d small), e.g. Q @ (K^T @ V).
CHAIN_COST_SIZES = {n: 512, d: 64, ONE: 1}


# ---- SymPy classes for the operations SymPy lacks ---------------------------------------------

class Softmax(MatrixExpr):
    """Row-wise softmax (last axis)."""

    def __new__(cls, x):
        return MatrixExpr.__new__(cls, x)

    shape = property(lambda self: self.args[0].shape)


class RowNorm(MatrixExpr):
    """Row L2 norm, keepdim: (a, b) -> (a, 1)."""

    def __new__(cls, x):
        return MatrixExpr.__new__(cls, x)

    shape = property(lambda self: (self.args[0].shape[0], ONE))


class CosSim(MatrixExpr):
    """Pairwise cosine similarity of rows: (a, m), (b, m) -> (a, b)."""

    def __new__(cls, a, b):
        return MatrixExpr.__new__(cls, a, b)

    shape = property(lambda self: (self.args[0].shape[0], self.args[1].shape[0]))


class Dist(MatrixExpr):
    """Pairwise euclidean distance of rows: (a, m), (b, m) -> (a, b)."""

    def __new__(cls, a, b):
        return MatrixExpr.__new__(cls, a, b)

    shape = property(lambda self: (self.args[0].shape[0], self.args[1].shape[0]))


# ---- shared helpers ---------------------------------------------------------------------------

def op_text(op) -> str:
    """How an op is written, for messages: its symbol ('@') or its name (softmax())."""
    spec = TABLE.get(op)
    if spec is not None and spec.symbol:
        return f"'{spec.symbol}'"
    return f"'{ARITH_TEXT[op]}'" if op in ARITH_TEXT else f"{op.value}()"


def shape_error(op, span: Span | None, what: str, shapes: list[Shape], hint: str) -> ShapeError:
    got = ", ".join(shape_str(s) for s in shapes)
    return ShapeError(f"{op_text(op)} {what}; operand shapes: {got}", span, hint=hint)


def broadcast(op, shapes: list[Shape], span: Span | None) -> Shape:
    """The elementwise shape rule (arithmetic and where): equal shapes, scalars, (x, 1) / (1, x)."""
    mats = [s for s in shapes if s != ()]
    if not mats:
        return ()
    out = list(mats[0])
    for s in mats[1:]:
        for ax in range(2):
            a, b = out[ax], s[ax]
            if a == b or b == 1:
                continue
            if a == 1:
                out[ax] = b
                continue
            raise shape_error(op, span, f"needs shapes that match or broadcast (dim {ax}: {a} vs {b})",
                              shapes, "elementwise operations take equal shapes, scalars, or (x, 1)/"
                              "(1, x) rows and columns; a '@' or '^T' may be missing")
    return tuple(out)


def _need_matrices(op, shapes, span, hint: str) -> None:
    if any(s == () for s in shapes):
        raise shape_error(op, span, "needs matrices, not scalars", shapes, hint)


def _keep(axis) -> str:
    """The generated code's key-padding argument for a reduction over `axis`."""
    return "keep" if axis == "n" else "None"


def numel(shape, sizes) -> sp.Expr:
    """Entries of a symbolic shape, with `sizes` mapping "n", "d", 1 to SymPy sizes."""
    out = sp.Integer(1)
    for s in shape:
        out *= sizes[s]
    return out


def _mask_cols(x, keep):
    """x with its padded token columns (last axis) set to 0."""
    return x if keep is None else x.masked_fill(~keep, 0.0)


def _safe_sqrt(x):
    """sqrt with a zero (not NaN) gradient at 0 and 0 for tiny negative round-off."""
    import torch
    pos = x > 0
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


# ---- the operations ---------------------------------------------------------------------------

class Structural:
    """One structural operation. Subclasses set the class attributes and override what differs."""

    op: Op
    calls: dict = {}          # DSL name -> (arity, hint for a wrong call or None)
    syntax: str = ""          # how to write it (attnc ops)
    doc: str = ""             # its math (attnc ops, README)
    symbol: str | None = None  # infix spelling, for messages ('@', '^T')
    expr_cls: type | None = None   # its SymPy class, when SymPy has none
    # kernel plan facts
    pairwise: bool = False    # compares every query row with every key row: a score leaf
    pair_kinds: tuple = ()    # the score leaves it makes (pair_kind), named in plans
    right_transposed: bool = False  # as a score leaf, its right operand is k'^T (x @ y), not k'
    reduces_rows: bool = False  # reduces along its operand's rows (the last axis)
    reorients: bool = False   # swaps rows and columns
    matrix: bool = True       # a matrix operation (pictures colour it so); where is elementwise
    fill_positions: tuple = ()  # operand positions that may hold a non-finite constant (-inf)
    tile_operands: bool = True  # the Triton lowering wants its operands lowered first, on its side

    @property
    def name(self) -> str:
        return self.op.value

    # -- parser
    def arguments(self, name: str, ids: list[int], const) -> list[int]:
        """The IR operands of a call `name(ids...)` (`const(v)` makes a constant node)."""
        return ids

    # -- shapes
    def shape(self, shapes: list[Shape], span: Span | None) -> Shape:
        raise NotImplementedError

    def check_operands(self, operands, span: Span | None) -> list:
        """Check boolean-ness; return the operands whose shapes must fit (all by default)."""
        return operands

    # -- SymPy
    def sympy(self, args: list, shape):
        return self.expr_cls(*args)

    def transposed(self, x):
        """(x)^T with the transpose moved inside x (an instance of expr_cls), or None."""
        return None

    rules: tuple = ()         # (law, rule): rule(expr) -> replacement or None

    # -- torch
    def torch(self, args: list[str], shapes: list, ref: str) -> str:
        """The generated PyTorch expression (`ops` is attnc.compiler.torch_ops)."""
        return f"ops.{self.name}({', '.join(args)}, {_keep(shapes[0][1])})"

    # -- FLOPs per (batch, head); `sizes` maps "n", "d", 1 to SymPy sizes
    def flops(self, ins: list[Shape], out: Shape, sizes) -> sp.Expr:
        return numel(out, sizes)

    # -- range of values (kernels' fp16 analysis); None: unbounded / unknown
    def interval(self, args: list[tuple[float, float]]):
        return None

    # -- Triton: the tile lowering (low: kernels.lower.TileLowering)
    def triton(self, low, node, side: str, args, note: str):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<structural {self.name}>"


class _MatMul(Structural):
    op = Op.MATMUL
    calls = {"matmul": (2, None)}
    syntax, symbol = "x @ y", "@"
    doc = "x @ y, (a,b)@(b,c) -> (a,c)"
    pairwise, right_transposed = True, True
    pair_kinds = ("dot", "outer")

    def shape(self, shapes, span):
        _need_matrices(self.op, shapes, span, "use '*' to multiply by a scalar")
        a, b = shapes
        if a[1] != b[0]:
            if a[1] == b[1]:
                hint = "transpose the right operand, e.g. Q @ K^T"
            elif a[0] == b[0]:
                hint = "transpose the left operand, e.g. A^T @ B"
            else:
                hint = "the inner dimensions must agree: (a, b) @ (b, c)"
            raise shape_error(self.op, span, f"inner dimensions differ ({a[1]} vs {b[0]})", shapes, hint)
        return (a[0], b[1])

    def sympy(self, args, shape):
        # SymPy's own MatMul: scalar coefficients, (cA)B = c(AB) and chains come with it
        return MatMul(*args)

    @staticmethod
    def run(a, b, keep=None):
        """a @ b; with `keep` (inner dim is n) padded tokens are dropped from the contraction."""
        if keep is not None:
            a = _mask_cols(a, keep)
            b = _mask_cols(b.transpose(-1, -2), keep).transpose(-1, -2)
        return a @ b

    def flops(self, ins, out, sizes):
        return 2 * numel(out, sizes) * sizes[ins[0][1]]

    @staticmethod
    def chain(ids: list, mats: list, product):
        """A chain of factors (`mats` their SymPy forms, `ids` their IR nodes) multiplied in the
        cheapest order for CHAIN_COST_SIZES; `product(a, b)` makes one IR matmul."""
        dims = [CHAIN_COST_SIZES[m.shape[0]] for m in mats] + [CHAIN_COST_SIZES[mats[-1].shape[1]]]
        k = len(ids)
        cost = [[0] * k for _ in range(k)]
        split = [[0] * k for _ in range(k)]
        for span in range(1, k):
            for a in range(k - span):
                b = a + span
                cost[a][b] = math.inf
                for s in range(a, b):
                    c = cost[a][s] + cost[s + 1][b] + dims[a] * dims[s + 1] * dims[b + 1]
                    if c < cost[a][b]:
                        cost[a][b], split[a][b] = c, s

        def build(a: int, b: int):
            if a == b:
                return ids[a]
            s = split[a][b]
            return product(build(a, s), build(s + 1, b))

        return build(0, k - 1)

    def pair_kind(self, inner) -> str:
        """The score leaf it makes: q' . k' (inner dim d) or an outer product (inner dim 1)."""
        return "dot" if inner == "d" else "outer"

    def describe_pair(self, kind: str) -> str:
        return {"dot": "dot product q'_i . k'_j", "outer": "outer product of row features"}[kind]

    def triton(self, low, node, side, args, note):
        a, b = low.val(node.operands[0], "q"), low.val(node.operands[1], "k")
        return low.pdot(a, b, note)


class _Transpose(Structural):
    op = Op.TRANSPOSE
    calls = {"transpose": (1, None)}
    syntax, symbol = "x^T, transpose(x)", "^T"
    doc = "x^T"
    reorients = True
    tile_operands = False     # a tile is orientation-free: x^T is x's tile

    def shape(self, shapes, span):
        _need_matrices(self.op, shapes, span, "a scalar needs no transpose")
        (a,) = shapes
        return (a[1], a[0])

    def sympy(self, args, shape):
        return Transpose(args[0])

    def torch(self, args, shapes, ref):
        return f"{args[0]}.transpose(-1, -2)"

    def flops(self, ins, out, sizes):
        return sp.Integer(0)

    def triton(self, low, node, side, args, note):
        return low.val(node.operands[0], side)

    # its law, "transposes move to the leaves", asks each operation how x^T moves through it
    # (`transposed`): compiler/rules.py `_transpose_in`


class _RowWise(Structural):
    """A row-wise operation of one matrix (scale, softmax, norm)."""

    keeps_columns = True

    def shape(self, shapes, span):
        _need_matrices(self.op, shapes, span, f"{self.name}() works on the rows of a matrix")
        (a,) = shapes
        return a if self.keeps_columns else (a[0], 1)


class _Scale(_RowWise):
    op = Op.SCALE
    calls = {"scale": (1, None)}
    doc = "x / sqrt(last dim of x); of n columns, each sequence's own n"

    def sympy(self, args, shape):
        return MatMul(1 / sp.sqrt(args[0].shape[1]), args[0])   # a plain coefficient afterwards

    def torch(self, args, shapes, ref):
        if shapes[0][1] == "n":      # n is each sequence's real tokens, as in / sqrt(n)
            return f"ops.scale({args[0]}, ops.seq_lengths(key_padding_mask, {args[0]}))"
        return f"ops.scale({args[0]})"

    @staticmethod
    def run(x, lengths=None):
        """x / sqrt(its last dim); x of n columns: / sqrt of each sequence's real tokens, the (B,)
        `lengths` (torch_ops.seq_lengths)."""
        if lengths is None:
            return x / math.sqrt(x.shape[-1])
        return x / lengths.view(-1, *([1] * (x.dim() - 1))).sqrt().to(x.dtype)

    def triton(self, low, node, side, args, note):
        cols = node.shape[1]
        if cols == 1:
            return args[0]
        return low.ew(Op.MUL, [args[0], low.scalars.rsqrt(cols)], note)


def _softmax_shift(x):
    """softmax(s + r) -> softmax(s) when r is constant along each row."""
    if not isinstance(x, Softmax) or not isinstance(x.args[0], sp.MatAdd):
        return None
    terms = x.args[0].args
    keep = [t for t in terms if not row_constant(t)]
    if not keep or len(keep) == len(terms):
        return None
    return Softmax(keep[0] if len(keep) == 1 else sp.MatAdd(*keep))


class _Softmax(_RowWise):
    op = Op.SOFTMAX
    calls = {"softmax": (1, None)}
    doc = "exp(x_ij) / sum_j exp(x_ij), row-wise"
    expr_cls = Softmax
    reduces_rows = True
    rules = (("softmax is invariant to per-row shifts", _softmax_shift),)

    @staticmethod
    def run(x, keep=None):
        """Row softmax, safe for -inf entries and fully masked rows (which give 0)."""
        import torch
        if keep is not None:
            x = x.masked_fill(~keep, -math.inf)
        m = x.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(x - m)
        s = e.sum(dim=-1, keepdim=True)
        return e / torch.where(s > 0, s, torch.ones_like(s))

    def flops(self, ins, out, sizes):
        return 5 * numel(out, sizes)    # max, subtract, exp, sum, divide

    def interval(self, args):
        return (0.0, 1.0)

    def triton(self, low, node, side, args, note):
        x = args[0]
        if x.kind in ("Q1", "K1"):       # a softmax over one column
            return low.ew("softmax1", [x], note)
        return low.add(x.kind, "rowsoftmax", [x], note=note)


def _norm_scale(x):
    """norm(c x) -> |c| norm(x)."""
    if isinstance(x, RowNorm):
        c, m = coeff_and_mat(x.args[0])
        if c != 1:
            return MatMul(sp.Abs(c), RowNorm(m))
    return None


class _Norm(_RowWise):
    op = Op.NORM
    calls = {"norm": (1, None)}
    doc = "sqrt(sum_j x_ij^2), (a,b) -> (a,1)"
    expr_cls = RowNorm
    reduces_rows, keeps_columns = True, False
    rules = (("norm(c x) = |c| norm(x)", _norm_scale),)

    @staticmethod
    def run(x, keep=None):
        """Row L2 norm, keepdim: (.., a, b) -> (.., a, 1)."""
        x = _mask_cols(x, keep)
        return _safe_sqrt((x * x).sum(dim=-1, keepdim=True))

    def flops(self, ins, out, sizes):
        return 2 * numel(ins[0], sizes) + numel(out, sizes)

    def interval(self, args):
        return (0.0, math.inf)

    def triton(self, low, node, side, args, note):
        return self.tile(low, args[0], note)

    @staticmethod
    def tile(low, x, note="norm"):
        """The row norm of a tile (of a row feature: its absolute value)."""
        from .ir import fn_op
        if x.kind in ("Q1", "K1"):
            return low.ew(fn_op("abs"), [x], note)
        return low.ew("safesqrt", [low.sqnorm(x)], note)


class _Pairwise(Structural):
    """A comparison of every row of x with every row of y (cos, dist)."""

    pairwise = True

    def shape(self, shapes, span):
        _need_matrices(self.op, shapes, span, f"{self.name}(x, y) compares the rows of two matrices")
        a, b = shapes
        if a[1] != b[1]:
            raise shape_error(self.op, span, f"compares rows of different lengths ({a[1]} vs {b[1]})",
                              shapes, f"{self.name}(x, y) needs rows of equal length, e.g. "
                              f"{self.name}(Q, K)")
        return (a[0], b[0])

    def transposed(self, x):
        return self.expr_cls(x.args[1], x.args[0])       # f(a, b)^T = f(b, a): both symmetric

    @staticmethod
    def masked(a, b, keep):
        """Both operands with padded token columns zeroed (rows over n ignore padding)."""
        return _mask_cols(a, keep), _mask_cols(b, keep)

    @staticmethod
    def tiles(low, node):
        """The query-side tile of x and the key-side tile of y."""
        return low.val(node.operands[0], "q"), low.val(node.operands[1], "k")

    @property
    def pair_kinds(self):
        return (self.name,)

    def pair_kind(self, inner) -> str:
        return self.name

    def describe_pair(self, kind: str) -> str:
        return self.pair_doc


def _cos_scale(x):
    """cos(c * a, b) -> cos(a, b) for c > 0."""
    if isinstance(x, CosSim):
        (ca, a), (cb, b) = map(coeff_and_mat, x.args)
        if (ca != 1 and ca.is_positive) or (cb != 1 and cb.is_positive):
            return CosSim(a if ca.is_positive else x.args[0], b if cb.is_positive else x.args[1])
    return None


class _Cos(_Pairwise):
    op = Op.COS
    calls = {"cos": (2, "cos(x, y): pairwise cosine similarity of the rows, e.g. cos(Q, K)")}
    doc = "cos(x, y)_ab = x_a . y_b / (|x_a| |y_b|)"
    pair_doc = "cosine similarity"
    expr_cls = CosSim
    rules = (("cosine similarity ignores positive scales", _cos_scale),)

    @staticmethod
    def run(a, b, keep=None, eps: float = COS_EPS):
        """Pairwise cosine similarity of rows: (.., a, m), (.., b, m) -> (.., a, b)."""
        a, b = _Pairwise.masked(a, b, keep)
        an = a / _Norm.run(a).clamp_min(eps)
        bn = b / _Norm.run(b).clamp_min(eps)
        return an @ bn.transpose(-1, -2)

    def flops(self, ins, out, sizes):
        m, o = sizes[ins[0][1]], numel(out, sizes)
        return 2 * o * m + 3 * (numel(ins[0], sizes) + numel(ins[1], sizes)) + o

    def interval(self, args):
        return (-1.0, 1.0)

    def triton(self, low, node, side, args, note):
        a, b = self.tiles(low, node)
        return low.pdot(self._unit(low, a), self._unit(low, b), note)

    @staticmethod
    def _unit(low, x):
        n = low.ew(Op.MAX, [_Norm.tile(low, x), low.scalars.literal(COS_EPS)])
        return low.ew(Op.DIV, [x, n])


def _dist_scale(x):
    """dist(c * a, c * b) -> |c| dist(a, b)."""
    if isinstance(x, Dist):
        (ca, a), (cb, b) = map(coeff_and_mat, x.args)
        if ca != 1 and ca == cb:
            return MatMul(sp.Abs(ca), Dist(a, b))
    return None


class _Dist(_Pairwise):
    op = Op.DIST
    calls = {"dist": (2, "dist(x, y): pairwise euclidean distance of the rows, e.g. dist(Q, K)")}
    doc = "dist(x, y)_ab = |x_a - y_b|_2"
    pair_doc = "euclidean distance"
    expr_cls = Dist
    rules = (("dist(c x, c y) = |c| dist(x, y)", _dist_scale),)

    @staticmethod
    def run(a, b, keep=None):
        """Pairwise euclidean distance of rows: (.., a, m), (.., b, m) -> (.., a, b)."""
        a, b = _Pairwise.masked(a, b, keep)
        sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1, keepdim=True).transpose(-1, -2) \
            - 2 * (a @ b.transpose(-1, -2))
        return _safe_sqrt(sq)

    def flops(self, ins, out, sizes):
        m, o = sizes[ins[0][1]], numel(out, sizes)
        return 2 * o * m + 2 * (numel(ins[0], sizes) + numel(ins[1], sizes)) + 4 * o

    def interval(self, args):
        return (0.0, math.inf)

    def triton(self, low, node, side, args, note):
        a, b = self.tiles(low, node)
        if a.kind == "QD" and b.kind == "KD":
            # |a|^2 + |b|^2 - 2 a.b from the operands the dot product rounds to DOT_DTYPE:
            # near-zero distances then cancel exactly instead of leaving rounding noise
            a, b = low.rounded(a), low.rounded(b)
        sq = low.ew(Op.ADD, [low.sqnorm(a), low.sqnorm(b)])
        two_ab = low.ew(Op.MUL, [low.pdot(a, b), low.scalars.literal(2.0)])
        return low.ew("safesqrt", [low.ew(Op.SUB, [sq, two_ab])], note)


def _where_same(x):
    if isinstance(x, EwN) and x.fname == "where" and x.operands[1] == x.operands[2]:
        return bcast_to(x.operands[1], x.shape)                           # where(c, x, x) -> x
    return None


class _Where(Structural):
    op = Op.WHERE
    calls = {"where": (3, "where(cond, x, y), e.g. where(j <= i, s, -inf)"),
             "mask": (2, "mask(x, cond), e.g. mask(s, j <= i)")}
    doc = "where(c, x, y) = x where c else y; mask(x, c) = where(c, x, -inf)"
    matrix = False
    fill_positions = (1, 2)   # -inf (or inf) may fill the entries a condition masks
    rules = (("where(c, x, x) = x", _where_same),)

    def arguments(self, name, ids, const):
        if name == "mask":                 # mask(x, cond) == where(cond, x, -inf)
            x, cond = ids
            return [cond, x, const(-math.inf)]
        return ids

    def check_operands(self, operands, span):
        cond, *vals = operands
        if not cond.is_bool:
            raise ShapeError("where()/mask() needs a condition such as j <= i", cond.span or span,
                             hint="write where(j <= i, x, -inf) or mask(x, j <= i)")
        return vals

    def shape(self, shapes, span):
        return broadcast(self.op, shapes, span)

    def sympy(self, args, shape):
        if shape == ():
            return sp.Piecewise((args[1], args[0]), (args[2], True))
        return EwN("where", *shape, *[bcast_to(a, shape) if is_mat(a) else a for a in args])

    def torch(self, args, shapes, ref):
        if shapes[0] == ():
            return f"({args[1]} if {args[0]} else {args[2]})"
        return f"ops.where({args[0]}, {args[1]}, {args[2]}, {ref})"

    @staticmethod
    def run(cond, a, b, like):
        """torch.where keeping `like`'s dtype when both branches are Python scalars."""
        import torch
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = torch.tensor(a, dtype=like.dtype, device=like.device)
        return torch.where(cond, a, b)

    def interval(self, args):
        (_, a, b) = args
        return (min(a[0], b[0]), max(a[1], b[1]))

    def triton(self, low, node, side, args, note):
        return low.ew("where", args, note)


MATMUL, TRANSPOSE, SCALE, SOFTMAX, NORM, COS, DIST, WHERE = (
    _MatMul(), _Transpose(), _Scale(), _Softmax(), _Norm(), _Cos(), _Dist(), _Where())

TABLE: dict[Op, Structural] = {s.op: s for s in (MATMUL, TRANSPOSE, SCALE, SOFTMAX, NORM, COS, DIST,
                                                 WHERE)}
BY_NAME: dict[str, Structural] = {s.name: s for s in TABLE.values()}
BY_EXPR: dict[type, Structural] = {s.expr_cls: s for s in TABLE.values() if s.expr_cls is not None}
CALLS: dict[str, tuple[Structural, int]] = {name: (s, arity) for s in TABLE.values()
                                            for name, (arity, _) in s.calls.items()}
PAIR_KINDS: dict[str, Structural] = {k: s for s in TABLE.values() for k in s.pair_kinds}
MATRIX_OPS = frozenset(op for op, s in TABLE.items() if s.matrix)


def get(op) -> Structural | None:
    """The structural operation of an IR op, or None (arithmetic, elementwise functions, leaves)."""
    return TABLE.get(op)


def call_hint(name: str) -> str | None:
    entry = CALLS.get(name)
    return entry[0].calls[name][1] if entry else None


def rules() -> list:
    """Every structural operation's rewrite laws, in table order."""
    return [r for s in TABLE.values() for r in s.rules]


__all__ = ["TABLE", "BY_NAME", "BY_EXPR", "CALLS", "PAIR_KINDS", "MATRIX_OPS", "Structural", "Softmax",
           "RowNorm", "CosSim", "Dist", "COS_EPS", "CHAIN_COST_SIZES", "get", "call_hint", "rules",
           "op_text", "shape_error", "broadcast", "numel",
           "MATMUL", "TRANSPOSE", "SCALE", "SOFTMAX", "NORM", "COS", "DIST", "WHERE"]
