"""SymPy -> IR: the simplified expression becomes IR again for code generation, with matrix
chains multiplied in the cheapest order (e.g. Q @ (K^T @ V): `structural.MATMUL.chain`)."""
from __future__ import annotations

import math

import networkx as nx
import sympy as sp
from sympy import (HadamardPower, HadamardProduct, MatAdd, MatMul, MatPow, MatrixSymbol, Transpose,
                   ZeroMatrix)

from . import shapes, structural
from .errors import AttncError
from .ir import INPUT_NAMES, GraphBuilder, Node, Op, fn_op, node_of
from .matexpr import Bcast, Ew, EwN, chain_factors, coeff_and_mat, d, is_mat, n


CHAIN_COST_SIZES = structural.CHAIN_COST_SIZES


class LoweringError(Exception):
    """A simplified form that has no direct IR (the unsimplified graph is used instead)."""


def to_ir(expr, *, source: str, name: str | None, fallback: nx.DiGraph) -> nx.DiGraph:
    """The simplified SymPy expression as IR again (for code generation); `fallback` when it has
    no direct IR."""
    try:
        lw = _IrBuilder(source, name)
        out = lw.mat(expr, exact=True)
        return lw.gb.finish(out)
    except (LoweringError, AttncError):
        return fallback


class _IrBuilder:
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
            return structural.MATMUL.chain([self.mat(a, exact=True) for a in mats], mats,
                                           lambda a, b: self.node(Op.MATMUL, [a, b]))
        if isinstance(x, MatPow):
            return self._mat(MatMul(x))
        if isinstance(x, HadamardProduct):
            return self.fold(Op.MUL, [self.mat(a) for a in x.args])
        if isinstance(x, HadamardPower):
            base = self.mat(x.base)
            if x.exp == -1:
                return self.node(Op.DIV, [self.const(1.0), base])
            if x.exp == sp.Rational(1, 2):
                return self.node(fn_op("sqrt"), [base])
            return self.node(Op.POW, [base, self.scalar(x.exp)])
        if isinstance(x, Ew):
            return self.node(fn_op(x.fname), [self.mat(x.arg)])
        if isinstance(x, EwN):
            return self.node(Op(x.fname), [self.mat(o) for o in x.operands])
        spec = structural.BY_EXPR.get(type(x))
        if spec is not None:   # softmax, norm, cos, dist: their op over full-shaped operands
            return self.node(spec.op, [self.mat(a, exact=True) for a in x.args])
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
                return self.node(fn_op("sqrt"), [self.scalar(b)])
            if e.is_negative:
                return self.node(Op.DIV, [self.const(1.0), self.scalar(b ** -e)])
            return self.node(Op.POW, [self.scalar(b), self.scalar(e)])
        unary = {sp.exp: "exp", sp.log: "log", sp.Abs: "abs", sp.tanh: "tanh"}
        for cls, fname in unary.items():
            if isinstance(x, cls):
                return self.node(fn_op(fname), [self.scalar(x.args[0])])
        if isinstance(x, (sp.Max, sp.Min)):
            op = Op.MAX if isinstance(x, sp.Max) else Op.MIN
            return self.fold(op, [self.scalar(a) for a in x.args])
        raise LoweringError(f"scalar {x}")


def _dim_name(s):
    return "n" if s == n else "d" if s == d else 1


__all__ = ["to_ir", "LoweringError", "CHAIN_COST_SIZES"]
