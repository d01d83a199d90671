"""`build_triton`: a compiled formula on the Triton backend (fused kernels or the fallback plan).

Streaming formulas run the generated kernels (codegen.py) wrapped in a torch.autograd.Function;
the generated module is written to the cache as `triton/<version>_<hash>_<dtype>_d<head dim>.py`
and imported from that file (Triton's JIT needs real source files); block configs chosen by
autotuning are cached next to it (`triton/tune/`, see tune.py). Formulas that do not
stream run the PyTorch backend's generated function (plan "torch-fallback"); `.plan` and
`.classification` on the returned object say which ran and why.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import networkx as nx
from attnc.compiler import cache as _cache
from attnc.compiler import elementwise, structural
from attnc.compiler.ir import is_fn, topo
from attnc.compiler.errors import BackendError

from .codegen import DTYPES, GEN_VERSION, MAX_HEAD_DIM, describe_band, describe_fit, generate, plan_inputs
from .plan import Classification, classify, render
from .structure import weights_fit_fp16

OPTIONS = ("fallback", "allow_tf32")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
        raise BackendError("the triton backend needs the 'triton' package",
                           hint="pip install triton, or use backend='torch'") from e


def _require_device() -> None:
    import torch

    if not torch.cuda.is_available() and not interpreting():
        raise BackendError("the triton backend needs a CUDA device (none is available)",
                           hint="use backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before "
                                "importing triton to run the kernels on the CPU (slow)")


def classification(analysis) -> Classification:
    return classify(analysis.simplified)


def explain_plan(g: nx.DiGraph, c: Classification) -> str:
    if not c.streaming:
        return ("class: fallback (not streaming)\n"
                f"reason: {c.reason}\n"
                "plan: the PyTorch backend's generated function (run on the tensors' device)")
    p = c.plan
    lines = ["class: streaming (one fused Triton kernel: O(n d) memory, one pass over key blocks)"]
    for kind, a, b in p.pairwise:
        spec = structural.PAIR_KINDS[kind]
        lines.append(f"score leaf: {spec.describe_pair(kind)}")
        lines.append(f"  q' = {render(g, a)}")
        lines.append(f"  k' = {render(g, b) + '  (transposed)' if spec.right_transposed else render(g, b)}")
    if not p.pairwise:
        lines.append("score leaf: none (the score uses only positions / row features)")
    lines.append(f"score z = {render(g, p.score)}")
    if p.normalization == "softmax":
        lines.append("weights: softmax over j (online, log-sum-exp saved for the backward)")
    else:
        lines.append("weights: w = z, no row normalisation (accumulated directly)")
    lines.append(f"v' = {render(g, p.value)}")
    lines.append(f"epilogue: {render(g, p.output) if p.epilogue else 'none (out = W @ v_)'}".replace(
        "v_", "v'"))
    lines.append(f"key blocks: {describe_band(g, p)}")
    lines.append(f"weights in fp16 products: {describe_fit(weights_fit_fp16(g, p))}")
    return "\n".join(lines)



def explain(analysis) -> str:
    """Human-readable: which class the formula fell in, its parts, or why it does not stream."""
    c = classification(analysis)
    first, _, rest = explain_plan(analysis.simplified, c).partition("\n")
    return f"{first}\nformula (simplified): {analysis.canonical}\n{rest}"


def triton_source(analysis, dtype: str = "float32", head_dim: int = 64) -> str:
    """The generated Triton source (forward + backward kernels, host launchers) for a formula."""
    dtype = _dtype_name(dtype)
    _check_head_dim(head_dim)
    c = classification(analysis)
    if not c.streaming:
        raise BackendError(f"the formula does not stream, so there is no fused Triton source: {c.reason}",
                           hint="attnc compile --explain shows the plan; the triton backend runs the "
                                "PyTorch fallback for it")
    return generate(analysis.simplified, c.plan, formula=analysis.source, canonical=analysis.canonical,
                    digest=analysis.hash, dtype=dtype, head_dim=head_dim)


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
            "float": "float32"}.get(name, name)
    if name not in DTYPES:
        raise BackendError(f"the triton backend supports {', '.join(DTYPES)} tensors, not {name}",
                           hint="use backend='torch' for float64 (the golden reference)")
    return name


def _check_head_dim(head_dim: int) -> None:
    if not 1 <= int(head_dim) <= MAX_HEAD_DIM:
        raise BackendError(f"head dim {head_dim} is not supported by the fused kernels "
                           f"(1..{MAX_HEAD_DIM})", hint="use backend='torch' for larger heads")


class StreamingRunner:
    """Loads (and caches) the generated module per (dtype, head dim) and runs it."""

    def __init__(self, analysis, plan, cache_dir, allow_tf32: bool = False):
        self.analysis = analysis
        self.plan = plan
        self.cache_dir = cache_dir
        self.allow_tf32 = allow_tf32     # fp32 inputs may use TF32 tensor-core products
        self.inputs = plan_inputs(analysis.simplified, plan)   # what the kernels read
        self._modules: dict = {}
        self._lock = threading.Lock()

    def path(self, dtype: str, head_dim: int) -> Path:
        a = self.analysis
        # the kernels inline user-registered definitions: they are part of the key
        fns = [node.op.value for _, node in topo(a.simplified) if is_fn(node.op)]
        user = elementwise.user_digest(fns)
        tag = f"{a.hash}_{user}" if user else a.hash
        return _cache.resolve(self.cache_dir) / "triton" / f"{GEN_VERSION}_{tag}_{dtype}_d{head_dim}.py"

    def module(self, dtype: str, head_dim: int):
        key = (dtype, head_dim)
        with self._lock:
            mod = self._modules.get(key)
            if mod is not None:
                return mod
            a = self.analysis
            source = generate(a.simplified, self.plan, formula=a.source, canonical=a.canonical,
                              digest=a.hash, dtype=dtype, head_dim=head_dim)
            path = self.path(dtype, head_dim)
            try:
                _cache.ensure_source(path, source)
            except OSError as e:
                raise BackendError(f"cannot write the generated Triton source to {path}: {e}",
                                   hint="pass a writable cache_dir= or set ATTNC_CACHE_DIR") from e
            mod = _cache.load_module(path, f"attnc_gen.triton_{path.stem}")
            self._modules[key] = mod
            return mod

    def __call__(self, q, k, v, p, key_padding_mask):

        tensors = {"Q": q, "K": k, "V": v, "P": p}
        names = self.inputs
        ts = [tensors[x] for x in names]
        ref = ts[0]
        if ref.device.type != "cuda" and not interpreting():
            raise BackendError(f"the triton backend got {ref.device.type} tensors",
                               hint="move the tensors to a CUDA device, use backend='torch', or set "
                                    "TRITON_INTERPRET=1 (CPU interpreter, slow)")
        if any(t.dtype != ref.dtype or t.device != ref.device for t in ts):
            raise BackendError("q, k, v, p must share one dtype and device",
                               hint="cast them with .to(dtype) first")
        dtype = _dtype_name(ref.dtype)
        head_dim = ref.shape[-1]
        _check_head_dim(head_dim)
        mod = self.module(dtype, head_dim)
        mask = key_padding_mask
        if mask is not None and mask.device != ref.device:
            mask = mask.to(ref.device)
        return _StreamingFunction.apply(mod, names, mask, self.allow_tf32, *ts)


def _autograd_function():
    import torch

    class StreamingAttention(torch.autograd.Function):
        """Forward: the fused kernel; backward: the generated pre / dkv / dq kernels."""

        @staticmethod
        def forward(ctx, mod, names, mask, allow_tf32, *tensors):
            # the kernels take every tensor's own strides: transposed views are not copied
            inputs = dict(zip(names, tensors))
            out, acc, lse = mod.attn_forward(inputs, mask, allow_tf32)
            ctx.mod, ctx.names, ctx.mask, ctx.allow_tf32 = mod, names, mask, allow_tf32
            ctx.save_for_backward(*tensors, out, acc, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            *ts, out, acc, lse = ctx.saved_tensors
            inputs = dict(zip(ctx.names, ts))
            grads = ctx.mod.attn_backward(inputs, ctx.mask, out, acc, lse, dout, ctx.allow_tf32)
            res = [None, None, None, None]
            for i, x in enumerate(ctx.names):
                res.append(grads[x] if ctx.needs_input_grad[4 + i] else None)
            return tuple(res)

    return StreamingAttention


class _LazyFunction:
    _fn = None

    def apply(self, *args):
        if _LazyFunction._fn is None:
            _LazyFunction._fn = _autograd_function()
        return _LazyFunction._fn.apply(*args)


_StreamingFunction = _LazyFunction()


def build_triton(analysis, cache_dir=None, **options):
    """The Triton backend of `attnc.compile`: fused kernels for streaming formulas, else a plan.

    options: fallback="torch" (the default and only fallback plan for non-streaming formulas)
    or fallback="error" (raise BackendError instead); allow_tf32=True lets fp32 inputs use TF32
    tensor-core products (about 1e-3 relative error per product; off by default).
    """
    from attnc.compiler.backends import CompiledAttention, build_torch

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BackendError(f"unknown triton backend option(s): {', '.join(unknown)}",
                           hint=f"options: {', '.join(OPTIONS)}")
    fallback = options.get("fallback", "torch")
    if fallback not in ("torch", "error"):
        raise BackendError(f"unknown fallback {fallback!r}", hint="fallback='torch' or 'error'")
    allow_tf32 = options.get("allow_tf32", False)
    if not isinstance(allow_tf32, bool):
        raise BackendError(f"allow_tf32 must be True or False, not {allow_tf32!r}")
    _require_triton()
    c = classification(analysis)
    if not c.streaming:
        if fallback == "error":
            raise BackendError(f"the formula does not stream: {c.reason}",
                               hint="use fallback='torch' or backend='torch'")
        ref = build_torch(analysis, cache_dir)
        compiled = CompiledAttention(analysis, "triton", ref._impl, ref.source, ref.source_path)
        compiled.plan = "torch-fallback"
        compiled.classification = c
        return compiled
    _require_device()
    runner = StreamingRunner(analysis, c.plan, cache_dir, allow_tf32=allow_tf32)
    source = generate(analysis.simplified, c.plan, formula=analysis.source, canonical=analysis.canonical,
                      digest=analysis.hash, dtype="float32", head_dim=64)
    path = runner.path("float32", 64)
    try:
        _cache.ensure_source(path, source)
    except OSError:
        path = None
    compiled = CompiledAttention(analysis, "triton", runner, source, path)
    compiled.plan = "streaming"
    compiled.classification = c
    compiled.runner = runner
    return compiled


__all__ = [
    "StreamingRunner",
    "build_triton",
    "classification",
    "explain",
    "interpreting",
    "triton_source",
]
