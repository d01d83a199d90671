"""IR -> SymPy: each IR node becomes a SymPy scalar or matrix expression (compiler/matexpr.py).
Elementwise functions take their definition from their table (compiler/elementwise.py),
structural operations their SymPy form from theirs (compiler/structural.py)."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import networkx as nx
import sympy as sp
from sympy import HadamardPower, HadamardProduct, MatAdd, MatMul, MatrixSymbol

from . import elementwise, structural
from .ir import GroupOp, Node, Op, is_fn, output_of, topo
from .matexpr import DIMS, Ew, EwN, bcast_to, d, is_mat, n


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
    spec = structural.get(op)
    if spec is not None:
        return spec.sympy(args, shape)
    if is_fn(op):   # a scalar gets the function's definition, a matrix an Ew node
        (x,) = args
        return elementwise.get(op.value).sympy(x) if scalar else Ew(op.value, x)
    if op is Op.NEG:
        (x,) = args
        return -x if scalar else MatMul(-1, x)
    if op in _REL or op in GroupOp.Logic or (op in (Op.MAX, Op.MIN, Op.POW) and not scalar):
        if scalar:
            if op in _REL:
                return _REL[op](*args)
            if op is Op.AND:
                return sp.And(*args)
            if op is Op.OR:
                return sp.Or(*args)
            if op is Op.NOT:
                return sp.Not(args[0])
            return _SCALAR_BIN[op](*args)
        if op is Op.POW and not is_mat(args[1]):
            return HadamardPower(args[0], args[1])
        ops = [a if not is_mat(a) else bcast_to(a, shape) for a in args]
        return EwN(op.value, *shape, *ops)
    if op in _SCALAR_BIN:
        a, b = args
        if scalar:
            return _SCALAR_BIN[op](a, b)
        if op is Op.ADD:
            return MatAdd(bcast_to(a, shape), bcast_to(b, shape))
        if op is Op.SUB:
            return MatAdd(bcast_to(a, shape), MatMul(-1, bcast_to(b, shape)))
        if op is Op.MUL:
            if not is_mat(a) or not is_mat(b):
                c, x = (a, b) if not is_mat(a) else (b, a)
                return MatMul(c, bcast_to(x, shape))
            return HadamardProduct(bcast_to(a, shape), bcast_to(b, shape))
        if op is Op.DIV:
            if not is_mat(b):
                return MatMul(1 / b, a)
            inv = HadamardPower(bcast_to(b, shape), -1)
            return MatMul(a, inv) if not is_mat(a) else HadamardProduct(bcast_to(a, shape), inv)
    raise NotImplementedError(op)  # pragma: no cover


__all__ = ["to_sympy", "number"]
