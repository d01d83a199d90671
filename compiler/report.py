"""Per-formula reports: canonical form, inputs, projection parameters and FLOPs.

FLOPs count one per arithmetic op entry, an elementwise function's `flop_cost`
(compiler/elementwise.py; 1 for the built-ins) and a structural operation's `flops`
(compiler/structural.py: a matmul (a, b) @ (b, c) is 2abc, a softmax 5 per entry, ...), and are
given per (batch, head) as a polynomial in n and d as well as for concrete sizes. This is the one
FLOP counter of the project (the runtime's counters call it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx
import sympy as sp

from . import elementwise, structural
from .ir import GroupOp, inputs_used, is_fn, op_counts, path_length, topo
from .symbolic import n as N_SYM, d as D_SYM

_SIZE = {"n": N_SYM, "d": D_SYM, 1: sp.Integer(1)}


def flops_expr(g: nx.DiGraph) -> sp.Expr:
    """FLOPs per (batch, head) as a polynomial in n and d."""
    total = sp.Integer(0)
    for _, node in topo(g):
        if node.op in GroupOp.Leaf or node.shape == ():
            continue
        out = structural.numel(node.shape, _SIZE)
        spec = structural.get(node.op)
        if spec is not None:
            total += spec.flops([g.nodes[o]["node"].shape for o in node.operands], node.shape, _SIZE)
        elif is_fn(node.op):
            total += elementwise.get(node.op.value).flop_cost * out
        else:
            total += out
    return sp.expand(total)


def flops_at(g: nx.DiGraph, n: int, d: int) -> int:
    """FLOPs per (batch, head) for sequence length n and head dim d."""
    return int(flops_expr(g).subs({N_SYM: n, D_SYM: d}))


def projection_params(inputs, hidden: int, heads: int, head_dim: int) -> int:
    """Weights + biases of the per-input projections (hidden -> heads*head_dim) and the output
    projection (heads*head_dim -> hidden) of one attention layer."""
    inner = heads * head_dim
    return len(inputs) * (hidden * inner + inner) + (inner * hidden + hidden)


@dataclass(frozen=True)
class Report:
    name: str | None
    formula: str
    canonical: str
    hash: str
    inputs: tuple[str, ...]
    ops: dict
    path_length: int
    flops_per_head: str
    flops: int
    params: int
    sizes: dict

    def to_dict(self) -> dict:
        return asdict(self)


def report(analysis, *, n: int = 128, d: int = 64, batch: int = 1, heads: int = 12,
           hidden: int = 768) -> Report:
    g = analysis.simplified
    expr = flops_expr(g)
    flops = int(expr.subs({N_SYM: n, D_SYM: d})) * batch * heads
    return Report(
        name=analysis.name, formula=analysis.source.strip(), canonical=analysis.canonical,
        hash=analysis.hash, inputs=inputs_used(g), ops=op_counts(analysis.graph),
        path_length=path_length(analysis.graph), flops_per_head=str(expr), flops=flops,
        params=projection_params(inputs_used(g), hidden, heads, d),
        sizes={"n": n, "d": d, "batch": batch, "heads": heads, "hidden": hidden})
