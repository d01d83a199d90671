"""attnc.kernels: fused Triton kernels generated from compiled formulas.

    classify(graph)           -> Classification (streaming plan, or the reason it is not)
    explain(analysis)         -> text: the class, q'/k'/v', score, normalisation, or the reason
    triton_source(analysis, dtype="float32", head_dim=64) -> the generated Triton module
    build_triton(analysis, cache_dir=None, **options)     -> CompiledAttention (backend "triton")
        options: fallback="torch" | "error", allow_tf32=False (TF32 products for fp32 inputs)

Modules: plan (classification), structure (mask bands, weight bounds), lower (tile statements,
adjoints), codegen (the Triton source), tune (dot types, block configs, autotuning cache),
launch (the backend), bench (`attnc bench`).

Importing this package does not import triton; the kernels need it (and a CUDA device, or
TRITON_INTERPRET=1 for the CPU interpreter) only when a streaming formula is built.
"""
from __future__ import annotations

from attnc._layout import make_stage_package

make_stage_package(globals())   # its modules are the files of kernels/ (attnc/_layout.py)

from attnc.compiler.backends import Backend, register_backend  # noqa: E402

from .plan import Classification, StreamingPlan, classify  # noqa: E402


def build_triton(analysis, cache_dir=None, **options):
    from .launch import build_triton as _build
    return _build(analysis, cache_dir=cache_dir, **options)


def explain(analysis) -> str:
    from .launch import explain as _explain
    return _explain(analysis)


def triton_source(analysis, dtype: str = "float32", head_dim: int = 64) -> str:
    from .launch import triton_source as _source
    return _source(analysis, dtype=dtype, head_dim=head_dim)


register_backend(Backend("triton", build_triton, explain=explain, source=triton_source))

__all__ = ["Classification", "StreamingPlan", "build_triton", "classify", "explain", "triton_source"]
