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

from . import elementwise, structural
from .errors import CheckError, ShapeError
from .ir import Op, inputs_used, is_fn, node_of, output_of, shape_str, topo
from .scalars import s_div, s_pow


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
    _check_scalars(g)
    return g


# scalar sub-expressions are evaluated at these sizes; a non-finite value is an error
SAMPLE_SIZES = ({"n": 7, "d": 5}, {"n": 512, "d": 64})
_S_UNARY = {Op.NEG: lambda x: -x}   # elementwise functions: their table's scalar form
_S_BINARY = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
             Op.DIV: s_div, Op.POW: s_pow, Op.MAX: max, Op.MIN: min}


def _check_scalars(g: nx.DiGraph) -> None:
    """Evaluate every scalar sub-expression; reject ones that are not finite (log(0), 1/0, ...)."""
    for sizes in SAMPLE_SIZES:
        val: dict[int, float] = {}
        for nid, node in topo(g):
            if node.op is Op.DIV and val.get(node.operands[1]) == 0.0:
                raise CheckError("division by zero", node.span,
                                 hint="the divisor is a constant 0 (at " + ", ".join(
                                     f"{k}={v}" for k, v in sizes.items()) + ")")
            if node.shape != () or node.is_bool or structural.get(node.op) is not None:  # where(c, a, b)
                continue
            if node.op is Op.CONST:
                val[nid] = node.value
                continue
            if node.op is Op.SYMBOL:
                val[nid] = float(sizes[node.name])
                continue
            args = [val.get(o) for o in node.operands]
            if any(a is None for a in args):
                continue
            if is_fn(node.op):
                entry = elementwise.get(node.op.value)
                if not entry.in_domain(args[0]):
                    raise CheckError(f"{entry.name}({args[0]:g}) is outside the domain of "
                                     f"{entry.name}: {entry.domain}", node.span,
                                     hint=f"{entry.name}(x) is defined only for {entry.domain}")
                fn = entry.scalar_fn()
            else:
                fn = _S_UNARY.get(node.op) or _S_BINARY.get(node.op)
            if fn is None:
                continue
            try:
                v = float(fn(*args))
            except (OverflowError, ZeroDivisionError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                at = ", ".join(f"{k}={v}" for k, v in sizes.items()) if _has_symbol(g, nid) else ""
                raise CheckError(f"this constant expression is not finite ({v}{' at ' + at if at else ''})",
                                 node.span, hint="check for division by zero, log of 0 or of a "
                                 "negative, sqrt of a negative, or overflow")
            val[nid] = v


def _has_symbol(g: nx.DiGraph, nid: int) -> bool:
    return any(node_of(g, a).op is Op.SYMBOL for a in nx.ancestors(g, nid))


def _only_fill(g: nx.DiGraph, nid: int) -> bool:
    """True when every use of const `nid` is an operand that may hold a non-finite fill (a value
    branch of a where(): the structural operation's `fill_positions`)."""
    for user in g.successors(nid):
        u = node_of(g, user)
        spec = structural.get(u.op)
        fills = spec.fill_positions if spec is not None else ()
        if any(o == nid and k not in fills for k, o in enumerate(u.operands)) or not fills:
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


__all__ = ["CheckOptions", "DEFAULT_CHECKS", "check"]
