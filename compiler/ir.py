"""The one IR everyone imports: the Op enum, op groups, the frozen Node and graph helpers.

A formula is a networkx.DiGraph. Each graph node id (an int) carries exactly one
frozen `Node` under the attribute "node"; edges run operand -> user and carry
`index` (the operand position). `graph.graph` holds "output" (the output node id),
"source" (the formula text) and "name" (the formula's name, if any).

Shapes are symbolic: a tuple of dims, each "n" (sequence length), "d" (head dim)
or 1; () is a scalar. Per head, inputs Q, K, V, P are (n, d); the position index
`i` is (n, 1) (the query row) and `j` is (1, n) (the key column), so `i - j`
broadcasts to (n, n).
"""
from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import networkx as nx

from .errors import Span

Dim = "str | int"
Shape = tuple  # tuple[Dim, ...]

INPUT_NAMES = ("Q", "K", "V", "P")
SYMBOL_NAMES = ("n", "d")
INDEX_NAMES = ("i", "j")


class Op(enum.Enum):
    # leaves
    INPUT = "input"          # attrs: name in Q K V P; shape (n, d)
    CONST = "const"          # attrs: value (float); shape ()
    SYMBOL = "symbol"        # attrs: name in n d; shape ()
    INDEX = "index"          # attrs: name in i j; shape (n, 1) / (1, n)
    # arithmetic (elementwise, broadcasting)
    NEG = "neg"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    MAX = "max"
    MIN = "min"
    # elementwise functions (exp, log, softplus, user-registered, ...) are not here: they are
    # data (compiler/elementwise.py), and their nodes carry an `Fn` op (below)
    # comparisons and logic (boolean results; only usable as conditions)
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"          # where(cond, a, b)
    # structural operations: each defined in one place, compiler/structural.py
    MATMUL = "matmul"
    TRANSPOSE = "transpose"
    SCALE = "scale"          # x / sqrt(last dim of x)
    SOFTMAX = "softmax"      # row-wise, last axis
    NORM = "norm"            # row-wise L2 norm, keepdim: (a, b) -> (a, 1)
    COS = "cos"              # pairwise cosine similarity over rows: (a, m), (b, m) -> (a, b)
    DIST = "dist"            # pairwise euclidean distance over rows: (a, m), (b, m) -> (a, b)


class Fn:
    """The op of an elementwise-function node: one interned object per function name, so that
    `node.op is fn_op("exp")` and `node.op.value == "exp"` work like an Op member's. The
    function's meaning lives in the table of compiler/elementwise.py."""

    __slots__ = ("value",)
    _interned: dict[str, "Fn"] = {}

    def __new__(cls, name: str):
        op = cls._interned.get(name)
        if op is None:
            op = super().__new__(cls)
            object.__setattr__(op, "value", name)
            cls._interned[name] = op
        return op

    def __setattr__(self, key, value):
        raise AttributeError("Fn is immutable")

    def __reduce__(self):
        return (fn_op, (self.value,))

    def __repr__(self) -> str:
        return f"<Fn.{self.value}>"


def fn_op(name: str) -> Fn:
    return Fn(name)


def is_fn(op) -> bool:
    """True for an elementwise function (exp, log, ..., a registered one)."""
    return isinstance(op, Fn)


class GroupOp:
    """Groups of the elementwise ops (arithmetic, comparisons, logic, where). Elementwise
    functions (`Fn`) belong to Unary and Elementwise too: test them with `is_fn(op)`. Facts about
    the structural operations are attributes of their entries in compiler/structural.py."""

    Leaf = frozenset({Op.INPUT, Op.CONST, Op.SYMBOL, Op.INDEX})
    Unary = frozenset({Op.NEG})
    Binary = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN})
    Compare = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
    Logic = frozenset({Op.AND, Op.OR, Op.NOT})
    Boolean = Compare | Logic
    Elementwise = Unary | Binary | Compare | Logic | frozenset({Op.WHERE})
    Commutative = frozenset({Op.ADD, Op.MUL, Op.MAX, Op.MIN, Op.EQ, Op.NE, Op.AND, Op.OR})


# Arithmetic, comparisons and logic: how they are written (messages) and their DSL function
# names. The structural operations (matmul, transpose, scale, softmax, norm, cos, dist, where /
# mask) carry their own names, docs and rules in compiler/structural.py; elementwise functions
# in compiler/elementwise.py. `compiler/names.py` looks a name up in all three.
ARITH_TEXT = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "^",
              Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
              Op.AND: "&", Op.OR: "|", Op.NOT: "!", Op.NEG: "-"}

FUNCTIONS: dict[str, tuple[Op, int]] = {
    "neg": (Op.NEG, 1), "max": (Op.MAX, 2), "min": (Op.MIN, 2), "pow": (Op.POW, 2), "add": (Op.ADD, 2),
}

# Math of the arithmetic ops, for the README's reference, `attnc ops`, and error hints.
OP_DOC: dict[Op, str] = {
    Op.NEG: "-x", Op.ADD: "x + y (broadcasting)", Op.SUB: "x - y", Op.MUL: "x * y elementwise",
    Op.DIV: "x / y elementwise", Op.POW: "x ^ c, elementwise power", Op.MAX: "max(x, y) elementwise",
    Op.MIN: "min(x, y) elementwise",
}


@dataclass(frozen=True)
class Node:
    """One IR operation. Change only through `replace(node, ...)`."""

    op: "Op | Fn"
    operands: tuple[int, ...] = ()          # graph node ids, in order
    shape: Shape = ()                       # symbolic shape
    name: str | None = None                 # INPUT / SYMBOL / INDEX name
    value: float | None = None              # CONST value
    span: Span | None = field(default=None, compare=False)

    def replace(self, **kw) -> "Node":
        return replace(self, **kw)

    @property
    def is_bool(self) -> bool:
        return self.op in GroupOp.Boolean


class GraphBuilder:
    """Builds a formula graph, hash-consing identical nodes (same op, operands, attrs)."""

    def __init__(self, source: str = "", name: str | None = None):
        self.g = nx.DiGraph(source=source, name=name, output=None)
        self._memo: dict[tuple, int] = {}

    def add(self, node: Node) -> int:
        key = (node.op, node.operands, node.name, node.value)
        if node.op is Op.CONST and node.value is not None:
            key = (node.op, (), None, float(node.value).hex())
        if key in self._memo:
            return self._memo[key]
        nid = len(self.g)
        self.g.add_node(nid, node=node)
        for idx, src in enumerate(node.operands):
            # an operand used twice (x * x) keeps one edge; positions live on the Node
            self.g.add_edge(src, nid, index=idx)
        self._memo[key] = nid
        return nid

    def finish(self, output: int) -> nx.DiGraph:
        self.g.graph["output"] = output
        return prune(self.g)


def node_of(g: nx.DiGraph, nid: int) -> Node:
    return g.nodes[nid]["node"]


def output_of(g: nx.DiGraph) -> int:
    return g.graph["output"]


def topo(g: nx.DiGraph) -> Iterator[tuple[int, Node]]:
    """Nodes in a deterministic topological order (ties broken by node id)."""
    for nid in nx.lexicographical_topological_sort(g):
        yield nid, g.nodes[nid]["node"]


def prune(g: nx.DiGraph) -> nx.DiGraph:
    """Drop nodes the output does not depend on (unused let bindings)."""
    out = g.graph["output"]
    keep = nx.ancestors(g, out) | {out}
    if len(keep) == len(g):
        return g
    return g.subgraph(keep).copy()


def inputs_used(g: nx.DiGraph) -> tuple[str, ...]:
    names = {n.name for _, n in _nodes(g) if n.op is Op.INPUT}
    return tuple(x for x in INPUT_NAMES if x in names)


def op_counts(g: nx.DiGraph) -> dict[str, int]:
    c = Counter(n.op.value for _, n in _nodes(g) if n.op not in GroupOp.Leaf)
    return dict(sorted(c.items()))


def path_length(g: nx.DiGraph) -> int:
    """Operations on the longest input -> output path (leaves not counted)."""
    depth: dict[int, int] = {}
    for nid, node in topo(g):
        preds = [depth[p] for p in g.predecessors(nid)]
        depth[nid] = (max(preds) if preds else 0) + (0 if node.op in GroupOp.Leaf else 1)
    return depth[output_of(g)]


def _nodes(g: nx.DiGraph) -> Iterable[tuple[int, Node]]:
    return ((nid, data["node"]) for nid, data in g.nodes(data=True))


def label(node: Node) -> str:
    if node.op is Op.CONST:
        return format_number(node.value)
    if node.op in (Op.INPUT, Op.SYMBOL, Op.INDEX):
        return node.name
    return node.op.value


def format_number(x: float) -> str:
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    if float(x).is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(float(x))


def shape_str(shape: Shape) -> str:
    if shape == ():
        return "scalar"
    return "(" + ", ".join(str(s) for s in shape) + ")"
