"""Shape rules: one small function per op, over symbolic dims ("n", "d", 1).

`infer(op, operand_nodes, span)` returns the result shape or raises ShapeError naming
the op, its position, the operand shapes and a fix. The parser calls it as it builds
each node, so ill-shaped formulas fail at the first offending operation.
"""
from __future__ import annotations

from typing import Callable

from .errors import ShapeError, Span
from .ir import GroupOp, Node, Op, Shape, is_fn, shape_str


OP_TEXT = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "^", Op.MATMUL: "@",
           Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
           Op.AND: "&", Op.OR: "|", Op.NOT: "!", Op.NEG: "-", Op.TRANSPOSE: "^T"}


def op_text(op: Op) -> str:
    return f"'{OP_TEXT[op]}'" if op in OP_TEXT else f"{op.value}()"


def _fail(op: Op, span: Span | None, what: str, shapes: list[Shape], hint: str) -> ShapeError:
    got = ", ".join(shape_str(s) for s in shapes)
    return ShapeError(f"{op_text(op)} {what}; operand shapes: {got}", span, hint=hint)


def broadcast(op: Op, shapes: list[Shape], span: Span | None) -> Shape:
    mats = [s for s in shapes if s != ()]
    if not mats:
        return ()
    out = list(mats[0])
    for s in mats[1:]:
        for ax in range(2):
            a, b = out[ax], s[ax]
            if a == b or b == 1:
                continue
            if a == 1:
                out[ax] = b
                continue
            raise _fail(op, span, f"needs shapes that match or broadcast (dim {ax}: {a} vs {b})",
                        shapes, "elementwise operations take equal shapes, scalars, or (x, 1)/(1, x) "
                        "rows and columns; a '@' or '^T' may be missing")
    return tuple(out)


def _matrix(op: Op, shapes: list[Shape], span: Span | None, hint: str) -> None:
    if any(s == () for s in shapes):
        raise _fail(op, span, "needs matrices, not scalars", shapes, hint)


def _matmul(op: Op, shapes: list[Shape], span: Span | None) -> Shape:
    _matrix(op, shapes, span, "use '*' to multiply by a scalar")
    a, b = shapes
    if a[1] != b[0]:
        if a[1] == b[1]:
            hint = "transpose the right operand, e.g. Q @ K^T"
        elif a[0] == b[0]:
            hint = "transpose the left operand, e.g. A^T @ B"
        else:
            hint = "the inner dimensions must agree: (a, b) @ (b, c)"
        raise _fail(op, span, f"inner dimensions differ ({a[1]} vs {b[0]})", shapes, hint)
    return (a[0], b[1])


def _pairwise(op: Op, shapes: list[Shape], span: Span | None) -> Shape:
    _matrix(op, shapes, span, f"{op.value}(x, y) compares the rows of two matrices")
    a, b = shapes
    if a[1] != b[1]:
        raise _fail(op, span, f"compares rows of different lengths ({a[1]} vs {b[1]})", shapes,
                    f"{op.value}(x, y) needs rows of equal length, e.g. {op.value}(Q, K)")
    return (a[0], b[0])


def _rowwise(keep_last: bool) -> Callable:
    def rule(op: Op, shapes: list[Shape], span: Span | None) -> Shape:
        _matrix(op, shapes, span, f"{op.value}() works on the rows of a matrix")
        (a,) = shapes
        return a if keep_last else (a[0], 1)
    return rule


def _transpose(op: Op, shapes: list[Shape], span: Span | None) -> Shape:
    _matrix(op, shapes, span, "a scalar needs no transpose")
    (a,) = shapes
    return (a[1], a[0])


def _same(op: Op, shapes: list[Shape], span: Span | None) -> Shape:
    return shapes[0]


SHAPE_RULES: dict[Op, Callable[[Op, list[Shape], Span | None], Shape]] = {
    **{op: _same for op in GroupOp.Unary},
    **{op: broadcast for op in GroupOp.Binary | GroupOp.Compare | GroupOp.Logic},
    Op.WHERE: broadcast,
    Op.MATMUL: _matmul,
    Op.COS: _pairwise,
    Op.DIST: _pairwise,
    Op.TRANSPOSE: _transpose,
    Op.SCALE: _rowwise(True),
    Op.SOFTMAX: _rowwise(True),
    Op.NORM: _rowwise(False),
}


def infer(op: Op, operands: list[Node], span: Span | None) -> Shape:
    """Result shape of `op` applied to `operands`, with boolean-ness checked too."""
    _check_bools(op, operands, span)
    rule = _same if is_fn(op) else SHAPE_RULES[op]   # elementwise functions keep the shape
    return rule(op, [x.shape for x in operands], span)


def _check_bools(op: Op, operands: list[Node], span: Span | None) -> None:
    if op in GroupOp.Logic:
        for x in operands:
            if not x.is_bool:
                raise ShapeError(f"{op_text(op)} combines conditions, but an operand is a number",
                                 x.span or span, hint="compare first, e.g. (j <= i) & (i - j < 8)")
        return
    if op is Op.WHERE:
        cond, *vals = operands
        if not cond.is_bool:
            raise ShapeError("where()/mask() needs a condition such as j <= i", cond.span or span,
                             hint="write where(j <= i, x, -inf) or mask(x, j <= i)")
        operands = vals
    for x in operands:
        if x.is_bool:
            raise ShapeError(f"{op_text(op)} got a condition where a number is needed",
                             x.span or span,
                             hint="conditions can only be used in where(cond, x, y) or mask(x, cond)")
