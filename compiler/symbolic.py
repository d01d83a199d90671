"""The SymPy stage: IR -> SymPy matrix expression -> rewrite rules -> canonical text -> IR.

One module per job; this one re-exports them (the public imports of attnc.compiler.symbolic):

    matexpr.py     sizes n, d; the MatrixExpr classes SymPy lacks (Ew, EwN, Bcast) and shared
                   helpers
    structural.py  the structural operations, each with its SymPy class (Softmax, RowNorm,
                   CosSim, Dist), form and laws
    translate.py   `to_sympy`: IR -> SymPy
    rules.py       `RULES` (one named line per law) and `simplify` (bottom-up to a fixpoint)
    printer.py     `print_canonical`: SymPy -> canonical DSL text
    to_ir.py       `to_ir`: SymPy -> IR for code generation
"""
from __future__ import annotations

from .matexpr import (DIMS, ONE, Bcast, Ew, EwN, bcast_to, chain_factors, coeff_and_mat, d, is_mat, n,
                      shape_of)
from .printer import print_canonical
from .rules import MAX_REWRITES, RULES, row_constant, simplify
from .structural import CosSim, Dist, RowNorm, Softmax
from .to_ir import CHAIN_COST_SIZES, LoweringError, to_ir
from .translate import number, to_sympy

__all__ = ["to_sympy", "simplify", "print_canonical", "to_ir", "RULES", "row_constant", "number",
           "n", "d", "DIMS", "ONE", "Ew", "EwN", "Softmax", "RowNorm", "CosSim", "Dist", "Bcast",
           "is_mat", "shape_of", "bcast_to", "coeff_and_mat", "chain_factors", "MAX_REWRITES",
           "CHAIN_COST_SIZES", "LoweringError"]
