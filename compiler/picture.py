"""A graphviz picture of a formula graph (`attnc compile --graph`, `Analysis.dot()`)."""
from __future__ import annotations

import networkx as nx

from .ir import GroupOp, Op, label, output_of, shape_str, topo
from .structural import MATRIX_OPS


def to_dot(g: nx.DiGraph, title: str | None = None) -> str:
    """A graphviz picture of the graph: one box per op with its shape, edges labelled by position."""
    out = output_of(g)
    lines = ["digraph attnc {", '  rankdir="BT";', '  node [fontname="Helvetica", fontsize=11];']
    if title or g.graph.get("source"):
        text = (title or g.graph["source"]).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\l")
        lines.append(f'  labelloc="t"; label="{text}";')
    for nid, node in topo(g):
        if node.op is Op.INPUT:
            style = 'shape=ellipse, style=filled, fillcolor="#cfe2ff"'
        elif node.op in GroupOp.Leaf:
            style = 'shape=ellipse, style=filled, fillcolor="#eeeeee"'
        elif node.op in MATRIX_OPS:
            style = 'shape=box, style="rounded,filled", fillcolor="#ffe5b4"'
        else:
            style = 'shape=box, style="rounded,filled", fillcolor="#e2f0d9"'
        if nid == out:
            style += ", penwidth=2.5"
        lab = label(node) + ("" if node.shape == () else f"\\n{shape_str(node.shape)}")
        lines.append(f'  n{nid} [label="{lab}", {style}];')
    for nid, node in topo(g):
        for idx, src in enumerate(node.operands):
            extra = f' [label="{idx}", fontsize=9]' if len(node.operands) > 1 else ""
            lines.append(f"  n{src} -> n{nid}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["to_dot"]
