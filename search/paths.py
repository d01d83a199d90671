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
    """Yield (op, operand text, shape after) along the path; the single source of shape rules."""
    rows, cols = "n", "d"
    for op, x in path.ops:
        operand = None
        if op == "transpose":
            rows, cols = cols, rows
        elif op == "add":
            if rows == cols:
                yield op, None, None
                return
            operand = x if (rows, cols) == ("n", "d") else f"{x}^T"
        elif op == "matmul":
            # X is n x d: x @ X needs x to have n columns, x @ X^T needs d columns
            operand = x if cols == "n" else f"{x}^T"
            cols = "d" if cols == "n" else "n"
        elif op in ("cos", "dist"):
            # pairwise over rows: both operands need the same number of columns
            operand = x if cols == "d" else f"{x}^T"
            cols = "n" if cols == "d" else "d"
        yield op, operand, (rows, cols)


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
