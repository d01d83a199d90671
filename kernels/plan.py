"""Which formulas fuse into one streaming attention kernel, and why the others do not.

A formula is *streaming* when its simplified graph has the shape

    out = epilogue(M, q-features)          M = W @ v'
    W   = softmax_j(z)  or  z              z = E(pairwise(q'_i, k'_j), i, j, q/k row features)

where q', k', v' and the row features are *row-local* functions of the inputs (elementwise
ops, sums of inputs, scalar scales, row norms and row softmax over the head dim), the pairwise
leaves are dot products (`A @ B^T`, elementwise ops commute with the transpose), cosine
similarity or euclidean distance, and E is elementwise (with scalars, the indices i, j and
conditions). Such a formula needs O(n d) memory: one pass over key blocks per query block.

`classify(graph)` answers with a frozen `Classification`; its `reason` says what broke the
pattern when the formula is not streaming.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from attnc.compiler.ir import (ARITH_TEXT, GroupOp, Node, Op, format_number, is_fn, node_of, output_of,
                               shape_str, topo)

STREAMING = "streaming"
FALLBACK = "fallback"


@dataclass(frozen=True)
class StreamingPlan:
    """Node ids of the parts of a streaming formula (ids of the simplified graph)."""

    output: int                 # the formula's value
    matmul: int                 # M = W @ v', the product over the token axis
    weights: int                # W, the (n, n) left operand of M
    score: int                  # z: softmax operand (normalisation "softmax") or W itself ("none")
    value: int                  # v', the (n, d) right operand of M
    normalization: str          # "softmax" | "none"
    pairwise: tuple[tuple[str, int, int], ...]   # (kind, q-side node, k-side node) per pairwise leaf
    epilogue: bool              # True when out != M (ops applied after the product)


@dataclass(frozen=True)
class Classification:
    kind: str                               # "streaming" | "fallback"
    plan: StreamingPlan | None = None
    reason: str | None = None               # why it is not streaming (kind == "fallback")

    @property
    def streaming(self) -> bool:
        return self.kind == STREAMING


class _NotStreaming(Exception):
    pass


def _structural():
    """compiler/structural.py, imported on first use (it loads SymPy; `attnc bench --help` and
    `import attnc.kernels` need not)."""
    from attnc.compiler import structural
    return structural


def _spec(op):
    return _structural().get(op)


def classify(g: nx.DiGraph) -> Classification:
    """Classify a (simplified) IR graph as streaming (with its plan) or fallback (with a reason)."""
    try:
        return Classification(STREAMING, plan=_classify(g))
    except _NotStreaming as e:
        return Classification(FALLBACK, reason=str(e))


def _classify(g: nx.DiGraph) -> StreamingPlan:
    out = output_of(g)
    products = [nid for nid, node in topo(g) if node.op is Op.MATMUL
                and node_of(g, node.operands[0]).shape[1] == "n"]
    if not products:
        raise _NotStreaming("no product over the token axis (no '@' whose inner dimension is n): "
                            "nothing attends over the keys")
    if len(products) > 1:
        texts = ", ".join(render(g, p) for p in products[:3])
        raise _NotStreaming(f"{len(products)} products over the token axis ({texts}); a streaming "
                            "kernel fuses exactly one 'weights @ values' product (n x n times n x n, "
                            "or attention applied twice, needs a plan of several kernels)")
    m = products[0]
    w_id, v_id = node_of(g, m).operands
    w, v = node_of(g, w_id), node_of(g, v_id)
    if w.shape != ("n", "n"):
        raise _NotStreaming(f"the product over the token axis is {shape_str(w.shape)} @ "
                            f"{shape_str(v.shape)} ({render(g, m)}): a reduction over all tokens "
                            "such as K^T @ V (linear attention), not weights @ values; computing it "
                            "first costs O(n d^2) and needs no n x n matrix, so the PyTorch plan "
                            "runs it")
    if v.shape != ("n", "d"):
        raise _NotStreaming(f"the values operand {render(g, v_id)} is {shape_str(v.shape)}, not n x d")
    _row_local(g, v_id, "value operand v'")
    # epilogue: everything downstream of M must be row-local on the query side
    _epilogue(g, out, m)
    if w.op is Op.SOFTMAX:
        norm, z = "softmax", w.operands[0]
    else:
        norm, z = "none", w_id
    pairs: list[tuple[str, int, int]] = []
    _pair(g, z, pairs, set())
    return StreamingPlan(out, m, w_id, z, v_id, norm, tuple(dict.fromkeys(pairs)), out != m)


def _epilogue(g: nx.DiGraph, nid: int, m: int) -> None:
    if nid == m:
        return
    node = node_of(g, nid)
    if node.shape == ():
        return
    spec = _spec(node.op)
    if (spec is not None and (spec.pairwise or spec.reorients)) or node.shape[0] != "n" \
            or node.shape[1] == "n":
        raise _NotStreaming(f"{render(g, nid)} is applied to the attention output but is not a "
                            "row-local operation (elementwise, norm, scale or softmax over the head dim)")
    for o in node.operands:
        if m in nx.ancestors(g, o) or o == m:
            _epilogue(g, o, m)
        else:
            _row_local(g, o, "epilogue operand")


def _row_local(g: nx.DiGraph, nid: int, role: str) -> None:
    """Raise unless `nid` is a per-token function of the inputs (any orientation) or a scalar."""
    node = node_of(g, nid)
    shape = node.shape
    if shape == ():
        _scalar(g, nid)
        return
    if shape == ("n", "n"):
        raise _NotStreaming(f"the {role} {render(g, nid)} depends on an n x n matrix")
    if "n" not in shape:
        raise _NotStreaming(f"the {role} {render(g, nid)} ({shape_str(shape)}) reduces over all tokens")
    rows = shape[0] == "n"
    op = node.op
    spec = _spec(op)
    _keys_reduced(g, nid)
    if op in (Op.INPUT, Op.INDEX):
        return
    if spec is not None and spec.pairwise:
        raise _NotStreaming(f"the {role} {render(g, nid)} contains a matrix product; q', k', v' must "
                            "be row-local (elementwise ops, sums, scales, row norms)")
    if spec is not None and spec.reduces_rows and not rows:
        raise _NotStreaming(f"{render(g, nid)} reduces over the token axis (a {op.value} of a "
                            "transposed matrix), so {role} is not row-local".replace("{role}", role))
    if op in GroupOp.Elementwise or is_fn(op) or spec is not None:
        for o in node.operands:
            _row_local(g, o, role)
        return
    raise _NotStreaming(f"unsupported operation {op.value} in the {role}")  # pragma: no cover


def _keys_reduced(g: nx.DiGraph, nid: int) -> None:
    """Raise when `nid` reduces the rows of an n x n matrix (a norm over the keys)."""
    spec = _spec(node_of(g, nid).op)
    if spec is not None and spec.reduces_rows and node_of(g, nid).shape == ("n", 1) \
            and node_of(g, node_of(g, nid).operands[0]).shape == ("n", "n"):
        raise _NotStreaming(f"{render(g, nid)} is a {spec.name} over the keys of an n x n matrix: it "
                            "needs the whole row before the score can be used")


def _scalar(g: nx.DiGraph, nid: int) -> None:
    node = node_of(g, nid)
    if node.is_bool:
        raise _NotStreaming(f"the condition {render(g, nid)} depends only on constants and sizes")


def _pair(g: nx.DiGraph, nid: int, pairs: list, seen: set) -> None:
    if nid in seen:
        return
    seen.add(nid)
    node = node_of(g, nid)
    shape, op = node.shape, node.op
    if shape == ():
        _scalar(g, nid)
        return
    if shape == ("n", 1):
        _keys_reduced(g, nid)
        _row_local(g, nid, "query row feature")
        return
    if shape == (1, "n"):
        _row_local(g, nid, "key row feature")
        return
    if shape != ("n", "n"):
        raise _NotStreaming(f"{render(g, nid)} ({shape_str(shape)}) cannot be part of an n x n score")
    spec = _spec(op)
    if spec is not None and spec.pairwise:      # matmul, cos, dist: a score leaf
        a, b = node.operands
        inner = node_of(g, a).shape[1]
        if inner == "n" and spec is _structural().MATMUL:   # cos / dist of n-long rows: q' says why
            raise _NotStreaming(f"the score contains {render(g, nid)}, a product of n x n matrices "
                                "(inner dimension n): it needs whole rows and columns of attention")
        _row_local(g, a, "query operand q'")
        _row_local(g, b, "key operand k'^T" if spec.right_transposed else "key operand k'")
        pairs.append((spec.pair_kind(inner), a, b))
        return
    if spec is not None and spec.reduces_rows:
        raise _NotStreaming(f"the score contains a {spec.name} ({render(g, nid)}): a {spec.name} of an "
                            "attention matrix needs the whole normalised row before the outer one")
    if spec is not None and spec.reorients:
        raise _NotStreaming(f"the score contains a transposed n x n matrix ({render(g, nid)}), "
                            "indexed (j, i): not computable from one query block")
    if op in GroupOp.Elementwise or is_fn(op) or spec is not None:   # where, scale, elementwise
        for o in node.operands:
            _pair(g, o, pairs, seen)
        return
    raise _NotStreaming(f"unsupported operation {op.value} in the score")  # pragma: no cover


# ---- rendering -------------------------------------------------------------------------------

def render(g: nx.DiGraph, nid: int, limit: int = 160) -> str:
    """A short DSL-like text of the sub-expression rooted at `nid` (for messages)."""
    text = _render(g, nid)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _render(g: nx.DiGraph, nid: int) -> str:
    node: Node = node_of(g, nid)
    op = node.op
    if op is Op.CONST:
        return format_number(node.value)
    if op in (Op.INPUT, Op.SYMBOL, Op.INDEX):
        return node.name
    args = [_render(g, o) for o in node.operands]
    spec = _spec(op)
    infix = spec.symbol if spec is not None else ARITH_TEXT.get(op)
    if infix and len(args) == 2:
        return f"({args[0]} {infix} {args[1]})"
    if infix and op in GroupOp.Unary | GroupOp.Logic:      # -x, !x
        return f"{infix}{args[0]}"
    if infix:                                              # x^T
        return f"{args[0]}{infix}"
    return f"{op.value}({', '.join(args)})"


__all__ = [
    "FALLBACK",
    "STREAMING",
    "Classification",
    "StreamingPlan",
    "classify",
    "render",
]
