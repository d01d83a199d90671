"""attnc — a symbolic attention-expression compiler.

    import attnc
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="torch")
    out = fn(q=q, k=k, v=v, key_padding_mask=mask)   # (batch, heads, n, d)

`import attnc` is cheap: the names below load on first use (module __getattr__), so the
command line and `import attnc` pay for SymPy, networkx and Lark only when a formula is
analysed, and for torch only when one runs. The "triton" backend is found by name
(compiler/backends.py loads attnc.kernels when it is first asked for).
"""
from __future__ import annotations

import importlib

from attnc import _hf

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(("Analysis", "CompiledAttention", "analyze", "analyze_file", "compile",
                     "compile_file"), "attnc.compiler.api"),
    "CheckOptions": "attnc.compiler.check",
    **dict.fromkeys(("AttncError", "BackendError", "CheckError", "ConfigError", "DataError",
                     "EvaluationError", "ParseError", "ShapeError"), "attnc.compiler.errors"),
}
_SUBMODULES = ("cli", "compiler", "grammar", "kernels", "ops", "runtime", "search")

_hf.install()   # AutoConfig / AutoModel* know model_type "attnc_bert" once transformers loads


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"attnc.{name}")
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["compile", "compile_file", "analyze", "analyze_file", "Analysis", "CompiledAttention", "CheckOptions", "AttncError",
           "ParseError", "ShapeError", "CheckError", "BackendError", "ConfigError", "DataError", "EvaluationError"]
