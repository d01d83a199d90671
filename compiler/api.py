"""`attnc.compile`: formula text -> checked, canonical, differentiable attention op.

The pipeline is one line per stage (each takes IR and returns IR or a value):

    graph      = parse(text)                     # grammar/: Lark -> IR with spans and shapes
    graph      = check(graph, checks)            # output n x d, 2-4 inputs, finite constants
    expr       = to_sympy(graph)                 # SymPy matrix expression
    expr       = simplify(expr)                  # rewrite-rule table to a fixpoint
    canonical  = print_canonical(expr)           # DSL text, re-parseable; hash = sha256(canonical)
    simplified = lower(expr)                     # back to IR for codegen
    source     = generate(simplified)            # readable PyTorch; cached on disk by hash
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from attnc.grammar.parser import parse, parse_file

from . import cache as _cache
from .check import DEFAULT_CHECKS, CheckOptions, check
from .codegen_torch import CODEGEN_VERSION, generate
from .errors import AttncError, BackendError, CheckError
from .ir import INPUT_NAMES, inputs_used, node_of, op_counts, output_of, path_length, to_dot
from .symbolic import lower, print_canonical, simplify, to_sympy

BACKENDS = ("torch", "triton", "auto")
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
        simplified = lower(expr, source=source, name=name, fallback=graph)
        _check_simplified(graph, simplified, canonical, checks)
    except AttncError as e:
        if e.span is None:   # errors of the symbolic stage point at the whole formula
            e.span = node_of(graph, output_of(graph)).span
        raise e.with_source(full_text, name)
    return Analysis(source, name, graph, simplified, expr, canonical, formula_hash(canonical), checks)


def _check_simplified(graph, simplified, canonical: str, checks: CheckOptions) -> None:
    """Inputs that cancel (x - x, 0 * x) are gone after simplification: check the count again."""
    used = inputs_used(simplified)
    if len(used) >= min(checks.min_inputs, len(inputs_used(graph))) and used:
        return
    out = node_of(graph, output_of(graph))
    what = "any input" if not used else f"only {' '.join(used)}"
    raise CheckError(f"after simplification the output depends on {what} (it is {canonical})",
                     out.span, hint="terms that cancel (x - x, 0 * x) do not count as uses; "
                     f"use at least {checks.min_inputs} inputs for real")


class CompiledAttention:
    """A compiled formula: call it like attention.

        out = fn(q=q, k=k, v=v, p=None, key_padding_mask=mask)

    q, k, v, p: (batch, heads, n, d) tensors (only the inputs the formula uses are needed);
    key_padding_mask: (batch, n) bool, True = real token. Returns (batch, heads, n, d).
    """

    def __init__(self, analysis: Analysis, backend: str, impl: Callable, source: str,
                 source_path: Path | None, plan: str | None = None):
        self.analysis = analysis
        self.backend = backend
        self.plan = plan or backend     # what runs: "torch", "streaming", "torch-fallback", ...
        self._impl = impl
        self.source = source            # generated source of the backend
        self.source_path = source_path

    # convenience views of the analysis
    formula = property(lambda self: self.analysis.source)
    canonical = property(lambda self: self.analysis.canonical)
    hash = property(lambda self: self.analysis.hash)
    inputs = property(lambda self: self.analysis.inputs)
    graph = property(lambda self: self.analysis.graph)
    simplified = property(lambda self: self.analysis.simplified)

    def __call__(self, q=None, k=None, v=None, p=None, key_padding_mask=None, **extra):
        if extra:
            bad = ", ".join(sorted(extra))
            raise BackendError(f"unexpected argument(s) {bad}",
                               hint="pass q=, k=, v=, p= and key_padding_mask=")
        tensors = {"Q": q, "K": k, "V": v, "P": p}
        _validate(tensors, self.inputs, key_padding_mask)
        return self._impl(q, k, v, p, key_padding_mask)

    @cached_property
    def report(self):
        from .report import report
        return report(self.analysis)

    def __repr__(self) -> str:
        return f"CompiledAttention({self.canonical!r}, backend={self.backend!r}, hash={self.hash})"


def _validate(tensors: dict, used: tuple[str, ...], mask) -> None:
    import torch

    ref_shape = None
    for name in used:
        t = tensors[name]
        if t is None:
            raise BackendError(f"the formula uses {name} but {name.lower()}= was not given",
                               hint=f"call with {', '.join(x.lower() + '=' for x in used)}")
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BackendError(f"{name.lower()} must be a (batch, heads, n, d) tensor, got {got}")
        if ref_shape is None:
            ref_shape, ref = t.shape, name
        elif t.shape != ref_shape:
            raise BackendError(f"{name.lower()} has shape {tuple(t.shape)} but {ref.lower()} has "
                               f"{tuple(ref_shape)}", hint="Q, K, V, P share (batch, heads, n, d)")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2 \
                or mask.shape != (ref_shape[0], ref_shape[2]):
            got = (tuple(mask.shape), str(mask.dtype)) if isinstance(mask, torch.Tensor) else type(mask)
            raise BackendError(f"key_padding_mask must be a (batch, n) = ({ref_shape[0]}, "
                               f"{ref_shape[2]}) bool tensor, got {got}",
                               hint="True marks real tokens, False padding")


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
    if backend == "torch":
        compiled = _build_torch(analysis, cache_dir)
    else:
        from attnc.kernels import build_triton
        compiled = build_triton(analysis, cache_dir=cache_dir, **backend_options)
    with _LOCK:
        _COMPILED[key] = compiled
        while len(_COMPILED) > _MEMO_SIZE:
            _COMPILED.popitem(last=False)
    return compiled


def _build_torch(analysis: Analysis, cache_dir) -> CompiledAttention:
    source = generate(analysis.simplified, formula=analysis.source, canonical=analysis.canonical,
                      digest=analysis.hash)
    path = _cache.resolve(cache_dir) / "torch" / f"{CODEGEN_VERSION}_{analysis.hash}.py"
    try:
        _cache.ensure_source(path, source)
        module = _cache.load_module(path, f"attnc_gen.torch_{analysis.hash}")
        impl = module.forward
    except OSError:
        # unwritable cache: fall back to an in-memory module built from the same source
        path = None
        impl = _module_from_source(source, analysis.hash).forward
    return CompiledAttention(analysis, "torch", impl, source, path)


def _module_from_source(source: str, digest: str):
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"gen_{digest}.py"
        path.write_text(source)
        mod = _cache.load_module(path, f"attnc_gen.mem_{digest}")
    sys.modules.pop(f"attnc_gen.mem_{digest}", None)
    return mod


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
