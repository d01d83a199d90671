"""Backends: what turns an `Analysis` into a callable `CompiledAttention`.

The compiler knows backends only through this registry, so it never imports a backend package:
the torch backend is defined here, the Triton backend registers itself when `attnc.kernels` is
imported, which `get("triton")` does on first use (PROVIDERS names the module, so nothing is
imported before a backend is asked for). A backend is a build function and, optionally, an
`explain` (text: what the backend makes of the formula) and a `source` (generated code).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from . import cache as _cache
from .codegen_torch import CODEGEN_VERSION, generate
from .errors import BackendError


@dataclass(frozen=True)
class Backend:
    name: str
    build: Callable                       # (analysis, cache_dir=None, **options) -> CompiledAttention
    explain: Callable | None = None       # (analysis) -> str
    source: Callable | None = None        # (analysis, **options) -> str


_BACKENDS: dict[str, Backend] = {}
# backends registered by other packages: name -> module whose import registers it
PROVIDERS = {"triton": "attnc.kernels"}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    if name not in _BACKENDS and name in PROVIDERS:
        import importlib
        importlib.import_module(PROVIDERS[name])
    try:
        return _BACKENDS[name]
    except KeyError:
        raise BackendError(f"backend {name!r} is not available",
                           hint="choose one of " + ", ".join(sorted(set(_BACKENDS) | set(PROVIDERS)))
                           ) from None


class CompiledAttention:
    """A compiled formula: call it like attention.

        out = fn(q=q, k=k, v=v, p=None, key_padding_mask=mask)

    q, k, v, p: (batch, heads, n, d) tensors (only the inputs the formula uses are needed);
    key_padding_mask: (batch, n) bool, True = real token. Returns (batch, heads, n, d).
    """

    def __init__(self, analysis, backend: str, impl: Callable, source: str,
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


def build_torch(analysis, cache_dir=None, **options) -> CompiledAttention:
    """The torch backend: readable generated PyTorch, cached on disk by canonical hash."""
    if options:
        raise BackendError(f"unknown torch backend option(s): {', '.join(sorted(options))}")
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
        impl = module_from_source(source, analysis.hash).forward
    return CompiledAttention(analysis, "torch", impl, source, path)


def module_from_source(source: str, digest: str):
    """Import generated source without a writable cache (through a temporary file)."""
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"gen_{digest}.py"
        path.write_text(source)
        mod = _cache.load_module(path, f"attnc_gen.mem_{digest}")
    sys.modules.pop(f"attnc_gen.mem_{digest}", None)
    return mod



register_backend(Backend("torch", build_torch))

__all__ = ["Backend", "CompiledAttention", "build_torch", "get", "module_from_source", "register_backend"]
