"""The rewrite rules of the SymPy stage, and `simplify` (apply them bottom-up to a fixpoint).

Each rule takes a node whose children are already simplified and returns a replacement, or
None when it does not apply. The law is in the rule's name. Adding a rule is adding a line:
here for algebra shared by every operation, in the operation's entry (compiler/structural.py)
for a law of one structural operation.
"""
from __future__ import annotations

from typing import Callable

import sympy as sp
from sympy import HadamardPower, HadamardProduct, MatAdd, MatMul, MatrixSymbol, Transpose, ZeroMatrix

from . import elementwise, structural
from .errors import CheckError
from .matexpr import ONE, Bcast, Ew, EwN, chain_factors, coeff_and_mat, is_mat, row_constant, shape_of


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
    if type(a) in structural.BY_EXPR:                   # cos(a, b)^T = cos(b, a), ...
        return structural.BY_EXPR[type(a)].transposed(a)
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
        if c != 1 and isinstance(m, Bcast) and not is_mat(m.value):   # c * bcast_to(s) -> bcast_to(c s)
            return Bcast(c * m.value, *m.shape)
        if isinstance(m, MatMul):   # A @ bcast_to(s) @ B -> s * (A @ bcast_to(1) @ B): constants leave @
            factors = chain_factors(m)
            scal = [f for f in factors if isinstance(f, Bcast) and not is_mat(f.value) and f.value != 1]
            if scal:
                coeff = c * sp.Mul(*[f.value for f in scal])
                factors = [Bcast(ONE, *f.shape) if f in scal else f for f in factors]
                return MatMul(coeff, *factors)
    if isinstance(x, (MatAdd, HadamardProduct)):
        # bcast_to(a) + bcast_to(b) -> bcast_to(a + b), bcast_to(a) * bcast_to(b) -> bcast_to(a * b), for broadcasts
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
        inner = elementwise.get(x.fname).sympy(v) if not is_mat(v) else Ew(x.fname, v)
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


RULES: list[tuple[str, Callable]] = [
    ("canonical sums and products (x + x = 2x, neg∘neg, scalar folding, (cA)B = c(AB))",
     lambda x: _canon(x) if isinstance(x, (MatAdd, MatMul, HadamardProduct)) else None),
    ("scalars distribute over sums (c(a + b) = ca + cb)", _distribute),
    ("scalar coefficients in expanded form", _expand_scalars),
    ("transposes move to the leaves ((AB)^T = B^T A^T, x^T^T = x, f(x)^T = f(x^T))", _transpose_in),
    ("scalars leave elementwise products (cA ∘ B = c(A ∘ B))", _hadamard_scalars),
    ("elementwise powers (x^1 = x, (cx)^p = c^p x^p, (x^a)^b = x^ab)", _hadamard_power),
    ("broadcasts fold (c + c' , c * bcast_to(s), bcast of a full matrix)", _bcast_fold),
    ("elementwise functions of constants are constants", _ew_const),
    ("elementwise identities (log exp x = x, log(1 + e^x) = softplus x, |−x| = |x|)", _ew_identities),
    ("-softplus(-x) = logsigmoid(x)", _logsigmoid),
    ("max / min / pow of constants are constants", _ewn_const),
    # each structural operation's own laws (compiler/structural.py): softmax's shift invariance,
    # norm(c x) = |c| norm(x), cos's scale invariance, dist(c x, c y) = |c| dist(x, y),
    # where(c, x, x) = x. Every rule rewrites only nodes of its own class, so their place in
    # this list does not change any result.
    *structural.rules(),
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


__all__ = ["RULES", "MAX_REWRITES", "simplify", "row_constant"]  # row_constant: compiler/matexpr.py
