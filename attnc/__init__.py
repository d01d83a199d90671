"""attnc — a symbolic attention-expression compiler.

    import attnc
    fn = attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V", backend="torch")
    out = fn(q=q, k=k, v=v, key_padding_mask=mask)   # (batch, heads, n, d)
"""
from attnc.compiler.api import (Analysis, CompiledAttention, analyze, analyze_file, compile,
                                compile_file)
from attnc.compiler.check import CheckOptions
from attnc.compiler.errors import (AttncError, BackendError, CheckError, ConfigError, DataError,
                                   ParseError, ShapeError)

from attnc import _hf
from attnc import kernels as _kernels  # noqa: F401 - registers the "triton" backend (imports no triton)
from attnc import ops  # noqa: F401 - attnc.ops.register_elementwise

__version__ = "0.1.0"

_hf.install()   # AutoConfig / AutoModel* know model_type "attnc_bert" once transformers loads

__all__ = ["compile", "compile_file", "analyze", "analyze_file", "Analysis", "CompiledAttention", "CheckOptions", "AttncError",
           "ParseError", "ShapeError", "CheckError", "BackendError", "ConfigError", "DataError"]
