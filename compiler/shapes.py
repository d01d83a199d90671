"""Shape rules over symbolic dims ("n", "d", 1).

`infer(op, operand_nodes, span)` returns the result shape or raises ShapeError naming the op,
its position, the operand shapes and a fix. The parser calls it as it builds each node, so
ill-shaped formulas fail at the first offending operation. Arithmetic broadcasts and elementwise
functions keep their operand's shape; each structural operation (matmul, transpose, softmax,
...) has its rule in its entry of compiler/structural.py.
"""
from __future__ import annotations

from .errors import ShapeError, Span
from .ir import GroupOp, Node, Op, Shape, is_fn
from .structural import broadcast, op_text
from .structural import get as structural

__all__ = ["infer", "broadcast", "op_text"]


def infer(op: Op, operands: list[Node], span: Span | None) -> Shape:
    """Result shape of `op` applied to `operands`, with boolean-ness checked too."""
    spec = structural(op)
    numbers = _check_bools(op, operands, span) if spec is None else spec.check_operands(operands, span)
    _check_numbers(op, numbers, span)
    shapes = [x.shape for x in operands]
    if spec is not None:
        return spec.shape(shapes, span)
    if is_fn(op) or op in GroupOp.Unary:       # elementwise functions and neg keep the shape
        return shapes[0]
    return broadcast(op, shapes, span)


def _check_bools(op: Op, operands: list[Node], span: Span | None) -> list[Node]:
    """Logic combines conditions; everything else takes numbers (returned to be checked)."""
    if op in GroupOp.Logic:
        for x in operands:
            if not x.is_bool:
                raise ShapeError(f"{op_text(op)} combines conditions, but an operand is a number",
                                 x.span or span, hint="compare first, e.g. (j <= i) & (i - j < 8)")
        return []
    return operands


def _check_numbers(op: Op, operands: list[Node], span: Span | None) -> None:
    for x in operands:
        if x.is_bool:
            raise ShapeError(f"{op_text(op)} got a condition where a number is needed",
                             x.span or span,
                             hint="conditions can only be used in where(cond, x, y) or mask(x, cond)")
