"""No import circles between the modules of the compiler, the kernels and the grammar: every
import counts, also those inside functions (a lazy import hides a circle from Python, not from a
reader). The graph is read from the source with `ast`, not from what happens to be imported."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("compiler", "kernels", "grammar", "runtime")


def _module(path: Path) -> str:
    return "attnc." + ".".join(path.relative_to(ROOT).with_suffix("").parts)


def import_graph(stages=STAGES) -> nx.DiGraph:
    """module -> modules of the same stages it imports (anywhere in its source)."""
    files = {_module(p): p for s in stages for p in sorted((ROOT / s).glob("*.py"))}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        package = mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            g.add_edges_from((mod, t) for t in targets if t in files and t != mod)
    return g


def test_the_graph_sees_lazy_imports():
    g = import_graph()
    assert g.has_edge("attnc.kernels.launch", "attnc.kernels.codegen")
    assert g.has_edge("attnc.compiler.codegen_torch", "attnc.compiler.structural")   # inside _op


@pytest.mark.parametrize("stage", STAGES)
def test_no_import_circles(stage):
    g = import_graph()
    cycles = [c for c in nx.simple_cycles(g) if any(m.startswith(f"attnc.{stage}.") for m in c)]
    assert not cycles, " ; ".join(" -> ".join(c + c[:1]) for c in cycles)
