"""Canonical printing: a simplified SymPy expression as DSL text (re-parseable; commutative
operands sorted, so equal expressions print alike; the formula hash is sha256 of this text)."""
from __future__ import annotations

import sympy as sp
from sympy import (HadamardPower, HadamardProduct, MatAdd, MatMul, MatPow, MatrixSymbol, Transpose,
                   ZeroMatrix)

from . import structural
from .errors import AttncError
from .matexpr import ONE, Bcast, Ew, EwN, chain_factors, coeff_and_mat, d, is_mat, n


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
    spec = structural.BY_EXPR.get(type(x))
    if spec is not None:   # softmax(x), norm(x), cos(x, y), dist(x, y): its name and operands
        return f"{spec.name}({', '.join(_p(a, False)[0] for a in x.args)})", P_ATOM
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


__all__ = ["print_canonical"]
