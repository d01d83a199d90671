"""`attnc.compile`: formula text -> checked, canonical, differentiable attention op.

The pipeline is one line per stage (each takes IR and returns IR or a value):

    graph      = parse(text)                     # grammar/: Lark -> IR with spans and shapes
    graph      = check(graph, checks)            # output n x d, 2-4 inputs, finite constants
    expr       = to_sympy(graph)                 # SymPy matrix expression
    expr       = simplify(expr)                  # rewrite-rule table to a fixpoint
    canonical  = print_canonical(expr)           # DSL text, re-parseable; hash = sha256(canonical)
    simplified = to_ir(expr)                     # back to IR for codegen
    source     = generate(simplified)            # readable PyTorch; cached on disk by hash
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from attnc.grammar.parser import parse, parse_file

from . import backends
from .backends import CompiledAttention
from .check import DEFAULT_CHECKS, CheckOptions, check
from .errors import AttncError, BackendError, CheckError
from .ir import INPUT_NAMES, inputs_used, node_of, op_counts, output_of, path_length
from .picture import to_dot
from .symbolic import print_canonical, simplify, to_ir, to_sympy

BACKENDS = ("torch", "triton", "auto")   # triton: registered by attnc.kernels (compiler/backends.py)
HASH_VERSION = "attnc-canon-1"


def formula_hash(canonical: str) -> str:
    return hashlib.sha256(f"{HASH_VERSION}\n{canonical}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Analysis:
    """Everything the compiler knows about one formula, independent of a backend."""

    source: str
    name: str | None
    graph: nx.DiGraph            # checked IR, as written
    simplified: nx.DiGraph       # IR after the SymPy rules (what the backends generate from)
    expr: Any                    # the simplified SymPy matrix expression
    canonical: str               # canonical DSL text
    hash: str                    # sha256 of the canonical text (16 hex chars)
    checks: CheckOptions = field(default=DEFAULT_CHECKS, compare=False)

    @property
    def inputs(self) -> tuple[str, ...]:
        return inputs_used(self.simplified)

    @property
    def op_counts(self) -> dict[str, int]:
        return op_counts(self.graph)

    @property
    def path_length(self) -> int:
        return path_length(self.graph)

    def dot(self, simplified: bool = False) -> str:
        return to_dot(self.simplified if simplified else self.graph, title=self.source.strip())


def analyze(text: str, *, name: str | None = None, checks: CheckOptions = DEFAULT_CHECKS) -> Analysis:
    """Parse, check and simplify one formula (no code generation)."""
    key = (text, name, checks)
    with _LOCK:
        hit = _ANALYSES.get(key)
        if hit is not None:
            _ANALYSES.move_to_end(key)
            return hit
    try:
        result = _analyze_graph(parse(text, name=name), text, text, name, checks)
    except AttncError as e:
        raise e.with_source(text, name)
    with _LOCK:
        _ANALYSES[key] = result
        while len(_ANALYSES) > _MEMO_SIZE:
            _ANALYSES.popitem(last=False)
    return result


def analyze_file(text: str, *, path: str | None = None,
                 checks: CheckOptions = DEFAULT_CHECKS) -> list[Analysis]:
    """Analyze every formula of a file (`formula NAME = ...` definitions, or one bare formula)."""
    out = []
    try:
        for f in parse_file(text, name=None):
            out.append(_analyze_graph(f.graph, f.snippet, text, f.name, checks))
    except AttncError as e:
        raise e.with_source(text, path)
    return out


def compile_file(text: str, backend: str = "torch", *, path: str | None = None,
                 checks: CheckOptions = DEFAULT_CHECKS, cache_dir=None) -> dict[str, "CompiledAttention"]:
    """Compile every formula of a file; returns {name: CompiledAttention} in file order."""
    return {a.name or "formula": _compile_analysis(a, backend, cache_dir, {})
            for a in analyze_file(text, path=path, checks=checks)}


def _analyze_graph(graph, source: str, full_text: str, name, checks: CheckOptions) -> Analysis:
    try:
        graph = check(graph, checks)
        expr = simplify(to_sympy(graph))
        canonical = print_canonical(expr)
        simplified = to_ir(expr, source=source, name=name, fallback=graph)
        _check_simplified(graph, simplified, expr, canonical, checks)
    except AttncError as e:
        if e.span is None:   # errors of the symbolic stage point at the whole formula
            e.span = node_of(graph, output_of(graph)).span
        raise e.with_source(full_text, name)
    return Analysis(source, name, graph, simplified, expr, canonical, formula_hash(canonical), checks)


def _check_simplified(graph, simplified, expr, canonical: str, checks: CheckOptions) -> None:
    """Inputs that cancel (x - x, 0 * x) are gone after simplification: check the count again.
    The simplified expression decides (when it has no IR, `simplified` is the unsimplified
    graph, which still reads the cancelled inputs: a formula that is identically 0 is one)."""
    if simplified is graph:
        names = {getattr(s, "name", None) for s in expr.free_symbols}
        used = tuple(x for x in INPUT_NAMES if x in names)
    else:
        used = inputs_used(simplified)
    if len(used) >= min(checks.min_inputs, len(inputs_used(graph))) and used:
        return
    out = node_of(graph, output_of(graph))
    what = "no input" if not used else f"only {' '.join(used)}"
    raise CheckError(f"after simplification the output depends on {what} (it is {canonical})",
                     out.span, hint="terms that cancel (x - x, 0 * x) do not count as uses; "
                     f"use at least {checks.min_inputs} inputs for real")


def compile(formula: str, backend: str = "torch", *, name: str | None = None,
            checks: CheckOptions = DEFAULT_CHECKS, cache_dir: str | os.PathLike | None = None,
            **backend_options) -> CompiledAttention:
    """Compile an attention formula into a callable. See CompiledAttention for the call contract.

    backend: "torch" (reference, any device), "triton" (fused kernels) or "auto" (triton where
    a CUDA device and Triton are available, torch otherwise). Raises AttncError subclasses.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    analysis = analyze(formula, name=name, checks=checks)
    return _compile_analysis(analysis, backend, cache_dir, backend_options)


def _compile_analysis(analysis: Analysis, backend: str, cache_dir, backend_options: dict):
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if _triton_usable() else "torch"
    key = (analysis.hash, backend, str(cache_dir), tuple(sorted(backend_options.items())))
    with _LOCK:
        hit = _COMPILED.get(key)
        if hit is not None and hit.analysis is analysis:
            return hit
    compiled = backends.get(backend).build(analysis, cache_dir=cache_dir, **backend_options)
    with _LOCK:
        _COMPILED[key] = compiled
        while len(_COMPILED) > _MEMO_SIZE:
            _COMPILED.popitem(last=False)
    return compiled


def clear_memos() -> None:
    """Forget the in-process memos of analyses and compiled formulas (attnc.ops does this when a
    registered function is removed, so that its name stops parsing)."""
    with _LOCK:
        _ANALYSES.clear()
        _COMPILED.clear()


def _triton_usable() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


_LOCK = threading.Lock()
_MEMO_SIZE = 4096
_ANALYSES: OrderedDict = OrderedDict()
_COMPILED: OrderedDict = OrderedDict()

__all__ = ["compile", "compile_file", "analyze", "analyze_file", "Analysis", "CompiledAttention", "formula_hash", "INPUT_NAMES"]
