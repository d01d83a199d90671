"""SymPy matrix expressions for attention formulas: sizes, the small MatrixExpr classes SymPy
lacks, and helpers shared by the translation, the rules, the printer and the lowering.

Matrices are SymPy matrix expressions over symbolic sizes n and d: inputs are MatrixSymbols
(n x d), `i` is an (n x 1) and `j` a (1 x n) MatrixSymbol, and SymPy's own MatMul, MatAdd,
Transpose, HadamardProduct and HadamardPower carry products, sums, transposes and elementwise
products/powers (scalar coefficients live inside MatMul, so scalar folding, neg∘neg, x + x = 2x
and constants pulled out of matmuls come from SymPy's canonical forms). What SymPy has no
class for is added here: `Ew` (elementwise function), `EwN` (where / comparisons / logic / max /
min / pow) and `Bcast` (a scalar, row or column broadcast to a matrix shape). The structural
operations' own classes (`Softmax`, `RowNorm`, `CosSim`, `Dist`) are with their operations in
compiler/structural.py.
"""
from __future__ import annotations

import sympy as sp
from sympy import HadamardPower, HadamardProduct, MatAdd, MatMul, MatPow, MatrixExpr, ZeroMatrix
from sympy.core.symbol import Str

n, d = sp.symbols("n d", positive=True, integer=True)
DIMS = {"n": n, "d": d, 1: sp.Integer(1)}
ONE = sp.Integer(1)


# ---- custom matrix expressions ---------------------------------------------------------------


class Ew(MatrixExpr):
    """f(X) applied elementwise; f names an entry of the elementwise table (exp, log, ...)."""

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


def bcast_to(x, shape):
    """Broadcast scalar / row / column `x` to `shape` (a sympy shape)."""
    if shape == () or shape_of(x) == tuple(shape):
        return x
    return Bcast(x, *shape)


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


__all__ = ["n", "d", "DIMS", "ONE", "Ew", "EwN", "Bcast", "is_mat", "shape_of", "bcast_to",
           "coeff_and_mat", "chain_factors", "row_constant"]
