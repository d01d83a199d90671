"""Attention formulas as paths: a start input and a sequence of Table 1 primitives.

A path is ("Q", (("matmul", "K"), ("scale", None), ("softmax", None), ("matmul", "V"))): the
running expression starts at an input (n x d); a unary op wraps it, a binary op combines it with
one more input. Binary ops orient their input so the shapes fit (x @ K if x has n columns, x @ K^T
if it has d), so only `add` on a square matrix and a final shape other than n x d are shape errors;
those are caught by a cheap pre-check, everything else by the compiler (attnc.analyze). Paths
give the positions that operation priorities (Equation 3) are kept for.
"""
from __future__ import annotations

from dataclasses import dataclass

INPUTS = ("Q", "K", "V", "P")
UNARY = ("neg", "transpose", "scale", "softmax", "logsigmoid", "softsign")
BINARY = ("add", "matmul", "cos", "dist")
TABLE1 = UNARY + BINARY          # the paper's Table 1 primitives
EXTRA_UNARY = ("exp", "log", "sqrt", "abs", "tanh", "sigmoid", "softplus", "relu")


@dataclass(frozen=True)
class Path:
    start: str
    ops: tuple[tuple[str, str | None], ...]

    def to_json(self) -> dict:
        return {"start": self.start, "ops": [list(o) for o in self.ops]}

    @classmethod
    def from_json(cls, d: dict) -> Path:
        return cls(d["start"], tuple((o[0], o[1]) for o in d["ops"]))

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(o for o, _ in self.ops)

    @property
    def inputs(self) -> frozenset[str]:
        return frozenset([self.start] + [x for _, x in self.ops if x is not None])


def walk(path: Path):
    """Yield (op, operand text, shape after) along the path; shape after is None at the first op
    that does not fit. The shapes come from the compiler's rules (compiler/structural.py, and
    broadcasting for add); a binary op takes its input as X or, when only that fits, as X^T."""
    from attnc.compiler import structural
    from attnc.compiler.errors import ShapeError
    from attnc.compiler.ir import Op
    from attnc.compiler.names import function

    shape = ("n", "d")
    for op, x in path.ops:
        operand = None
        found = function(op)
        spec = structural.get(found[0]) if found else None
        try:
            if x is None:      # unary: transpose swaps, the rest keep the shape
                shape = spec.shape([shape], None) if spec is not None else shape
            else:              # binary: X (n x d) or X^T (d x n), whichever fits
                rule = spec.shape if spec is not None else \
                    (lambda shapes, span: structural.broadcast(Op.ADD, shapes, span))
                fits = []
                for text, xs in ((x, ("n", "d")), (f"{x}^T", ("d", "n"))):
                    try:
                        fits.append((text, rule([shape, xs], None)))
                    except ShapeError:
                        pass
                if not fits:           # e.g. add to a square matrix
                    raise ShapeError(f"{op} does not fit")
                operand, shape = fits[0]
        except ShapeError:
            yield op, None, None
            return
        yield op, operand, shape


def check_shapes(path: Path) -> bool:
    shape = ("n", "d")
    for _, _, shape in walk(path):
        if shape is None:
            return False
    return shape == ("n", "d")


def to_text(path: Path) -> str:
    """Formula text of a path (then canonicalised by the compiler)."""
    e = path.start
    for op, operand, _ in walk(path):
        if op == "neg":
            e = f"-({e})"
        elif op == "transpose":
            e = f"({e})^T"
        elif op == "add":
            e = f"({e} + {operand})"
        elif op == "matmul":
            e = f"({e}) @ {operand}"
        elif op in ("cos", "dist"):
            e = f"{op}({e}, {operand})"
        else:   # unary function call
            e = f"{op}({e})"
    return e
