"""The SymPy stage: IR -> SymPy matrix expression -> rewrite rules -> canonical text -> IR.

Matrices are SymPy matrix expressions over symbolic sizes n and d: inputs are MatrixSymbols
(n x d), `i` is an (n x 1) and `j` a (1 x n) MatrixSymbol, and SymPy's own MatMul, MatAdd,
Transpose, HadamardProduct and HadamardPower carry products, sums, transposes and elementwise
products/powers (scalar coefficients live inside MatMul, so scalar folding, neg∘neg, x + x = 2x
and constants pulled out of matmuls come from SymPy's canonical forms). What SymPy has no
class for is added here as small MatrixExpr subclasses: `Ew` (elementwise function), `EwN`
(where / comparisons / logic / max / min / pow), `Softmax`, `RowNorm`, `CosSim`, `Dist`, and
`Bcast` (a scalar, row or column broadcast to a matrix shape).

`simplify` applies the RULES table bottom-up to a fixpoint; `print_canonical` prints the result
in the DSL (re-parseable; commutative operands sorted), and `lower` turns it back into IR for
code generation.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import networkx as nx
import sympy as sp
from sympy import (HadamardPower, HadamardProduct, MatAdd, MatMul, MatPow, MatrixExpr, MatrixSymbol,
                   Transpose, ZeroMatrix)
from sympy.core.symbol import Str

from .errors import AttncError, CheckError
from .ir import GroupOp, INPUT_NAMES, GraphBuilder, Node, Op, node_of, output_of, topo
from . import shapes

n, d = sp.symbols("n d", positive=True, integer=True)
DIMS = {"n": n, "d": d, 1: sp.Integer(1)}
ONE = sp.Integer(1)


# ---- custom matrix expressions ---------------------------------------------------------------


class Ew(MatrixExpr):
    """f(X) applied elementwise; f is one of the unary Op names (exp, log, softplus, ...)."""

    def __new__(cls, f, x):
        return MatrixExpr.__new__(cls, f if isinstance(f, Str) else Str(f), x)

    fname = property(lambda self: self.args[0].name)
    arg = property(lambda self: self.args[1])
    shape = property(lambda self: self.args[1].shape)


class EwN(MatrixExpr):
    """An n-ary elementwise op (where, lt, le, ..., and, or, not, max, min, pow); scalar
    operands stay scalars. Shape: given explicitly."""

    def __new__(cls, f, m, p, *operands):
        f = f if isinstance(f, Str) else Str(f)
        return MatrixExpr.__new__(cls, f, sp.sympify(m), sp.sympify(p), *operands)

    fname = property(lambda self: self.args[0].name)
    operands = property(lambda self: self.args[3:])
    shape = property(lambda self: (self.args[1], self.args[2]))


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


class Bcast(MatrixExpr):
    """A scalar, a column (m, 1) or a row (1, p) broadcast to an (m, p) matrix."""

    def __new__(cls, x, m, p):
        return MatrixExpr.__new__(cls, x, sp.sympify(m), sp.sympify(p))

    value = property(lambda self: self.args[0])
    shape = property(lambda self: (self.args[1], self.args[2]))


def is_mat(x) -> bool:
    return isinstance(x, MatrixExpr)


def shape_of(x):
    return x.shape if is_mat(x) else ()


# ---- IR -> SymPy -----------------------------------------------------------------------------

_SCALAR_FN: dict[Op, Callable] = {
    Op.EXP: sp.exp, Op.LOG: sp.log, Op.SQRT: sp.sqrt, Op.ABS: sp.Abs, Op.TANH: sp.tanh,
    Op.RELU: lambda x: sp.Max(x, 0), Op.SIGMOID: lambda x: 1 / (1 + sp.exp(-x)),
    Op.SOFTPLUS: lambda x: sp.log(1 + sp.exp(x)), Op.LOGSIGMOID: lambda x: -sp.log(1 + sp.exp(-x)),
    Op.SOFTSIGN: lambda x: x / (1 + sp.Abs(x)), Op.NEG: lambda x: -x,
}
_SCALAR_BIN: dict[Op, Callable] = {
    Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b, Op.POW: lambda a, b: a ** b, Op.MAX: sp.Max, Op.MIN: sp.Min,
}
_REL = {Op.LT: sp.Lt, Op.LE: sp.Le, Op.GT: sp.Gt, Op.GE: sp.Ge, Op.EQ: sp.Eq, Op.NE: sp.Ne}


def number(value: float):
    """Exact sympy number for a float: small-denominator fractions become Rationals."""
    if math.isinf(value):
        return sp.oo if value > 0 else -sp.oo
    if float(value).is_integer():
        return sp.Integer(int(value))
    frac = Fraction(value).limit_denominator(10 ** 6)
    if float(frac) == value:
        return sp.Rational(frac.numerator, frac.denominator)
    return sp.Float(value, 17)


def bcast(x, shape):
    """Broadcast scalar / row / column `x` to `shape` (a sympy shape)."""
    if shape == () or shape_of(x) == tuple(shape):
        return x
    return Bcast(x, *shape)


def to_sympy(g: nx.DiGraph):
    vals: dict[int, object] = {}
    for nid, node in topo(g):
        args = [vals[o] for o in node.operands]
        vals[nid] = _node_to_sympy(node, args)
    return vals[output_of(g)]


def _sym_shape(shape):
    return tuple(DIMS[s] for s in shape)


def _node_to_sympy(node: Node, args: list):
    op = node.op
    shape = _sym_shape(node.shape)
    if op is Op.INPUT:
        return MatrixSymbol(node.name, n, d)
    if op is Op.INDEX:
        return MatrixSymbol(node.name, *shape)
    if op is Op.SYMBOL:
        return DIMS[node.name]
    if op is Op.CONST:
        return number(node.value)
    scalar = shape == ()
    if op in _SCALAR_FN:
        (x,) = args
        if scalar:
            return _SCALAR_FN[op](x)
        return MatMul(-1, x) if op is Op.NEG else Ew(op.value, x)
    if op in _REL or op in GroupOp.Logic or op is Op.WHERE or (op in (Op.MAX, Op.MIN, Op.POW)
                                                                and not scalar):
        if scalar:
            if op in _REL:
                return _REL[op](*args)
            if op is Op.AND:
                return sp.And(*args)
            if op is Op.OR:
                return sp.Or(*args)
            if op is Op.NOT:
                return sp.Not(args[0])
            if op is Op.WHERE:
                return sp.Piecewise((args[1], args[0]), (args[2], True))
            return _SCALAR_BIN[op](*args)
        if op is Op.POW and not is_mat(args[1]):
            return HadamardPower(args[0], args[1])
        ops = [a if not is_mat(a) else bcast(a, shape) for a in args]
        return EwN(op.value, *shape, *ops)
    if op in _SCALAR_BIN:
        a, b = args
        if scalar:
            return _SCALAR_BIN[op](a, b)
        if op is Op.ADD:
            return MatAdd(bcast(a, shape), bcast(b, shape))
        if op is Op.SUB:
            return MatAdd(bcast(a, shape), MatMul(-1, bcast(b, shape)))
        if op is Op.MUL:
            if not is_mat(a) or not is_mat(b):
                c, x = (a, b) if not is_mat(a) else (b, a)
                return MatMul(c, bcast(x, shape))
            return HadamardProduct(bcast(a, shape), bcast(b, shape))
        if op is Op.DIV:
            if not is_mat(b):
                return MatMul(1 / b, a)
            inv = HadamardPower(bcast(b, shape), -1)
            return MatMul(a, inv) if not is_mat(a) else HadamardProduct(bcast(a, shape), inv)
    if op is Op.MATMUL:
        return MatMul(*args)
    if op is Op.TRANSPOSE:
        return Transpose(args[0])
    if op is Op.SCALE:
        return MatMul(1 / sp.sqrt(args[0].shape[1]), args[0])
    if op is Op.SOFTMAX:
        return Softmax(args[0])
    if op is Op.NORM:
        return RowNorm(args[0])
    if op is Op.COS:
        return CosSim(*args)
    if op is Op.DIST:
        return Dist(*args)
    raise NotImplementedError(op)  # pragma: no cover


# ---- rewrite rules ---------------------------------------------------------------------------
# Each rule takes a node whose children are already simplified and returns a replacement, or
# None when it does not apply. The law is in the rule's name. Adding a rule is adding a line.


def coeff_and_mat(x):
    """Split c * M into (c, M); c is 1 when there is no scalar factor."""
    if isinstance(x, MatMul):
        c = [a for a in x.args if not is_mat(a)]
        m = [a for a in x.args if is_mat(a)]
        if c:
            coeff = sp.Mul(*c)
            return coeff, (m[0] if len(m) == 1 else MatMul(*m))
    return ONE, x


def chain_factors(x) -> list:
    """The matrix factors of a product, with A^k (SymPy's MatPow of A @ A) written out."""
    out = []
    for a in x.args:
        if isinstance(a, MatPow) and a.exp.is_Integer and a.exp > 0:
            out.extend([a.base] * int(a.exp))
        elif is_mat(a):
            out.append(a)
    return out


def _canon(x):
    y = x.doit(deep=False)
    return None if y == x else y


def _expand_scalars(x):
    """Scalar coefficients and broadcast constants in one (expanded) form, so that equal
    scalars print alike: (1 - 1/sqrt(d)) / sqrt(d) -> 1/sqrt(d) - 1/d."""
    if isinstance(x, MatMul):
        c, m = coeff_and_mat(x)
        e = sp.expand(c)
        if e != c:
            return MatMul(e, m) if e != 1 else m
    if isinstance(x, Bcast) and not is_mat(x.value):
        e = sp.expand(x.value)
        if e != x.value:
            return Bcast(e, *x.shape)
    return None


def _distribute(x):
    """c * (a + b) -> c a + c b. SymPy distributes numbers over sums; this does it for every
    scalar, and for a product with a sum factor the scalar goes into the first such factor:
    c * (a @ (b + e)) -> a @ (c b + c e),  c * ((a + b) * e) -> (c a + c b) * e."""
    c, m = coeff_and_mat(x) if isinstance(x, MatMul) else (ONE, None)
    if c == 1:
        return None
    if isinstance(m, MatAdd):
        return MatAdd(*[MatMul(c, t) for t in m.args])
    if isinstance(m, (MatMul, HadamardProduct)):
        factors = chain_factors(m) if isinstance(m, MatMul) else sorted(m.args, key=sp.default_sort_key)
        for k, f in enumerate(factors):
            if isinstance(f, MatAdd):
                factors[k] = MatAdd(*[MatMul(c, t) for t in f.args])
                return m.func(*factors)
    return None


def _transpose_in(x):
    if not isinstance(x, Transpose):
        return None
    a = x.arg
    T = lambda m: Transpose(m) if is_mat(m) else m  # noqa: E731
    if isinstance(a, (MatMul, MatAdd, Transpose)):
        return _canon(x)
    if isinstance(a, Ew):
        return Ew(a.fname, T(a.arg))
    if isinstance(a, HadamardProduct):
        return HadamardProduct(*[T(t) for t in a.args])
    if isinstance(a, HadamardPower):
        return HadamardPower(T(a.base), a.exp)
    if isinstance(a, EwN):
        m, p = a.shape
        return EwN(a.fname, p, m, *[T(t) for t in a.operands])
    if isinstance(a, Bcast):
        m, p = a.shape
        return Bcast(T(a.value), p, m)
    if isinstance(a, CosSim):
        return CosSim(a.args[1], a.args[0])
    if isinstance(a, Dist):
        return Dist(a.args[1], a.args[0])
    if isinstance(a, ZeroMatrix):
        return ZeroMatrix(a.shape[1], a.shape[0])
    return None


def _hadamard_scalars(x):
    if not isinstance(x, HadamardProduct):
        return None
    coeff, rest, changed = ONE, [], False
    for t in x.args:
        c, m = coeff_and_mat(t)
        if isinstance(m, Bcast) and not is_mat(m.value):
            coeff, changed = coeff * c * m.value, True
            continue
        if c != 1:
            coeff, changed = coeff * c, True
        rest.append(m)
    if not changed:
        return None
    if not rest:
        return Bcast(coeff, *x.shape)
    body = rest[0] if len(rest) == 1 else HadamardProduct(*rest)
    return MatMul(coeff, body) if coeff != 1 else body


def _hadamard_power(x):
    if not isinstance(x, HadamardPower):
        return None
    base, p = x.base, x.exp
    if p == 1:
        return base
    if p == 0:
        return Bcast(ONE, *x.shape)
    if isinstance(base, Bcast):
        return Bcast(base.value ** p if not is_mat(base.value) else HadamardPower(base.value, p), *x.shape)
    if isinstance(base, HadamardPower) and p.is_integer and base.exp.is_integer:
        return HadamardPower(base.base, base.exp * p)
    c, m = coeff_and_mat(base)
    if c != 1 and (p.is_integer or c.is_positive):
        return MatMul(c ** p, HadamardPower(m, p))
    return None


def _bcast_fold(x):
    if isinstance(x, Bcast):
        v = x.value
        if shape_of(v) == x.shape:
            return v
        if isinstance(v, Bcast):
            return Bcast(v.value, *x.shape)
        if v == 0:
            return ZeroMatrix(*x.shape)
        c, m = coeff_and_mat(v) if is_mat(v) else (ONE, v)
        if c != 1 and is_mat(v):
            return MatMul(c, Bcast(m, *x.shape))
        return None
    if isinstance(x, MatMul):
        c, m = coeff_and_mat(x)
        if c != 1 and isinstance(m, Bcast) and not is_mat(m.value):   # c * bcast(s) -> bcast(c s)
            return Bcast(c * m.value, *m.shape)
        if isinstance(m, MatMul):   # A @ bcast(s) @ B -> s * (A @ bcast(1) @ B): constants leave @
            factors = chain_factors(m)
            scal = [f for f in factors if isinstance(f, Bcast) and not is_mat(f.value) and f.value != 1]
            if scal:
                coeff = c * sp.Mul(*[f.value for f in scal])
                factors = [Bcast(ONE, *f.shape) if f in scal else f for f in factors]
                return MatMul(coeff, *factors)
    if isinstance(x, (MatAdd, HadamardProduct)):
        # bcast(a) + bcast(b) -> bcast(a + b), bcast(a) * bcast(b) -> bcast(a * b), for broadcasts
        # of same-shaped values (scalars, columns or rows)
        groups: dict = {}
        for t in x.args:
            if isinstance(t, Bcast):
                groups.setdefault(shape_of(t.value), []).append(t)
        merged = [g for g in groups.values() if len(g) > 1]
        if merged:
            rest = [t for t in x.args if not any(t in g for g in merged)]
            for g in merged:
                vals = [t.value for t in g]
                if not is_mat(vals[0]):
                    v = sp.Add(*vals) if isinstance(x, MatAdd) else sp.Mul(*vals)
                else:
                    v = MatAdd(*vals) if isinstance(x, MatAdd) else HadamardProduct(*vals)
                rest.append(Bcast(v, *x.shape))
            return x.func(*rest) if len(rest) > 1 else rest[0]
    return None


def _ew_const(x):
    """f(broadcast value) -> broadcast f(value); f(0 matrix) -> broadcast f(0)."""
    if not isinstance(x, Ew):
        return None
    a = x.arg
    if isinstance(a, ZeroMatrix):
        a = Bcast(sp.Integer(0), *a.shape)
    if isinstance(a, Bcast):
        v = a.value
        inner = _SCALAR_FN[Op(x.fname)](v) if not is_mat(v) else Ew(x.fname, v)
        return Bcast(inner, *a.shape)
    return None


def _ew_identities(x):
    if not isinstance(x, Ew):
        return None
    f, a = x.fname, x.arg
    c, m = coeff_and_mat(a)
    if f == "log" and isinstance(a, Ew) and a.fname == "exp":
        return a.arg                                                   # log(exp(x)) -> x
    if f == "log" and isinstance(a, Ew) and a.fname == "sigmoid":
        return Ew("logsigmoid", a.arg)                                 # log(sigmoid(x)) -> logsigmoid(x)
    if f == "log" and isinstance(a, MatAdd) and len(a.args) == 2:      # log(1 + exp(x)) -> softplus(x)
        one = [t for t in a.args if isinstance(t, Bcast) and t.value == 1]
        ex = [t for t in a.args if isinstance(t, Ew) and t.fname == "exp"]
        if one and ex:
            return Ew("softplus", ex[0].arg)
    if f in ("abs", "relu") and isinstance(a, Ew) and a.fname == f:
        return a                                                       # abs(abs(x)) -> abs(x)
    if f == "abs" and c.is_negative:
        return Ew("abs", MatMul(-c, m) if c != -1 else m)              # abs(-x) -> abs(x)
    if f == "sqrt" and isinstance(a, HadamardPower) and a.exp == 2:
        return Ew("abs", a.base)                                       # sqrt(x^2) -> abs(x)
    if f == "exp" and isinstance(a, Ew) and a.fname == "log":
        return None                                                    # exp(log x) != x for x < 0
    return None


def _logsigmoid(x):
    """-softplus(-x) -> logsigmoid(x)."""
    c, m = coeff_and_mat(x)
    if c == -1 and isinstance(m, Ew) and m.fname == "softplus":
        c2, inner = coeff_and_mat(m.arg)
        if c2 == -1:
            return Ew("logsigmoid", inner)
    return None


def row_constant(x) -> bool:
    """True when every row of x is a constant (x_ij does not depend on j)."""
    if isinstance(x, Bcast):
        return not is_mat(x.value) or x.value.shape[1] == 1
    if isinstance(x, ZeroMatrix):
        return True
    if x.shape[1] == 1:
        return True
    if isinstance(x, MatMul):
        c, m = coeff_and_mat(x)
        return m is not x and row_constant(m)
    if isinstance(x, (Ew, HadamardProduct, MatAdd)):
        return all(row_constant(a) for a in x.args if is_mat(a))
    if isinstance(x, HadamardPower):
        return row_constant(x.base)
    return False


def _softmax_shift(x):
    """softmax(s + r) -> softmax(s) when r is constant along each row."""
    if not isinstance(x, Softmax) or not isinstance(x.args[0], MatAdd):
        return None
    terms = x.args[0].args
    keep = [t for t in terms if not row_constant(t)]
    if not keep or len(keep) == len(terms):
        return None
    return Softmax(keep[0] if len(keep) == 1 else MatAdd(*keep))


def _cos_scale(x):
    """cos(c * a, b) -> cos(a, b) for c > 0; dist(c * a, c * b) -> |c| dist(a, b)."""
    if isinstance(x, CosSim):
        (ca, a), (cb, b) = coeff_and_mat(x.args[0]), coeff_and_mat(x.args[1])
        if (ca != 1 and ca.is_positive) or (cb != 1 and cb.is_positive):
            return CosSim(a if ca.is_positive else x.args[0], b if cb.is_positive else x.args[1])
    if isinstance(x, Dist):
        (ca, a), (cb, b) = coeff_and_mat(x.args[0]), coeff_and_mat(x.args[1])
        if ca != 1 and ca == cb:
            return MatMul(sp.Abs(ca), Dist(a, b))
    return None


def _norm_scale(x):
    """norm(c * x) -> |c| norm(x)."""
    if isinstance(x, RowNorm):
        c, m = coeff_and_mat(x.args[0])
        if c != 1:
            return MatMul(sp.Abs(c), RowNorm(m))
    return None


_EWN_SCALAR = {"max": sp.Max, "min": sp.Min, "pow": lambda a, b: a ** b}


def _ewn_const(x):
    """max/min/pow of constants (scalars, constant broadcasts, zero matrices) is a constant."""
    if not isinstance(x, EwN) or x.fname not in _EWN_SCALAR:
        return None
    vals = []
    for o in x.operands:
        if isinstance(o, ZeroMatrix):
            o = sp.Integer(0)
        elif isinstance(o, Bcast) and not is_mat(o.value):
            o = o.value
        if is_mat(o):
            return None
        vals.append(o)
    return Bcast(_EWN_SCALAR[x.fname](*vals), *x.shape)


def _where_same(x):
    if isinstance(x, EwN) and x.fname == "where" and x.operands[1] == x.operands[2]:
        return bcast(x.operands[1], x.shape)                           # where(c, x, x) -> x
    return None


RULES: list[tuple[str, Callable]] = [
    ("canonical sums and products (x + x = 2x, neg∘neg, scalar folding, (cA)B = c(AB))",
     lambda x: _canon(x) if isinstance(x, (MatAdd, MatMul, HadamardProduct)) else None),
    ("scalars distribute over sums (c(a + b) = ca + cb)", _distribute),
    ("scalar coefficients in expanded form", _expand_scalars),
    ("transposes move to the leaves ((AB)^T = B^T A^T, x^T^T = x, f(x)^T = f(x^T))", _transpose_in),
    ("scalars leave elementwise products (cA ∘ B = c(A ∘ B))", _hadamard_scalars),
    ("elementwise powers (x^1 = x, (cx)^p = c^p x^p, (x^a)^b = x^ab)", _hadamard_power),
    ("broadcasts fold (c + c' , c * bcast(s), bcast of a full matrix)", _bcast_fold),
    ("elementwise functions of constants are constants", _ew_const),
    ("elementwise identities (log exp x = x, log(1 + e^x) = softplus x, |−x| = |x|)", _ew_identities),
    ("-softplus(-x) = logsigmoid(x)", _logsigmoid),
    ("softmax is invariant to per-row shifts", _softmax_shift),
    ("cosine similarity ignores positive scales", _cos_scale),
    ("norm(c x) = |c| norm(x)", _norm_scale),
    ("where(c, x, x) = x", _where_same),
    ("max / min / pow of constants are constants", _ewn_const),
]

MAX_REWRITES = 200


def simplify(expr):
    """Apply RULES bottom-up until no rule changes anything."""
    bad = [a for a in sp.preorder_traversal(expr) if a in (sp.zoo, sp.nan, sp.I)]
    if bad:
        raise CheckError("a constant expression evaluates to a non-finite value "
                         f"({bad[0]})",
                         hint="check constant divisions by zero, log(0), sqrt of negatives")
    memo: dict = {}
    budget = [MAX_REWRITES]

    def go(x):
        if not is_mat(x) or not x.args or isinstance(x, MatrixSymbol):
            return x
        hit = memo.get(x)
        if hit is not None:
            return hit
        args = tuple(go(a) for a in x.args)
        y = x.func(*args) if args != x.args else x
        changed = True
        while changed and budget[0] > 0:
            changed = False
            for _, rule in RULES:
                z = rule(y) if is_mat(y) else None
                if z is not None and z != y:
                    budget[0] -= 1
                    y = go(z)
                    changed = True
                    break
        memo[x] = y
        return y

    return go(expr)


# ---- canonical printing ----------------------------------------------------------------------
# Precedences follow the grammar: | & ! compare sum product unary power postfix.
P_OR, P_AND, P_NOT, P_CMP, P_SUM, P_PROD, P_UNARY, P_POW, P_ATOM = range(1, 10)
_CMP_TXT = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_REL_TXT = {sp.StrictLessThan: "<", sp.LessThan: "<=", sp.StrictGreaterThan: ">",
            sp.GreaterThan: ">=", sp.Equality: "==", sp.Unequality: "!="}


def print_canonical(expr) -> str:
    return _p(expr, elementwise=False)[0]


def _wrap(s: tuple[str, int], need: int) -> str:
    return s[0] if s[1] >= need else f"({s[0]})"


def _zero_like(shape) -> str:
    """A DSL expression with the given shape, for printing broadcasts outside elementwise ops."""
    m, p = shape
    rows = {n: "i", ONE: None}.get(m, "Q^T")
    cols = {n: "j", ONE: None}.get(p, "Q")
    if m == n and p == d:
        return "Q"
    if m == d and p == d:
        return "Q^T @ Q"
    if m == d and p == n:
        return "Q^T"
    parts = [x for x in (rows, cols) if x]
    return " + ".join(parts) if parts else "0"


def _p(x, elementwise: bool = True) -> tuple[str, int]:
    if not is_mat(x):
        return _scalar(x)
    if isinstance(x, MatrixSymbol):
        return x.name, P_ATOM
    if isinstance(x, Bcast):
        inner = _p(x.value)
        if elementwise:
            return inner
        return f"{_wrap(inner, P_SUM)} + 0 * ({_zero_like(x.shape)})", P_SUM
    if isinstance(x, ZeroMatrix):
        return ("0", P_ATOM) if elementwise else (f"0 * ({_zero_like(x.shape)})", P_PROD)
    if isinstance(x, Transpose):
        return _wrap(_p(x.arg, False), P_ATOM) + "^T", P_ATOM
    if isinstance(x, MatAdd):
        return _sum([(*coeff_and_mat(t),) for t in x.args], elementwise)
    if isinstance(x, MatMul):
        c, m = coeff_and_mat(x)
        if c != 1:
            return _scaled(c, _p(m, elementwise))
        return " @ ".join(_wrap(_p(a, False), P_UNARY) for a in chain_factors(x)), P_PROD
    if isinstance(x, MatPow):
        return _p(MatMul(x), elementwise)
    if isinstance(x, HadamardProduct):
        parts = sorted(_wrap(_p(a), P_UNARY) for a in x.args)
        return " * ".join(parts), P_PROD
    if isinstance(x, HadamardPower):
        if x.exp == -1:
            return f"1 / {_wrap(_p(x.base), P_UNARY)}", P_PROD
        return f"{_wrap(_p(x.base), P_ATOM)} ^ {_wrap(_scalar(x.exp), P_UNARY)}", P_POW
    if isinstance(x, Ew):
        return f"{x.fname}({_p(x.arg, False)[0]})", P_ATOM
    if isinstance(x, EwN):
        f, ops = x.fname, [_p(o) for o in x.operands]
        if f in _CMP_TXT:
            return f"{_wrap(ops[0], P_SUM)} {_CMP_TXT[f]} {_wrap(ops[1], P_SUM)}", P_CMP
        if f in ("and", "or"):
            prec = P_AND if f == "and" else P_OR
            sym = " & " if f == "and" else " | "
            parts = [_wrap(o, prec + 1) for o in ops]
            return sym.join(parts), prec
        if f == "not":
            return f"!{_wrap(ops[0], P_NOT)}", P_NOT
        full = any(is_mat(o) and not isinstance(o, Bcast) and o.shape == x.shape for o in x.operands)
        if f == "where" and not elementwise and not full:
            where = f"where({ops[0][0]}, {ops[1][0]}, {ops[2][0]})"
            return f"{where} + 0 * ({_zero_like(x.shape)})", P_SUM
        return f"{f}({', '.join(o[0] for o in ops)})", P_ATOM
    if isinstance(x, Softmax):
        return f"softmax({_p(x.args[0], False)[0]})", P_ATOM
    if isinstance(x, RowNorm):
        return f"norm({_p(x.args[0], False)[0]})", P_ATOM
    if isinstance(x, (CosSim, Dist)):
        name = "cos" if isinstance(x, CosSim) else "dist"
        return f"{name}({_p(x.args[0], False)[0]}, {_p(x.args[1], False)[0]})", P_ATOM
    raise AttncError(f"internal: cannot print {type(x).__name__}")  # pragma: no cover


def _scaled(c, inner: tuple[str, int]) -> tuple[str, int]:
    num, den = sp.fraction(sp.factor_terms(c))
    neg = num.could_extract_minus_sign()
    if neg:
        num = -num
    body = _wrap(inner, P_PROD) if (num != 1 or den != 1) else inner[0]
    if num != 1:
        body = f"{_wrap(_scalar(num), P_UNARY)} * {body}"
    if den != 1:
        body = f"{body} / {_wrap(_scalar(den), P_UNARY)}"
    prec = P_PROD if (num != 1 or den != 1) else inner[1]
    if neg:
        return f"-{_wrap((body, prec), P_UNARY)}", P_UNARY
    return body, prec


def _sum(terms, elementwise: bool) -> tuple[str, int]:
    printed = []
    for c, m in terms:
        neg = c.could_extract_minus_sign()
        s = _scaled(-c if neg else c, _p(m, True))
        printed.append((neg, _wrap(s, P_PROD)))
    printed.sort(key=lambda t: (t[1], t[0]))
    out = ""
    for k, (neg, s) in enumerate(printed):
        if k == 0:
            out = f"-{s}" if neg else s
        else:
            out += f" - {s}" if neg else f" + {s}"
    return out, P_SUM


def _scalar(x) -> tuple[str, int]:
    x = sp.sympify(x)
    if x is sp.oo:
        return "inf", P_ATOM
    if x is -sp.oo:
        return "-inf", P_UNARY
    if x is sp.pi:
        return "pi", P_ATOM
    if x is sp.E:
        return "e", P_ATOM
    if x.is_Integer:
        return (str(x), P_ATOM) if x >= 0 else (str(x), P_UNARY)
    if x.is_Rational:
        s = f"{abs(x.p)} / {x.q}"
        return (f"-({s})", P_UNARY) if x < 0 else (s, P_PROD)
    if x.is_Float:
        v = float(x)
        return (repr(v), P_ATOM) if v >= 0 else (repr(v), P_UNARY)
    if x.is_Symbol:
        return x.name, P_ATOM
    if isinstance(x, sp.Add):
        terms = [(*t.as_coeff_Mul(),) for t in sp.Add.make_args(x)]
        printed = []
        for c, m in terms:
            neg = c.could_extract_minus_sign()
            cc = -c if neg else c
            body = _scalar(m) if cc == 1 else _scalar(cc * m)
            printed.append((neg, _wrap(body, P_PROD)))
        printed.sort(key=lambda t: (t[1], t[0]))
        out = ""
        for k, (neg, s) in enumerate(printed):
            out = (f"-{s}" if neg else s) if k == 0 else out + (f" - {s}" if neg else f" + {s}")
        return out, P_SUM
    if isinstance(x, sp.Mul):
        num, den = sp.fraction(x)
        if den != 1:
            a = _scalar(num)
            return f"{_wrap(a, P_PROD)} / {_wrap(_scalar(den), P_UNARY)}", P_PROD
        c, rest = x.as_coeff_Mul()
        if c == -1:
            return f"-{_wrap(_scalar(rest), P_UNARY)}", P_UNARY
        parts = sorted(_wrap(_scalar(f), P_UNARY) for f in sp.Mul.make_args(x))
        return " * ".join(parts), P_PROD
    if isinstance(x, sp.Pow):
        b, e = x.args
        if e == sp.Rational(1, 2):
            return f"sqrt({_scalar(b)[0]})", P_ATOM
        if e.is_negative:
            return f"1 / {_wrap(_scalar(b ** -e), P_UNARY)}", P_PROD
        return f"{_wrap(_scalar(b), P_ATOM)} ^ {_wrap(_scalar(e), P_UNARY)}", P_POW
    if isinstance(x, sp.exp):
        return f"exp({_scalar(x.args[0])[0]})", P_ATOM
    fn = {sp.log: "log", sp.Abs: "abs", sp.tanh: "tanh"}
    for cls, name in fn.items():
        if isinstance(x, cls):
            return f"{name}({_scalar(x.args[0])[0]})", P_ATOM
    if isinstance(x, (sp.Max, sp.Min)):
        name = "max" if isinstance(x, sp.Max) else "min"
        args = sorted((_scalar(a)[0] for a in x.args))
        out = args[0]
        for a in args[1:]:
            out = f"{name}({out}, {a})"
        return out, P_ATOM
    if isinstance(x, sp.Piecewise):
        (a, c), (b, _) = x.args
        return f"where({_scalar(c)[0]}, {_scalar(a)[0]}, {_scalar(b)[0]})", P_ATOM
    if type(x) in _REL_TXT:
        return f"{_wrap(_scalar(x.lhs), P_SUM)} {_REL_TXT[type(x)]} {_wrap(_scalar(x.rhs), P_SUM)}", P_CMP
    if isinstance(x, sp.And):
        return " & ".join(sorted(_wrap(_scalar(a), P_NOT) for a in x.args)), P_AND
    if isinstance(x, sp.Or):
        return " | ".join(sorted(_wrap(_scalar(a), P_AND) for a in x.args)), P_OR
    if isinstance(x, sp.Not):
        return f"!{_wrap(_scalar(x.args[0]), P_NOT)}", P_NOT
    if x in (sp.true, sp.false):
        return ("1 == 1" if x is sp.true else "1 == 0"), P_CMP
    if x.is_number:  # anything else numeric (e.g. exp(2) + 1): its float value
        return _scalar(sp.Float(float(x), 17))
    raise AttncError(f"internal: cannot print scalar {x}")  # pragma: no cover


# ---- SymPy -> IR -----------------------------------------------------------------------------
# Matrix-chain order is chosen for these sizes (n long, d small), e.g. Q @ (K^T @ V).
CHAIN_COST_SIZES = {n: 512, d: 64, ONE: 1}


class LoweringError(Exception):
    """A simplified form that has no direct IR (the unsimplified graph is used instead)."""


def lower(expr, *, source: str, name: str | None, fallback: nx.DiGraph) -> nx.DiGraph:
    try:
        lw = _Lowering(source, name)
        out = lw.mat(expr, exact=True)
        return lw.gb.finish(out)
    except (LoweringError, AttncError):
        return fallback


class _Lowering:
    def __init__(self, source: str, name: str | None):
        self.gb = GraphBuilder(source, name)

    def node(self, op: Op, operands: list[int], **attrs) -> int:
        nodes = [node_of(self.gb.g, o) for o in operands]
        shape = shapes.infer(op, nodes, None)
        return self.gb.add(Node(op, tuple(operands), shape, **attrs))

    def const(self, v: float) -> int:
        return self.gb.add(Node(Op.CONST, (), (), value=float(v)))

    def fold(self, op: Op, ids: list[int]) -> int:
        """((a op b) op c) ... for an n-ary sum / product / max / min."""
        out = ids[0]
        for o in ids[1:]:
            out = self.node(op, [out, o])
        return out

    def leaf(self, op: Op, name: str, shape) -> int:
        return self.gb.add(Node(op, (), shape, name=name))

    def shape(self, nid: int):
        return node_of(self.gb.g, nid).shape

    # exact=True: the consumer needs exactly x.shape (matmul operands, softmax, outputs, ...)
    def mat(self, x, exact: bool = False) -> int:
        if not is_mat(x):
            return self.scalar(x)
        nid = self._mat(x)
        want = tuple(_dim_name(s) for s in x.shape)
        if exact and self.shape(nid) != want:
            nid = self.materialize(nid, want)
        return nid

    def materialize(self, nid: int, want) -> int:
        """x + 0 * (something of shape `want`) so a broadcast value gets its full shape."""
        src = {("n", "n"): ("i", "j"), ("n", 1): ("i",), (1, "n"): ("j",)}.get(want)
        if src is None:
            raise LoweringError(f"cannot materialize {want}")
        zero = None
        for s in src:
            leaf = self.leaf(Op.INDEX, s, ("n", 1) if s == "i" else (1, "n"))
            zero = leaf if zero is None else self.node(Op.ADD, [zero, leaf])
        return self.node(Op.ADD, [nid, self.node(Op.MUL, [self.const(0.0), zero])])

    def _mat(self, x) -> int:
        if isinstance(x, MatrixSymbol):
            if x.name in INPUT_NAMES:
                return self.leaf(Op.INPUT, x.name, ("n", "d"))
            return self.leaf(Op.INDEX, x.name, ("n", 1) if x.name == "i" else (1, "n"))
        if isinstance(x, Bcast):
            return self.mat(x.value)
        if isinstance(x, ZeroMatrix):
            return self.const(0.0)
        if isinstance(x, Transpose):
            return self.node(Op.TRANSPOSE, [self.mat(x.arg, exact=True)])
        if isinstance(x, MatAdd):
            return self._sum(x)
        if isinstance(x, MatMul):
            c, m = coeff_and_mat(x)
            if c != 1:
                return self._scaled(c, self.mat(m))
            mats = chain_factors(x)
            return self._chain([self.mat(a, exact=True) for a in mats], mats)
        if isinstance(x, MatPow):
            return self._mat(MatMul(x))
        if isinstance(x, HadamardProduct):
            return self.fold(Op.MUL, [self.mat(a) for a in x.args])
        if isinstance(x, HadamardPower):
            base = self.mat(x.base)
            if x.exp == -1:
                return self.node(Op.DIV, [self.const(1.0), base])
            if x.exp == sp.Rational(1, 2):
                return self.node(Op.SQRT, [base])
            return self.node(Op.POW, [base, self.scalar(x.exp)])
        if isinstance(x, Ew):
            return self.node(Op(x.fname), [self.mat(x.arg)])
        if isinstance(x, EwN):
            return self.node(Op(x.fname), [self.mat(o) for o in x.operands])
        if isinstance(x, Softmax):
            return self.node(Op.SOFTMAX, [self.mat(x.args[0], exact=True)])
        if isinstance(x, RowNorm):
            return self.node(Op.NORM, [self.mat(x.args[0], exact=True)])
        if isinstance(x, (CosSim, Dist)):
            op = Op.COS if isinstance(x, CosSim) else Op.DIST
            return self.node(op, [self.mat(a, exact=True) for a in x.args])
        raise LoweringError(type(x).__name__)

    def _scaled(self, c, nid: int) -> int:
        if c == -1:
            return self.node(Op.NEG, [nid])
        num, den = sp.fraction(c)
        if num == 1 and den != 1:
            return self.node(Op.DIV, [nid, self.scalar(den)])
        return self.node(Op.MUL, [self.scalar(c), nid])

    def _sum(self, x) -> int:
        terms = sorted(x.args, key=lambda t: coeff_and_mat(t)[0].could_extract_minus_sign())
        out = None
        for t in terms:
            c, m = coeff_and_mat(t)
            neg = c.could_extract_minus_sign() and out is not None
            tid = self.mat(MatMul(-c, m) if neg and c != -1 else (m if neg else t))
            if out is None:
                out = tid
            else:
                out = self.node(Op.SUB if neg else Op.ADD, [out, tid])
        return out

    def _chain(self, ids: list[int], mats: list) -> int:
        """Matrix chain product in the cheapest order for CHAIN_COST_SIZES."""
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

        def build(a: int, b: int) -> int:
            if a == b:
                return ids[a]
            s = split[a][b]
            return self.node(Op.MATMUL, [build(a, s), build(s + 1, b)])

        return build(0, k - 1)

    def scalar(self, x) -> int:
        x = sp.sympify(x)
        if x.is_number and not x.free_symbols:
            if x in (sp.oo, -sp.oo):
                return self.const(math.inf if x is sp.oo else -math.inf)
            if x.is_real is False:
                raise LoweringError("complex constant")
            try:
                return self.const(float(x))
            except TypeError as e:
                raise LoweringError(str(e)) from None
        if x.is_Symbol:
            return self.leaf(Op.SYMBOL, x.name, ())
        if isinstance(x, sp.Add):
            return self.fold(Op.ADD, [self.scalar(a) for a in x.args])
        if isinstance(x, sp.Mul):
            num, den = sp.fraction(x)
            if den != 1:
                return self.node(Op.DIV, [self.scalar(num), self.scalar(den)])
            return self.fold(Op.MUL, [self.scalar(a) for a in x.args])
        if isinstance(x, sp.Pow):
            b, e = x.args
            if e == sp.Rational(1, 2):
                return self.node(Op.SQRT, [self.scalar(b)])
            if e.is_negative:
                return self.node(Op.DIV, [self.const(1.0), self.scalar(b ** -e)])
            return self.node(Op.POW, [self.scalar(b), self.scalar(e)])
        unary = {sp.exp: Op.EXP, sp.log: Op.LOG, sp.Abs: Op.ABS, sp.tanh: Op.TANH}
        for cls, op in unary.items():
            if isinstance(x, cls):
                return self.node(op, [self.scalar(x.args[0])])
        if isinstance(x, (sp.Max, sp.Min)):
            op = Op.MAX if isinstance(x, sp.Max) else Op.MIN
            return self.fold(op, [self.scalar(a) for a in x.args])
        raise LoweringError(f"scalar {x}")


def _dim_name(s):
    return "n" if s == n else "d" if s == d else 1


__all__ = ["to_sympy", "simplify", "print_canonical", "lower", "RULES", "row_constant"]
