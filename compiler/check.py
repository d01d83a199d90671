"""Graph-level legality checks (per-op shape rules live in shapes.py and run while parsing).

`check(graph, options)` returns the graph unchanged or raises a ShapeError / CheckError that
points at the formula. Rules, in order: the value is a number (not a condition), it is n x d
so layers stack, it uses between options.min_inputs and options.max_inputs distinct inputs,
and no constant is non-finite except as a where()/mask() fill value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from .errors import CheckError, ShapeError
from .ir import GroupOp, Op, inputs_used, node_of, output_of, shape_str, topo


@dataclass(frozen=True)
class CheckOptions:
    min_inputs: int = 2            # AutoBERT-Zero's search space uses 2-4 of Q, K, V, P
    max_inputs: int = 4
    output_shape: tuple = ("n", "d")  # so layers stack


DEFAULT_CHECKS = CheckOptions()


def check(g: nx.DiGraph, options: CheckOptions = DEFAULT_CHECKS) -> nx.DiGraph:
    out = node_of(g, output_of(g))
    if out.is_bool:
        raise ShapeError("the formula's value is a condition, not a number", out.span,
                         hint="use the condition inside where(cond, x, y) or mask(x, cond)")
    if out.shape != tuple(options.output_shape):
        raise ShapeError(f"the output must be {shape_str(tuple(options.output_shape))} so layers "
                         f"stack, but it is {shape_str(out.shape)}", out.span,
                         hint=_output_hint(out.shape))
    used = inputs_used(g)
    if not used:
        raise CheckError("the output does not depend on any input (Q, K, V, P)", out.span,
                         hint="an attention formula must read its inputs, e.g. softmax(Q @ K^T) @ V")
    if not options.min_inputs <= len(used) <= options.max_inputs:
        few = len(used) < options.min_inputs
        raise CheckError(f"the formula uses {len(used)} distinct input{'s' * (len(used) != 1)} "
                         f"({' '.join(used)}); between {options.min_inputs} and {options.max_inputs} "
                         "are allowed", out.span,
                         hint="use another of Q, K, V, P" if few else "use fewer inputs, or raise "
                         "max_inputs (CheckOptions / --max-inputs)")
    for nid, node in topo(g):
        if node.op is Op.CONST and not math.isfinite(node.value):
            if math.isnan(node.value) or not _only_fill(g, nid):
                raise CheckError(f"non-finite constant {node.value} used in arithmetic", node.span,
                                 hint="inf may only fill masked entries: where(cond, x, -inf) or "
                                      "mask(x, cond)")
    return g


def _only_fill(g: nx.DiGraph, nid: int) -> bool:
    """True when every use of const `nid` is a value branch of a where()."""
    for user in g.successors(nid):
        u = node_of(g, user)
        if u.op is not Op.WHERE or u.operands[0] == nid:
            return False
    return True


def _output_hint(shape) -> str:
    if shape == ():
        return "the value is a scalar; multiply it with a matrix of inputs"
    if shape == ("n", "n"):
        return "that is an attention matrix: multiply it by the values, e.g. softmax(...) @ V"
    if shape == ("d", "n"):
        return "transpose it (x^T) or reorder the matmul"
    if shape == ("d", "d"):
        return "multiply on the left by an (n, d) input, e.g. Q @ (K^T @ V)"
    if 1 in shape:
        return "a row-reduced value (norm) needs to scale an (n, d) matrix, e.g. Q / norm(Q)"
    return "the output must be (n, d)"


def fill_only_consts(g: nx.DiGraph) -> frozenset[int]:
    return frozenset(nid for nid, n in topo(g) if n.op is Op.CONST and not math.isfinite(n.value))


__all__ = ["CheckOptions", "DEFAULT_CHECKS", "check", "GroupOp"]
