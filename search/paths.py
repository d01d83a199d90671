"""Attention formulas as small computation graphs: a start input and a sequence of primitives.

A path is ("Q", (("matmul", "K"), ("scale", None), ("softmax", None), ("matmul", "V"))): node 0 is
the start input (n x d) and op p makes node p + 1. An op reads the previous node (node p), or the
earlier node its `src` names; a binary op combines that with its operand: one of the inputs
Q, K, V, P, or any earlier node of the path (0 .. p, an int). So the space is the paper's graph, not
only a chain: AutoBERT-Zero's layer 2, softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q), is

    K; add Q -> node 1 = K + Q; (src 0) neg; logsigmoid; neg; scale; matmul Q; transpose; softmax;
    matmul node 1

Binary ops orient their operand so the shapes fit (x @ K if x has n columns, x @ K^T if it has d;
the same for a node), so only `add` on mismatched shapes and a final shape other than n x d are
shape errors; those are caught by a cheap pre-check, everything else by the compiler
(attnc.analyze). Paths give the positions that operation priorities (Equation 3) are kept for.

An op is (name, operand) or (name, operand, src): operand None for unary ops, an input name or a
node index for binary ones; src None (the previous node) or an earlier node index. Paths written by
earlier versions (operands only inputs, no src) read unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

INPUTS = ("Q", "K", "V", "P")
UNARY = ("neg", "transpose", "scale", "softmax", "logsigmoid", "softsign")
BINARY = ("add", "matmul", "cos", "dist")
TABLE1 = UNARY + BINARY          # the paper's Table 1 primitives
EXTRA_UNARY = ("exp", "log", "sqrt", "abs", "tanh", "sigmoid", "softplus", "relu")
NODE = "node"                    # the operand category "an earlier node" (operand priorities)


@dataclass(frozen=True)
class Path:
    start: str
    ops: tuple[tuple, ...]

    def __post_init__(self):
        ops = tuple(tuple(o) if len(o) == 3 and o[2] is not None else (o[0], o[1]) for o in self.ops)
        object.__setattr__(self, "ops", ops)

    def to_json(self) -> dict:
        return {"start": self.start, "ops": [list(o) for o in self.ops]}

    @classmethod
    def from_json(cls, d: dict) -> Path:
        return cls(d["start"], tuple(tuple(o) for o in d["ops"]))

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(o[0] for o in self.ops)

    @property
    def inputs(self) -> frozenset[str]:
        """The raw inputs the path reads (some may still cancel out in the compiler)."""
        return frozenset([self.start] + [o[1] for o in self.ops if isinstance(o[1], str)])

    def operand(self, p: int):
        return self.ops[p][1]

    def src(self, p: int) -> int:
        """The node op p reads first: its src, or the previous node p."""
        o = self.ops[p]
        return o[2] if len(o) == 3 else p


def operand_category(x) -> str | None:
    """An operand's category for priorities: the input's name, NODE for an earlier node, None (unary)."""
    return None if x is None else (x if isinstance(x, str) else NODE)


def valid_refs(path: Path) -> bool:
    """Every node reference of op p names a node 0..p (src: 0..p-1 or none)."""
    for p, o in enumerate(path.ops):
        x = o[1]
        if isinstance(x, bool) or (isinstance(x, int) and not 0 <= x <= p) or \
                (x is not None and not isinstance(x, int) and x not in INPUTS):
            return False
        if len(o) == 3 and not (isinstance(o[2], int) and 0 <= o[2] < p):
            return False
    return path.start in INPUTS


def walk(path: Path):
    """Yield (op, first operand node, operand text, shape after) along the path; shape after is None
    at the first op that does not fit. The shapes come from the compiler's rules
    (compiler/structural.py, and broadcasting for add); a binary op takes its operand as X or, when
    only that fits, as X^T. The operand text is the input's name or "#j" for node j (with "^T")."""
    from attnc.compiler import structural
    from attnc.compiler.errors import ShapeError
    from attnc.compiler.ir import Op
    from attnc.compiler.names import function

    shapes = [("n", "d")]
    for p, o in enumerate(path.ops):
        op, x = o[0], o[1]
        src = path.src(p)
        shape = shapes[src]
        operand = None
        found = function(op)
        spec = structural.get(found[0]) if found else None
        try:
            if x is None:      # unary: transpose swaps, the rest keep the shape
                shape = spec.shape([shape], None) if spec is not None else shape
            else:              # binary: X or X^T, whichever fits
                rule = spec.shape if spec is not None else \
                    (lambda shapes_, span: structural.broadcast(Op.ADD, shapes_, span))
                xs = ("n", "d") if isinstance(x, str) else shapes[x]
                name = x if isinstance(x, str) else f"#{x}"
                fits = []
                for text, s in ((name, xs), (f"{name}^T", (xs[1], xs[0]))):
                    try:
                        fits.append((text, rule([shape, s], None)))
                    except ShapeError:
                        pass
                if not fits:           # e.g. add to a square matrix
                    raise ShapeError(f"{op} does not fit")
                operand, shape = fits[0]
        except ShapeError:
            yield op, src, None, None
            return
        shapes.append(shape)
        yield op, src, operand, shape


def check_shapes(path: Path) -> bool:
    if not valid_refs(path):
        return False
    shape = ("n", "d")
    for *_, shape in walk(path):
        if shape is None:
            return False
    return shape == ("n", "d")


def to_text(path: Path) -> str:
    """Formula text of a path (then canonicalised by the compiler). A node read more than once is
    bound with `let`, so the text stays linear in the path's length."""
    uses = [0] * (len(path.ops) + 1)
    for p, o in enumerate(path.ops):
        uses[path.src(p)] += 1
        if isinstance(o[1], int):
            uses[o[1]] += 1
    lines, expr = [], [path.start]

    def ref(j: int) -> str:
        return expr[j]

    for p, (op, src, operand, _) in enumerate(walk(path)):
        e = ref(src)
        if operand is not None and operand.startswith("#"):
            j, t = operand[1:].removesuffix("^T"), operand.endswith("^T")
            operand = f"({ref(int(j))})" + ("^T" if t else "")
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
        if uses[p + 1] > 1:
            lines.append(f"let x{p + 1} = {e}")
            e = f"x{p + 1}"
        expr.append(e)
    return "; ".join(lines + [expr[-1]])


def insert_op(path: Path, p: int, op: tuple) -> Path:
    """`op` inserted at position p (it reads the previous node; the op that was at p now reads it):
    node references after it are renumbered."""
    def shift(j):
        return j + 1 if isinstance(j, int) and not isinstance(j, bool) and j >= p + 1 else j
    ops = list(path.ops[:p]) + [op]
    for o in path.ops[p:]:
        ops.append((o[0], shift(o[1])) + ((shift(o[2]),) if len(o) == 3 else ()))
    return Path(path.start, tuple(ops))


def remove_op(path: Path, p: int) -> Path:
    """The op at position p removed: readers of its node read its first operand instead."""
    gone, into = p + 1, path.src(p)

    def shift(j):
        if not isinstance(j, int) or isinstance(j, bool):
            return j
        return into if j == gone else (j - 1 if j > gone else j)
    ops = list(path.ops[:p])
    for q, o in enumerate(path.ops[p + 1:], start=p + 1):
        src = shift(path.src(q))
        if src == q - 1:   # now simply the previous node
            src = None
        ops.append((o[0], shift(o[1])) + ((src,) if src is not None else ()))
    return Path(path.start, tuple(ops))
