"""Benchmark one formula across backends: triton (fused), torch (generated), sdpa, flex.

`run_bench(...)` returns a JSON-able dict (device, versions, one row per backend with ms,
TFLOP/s, peak memory and the ratio to the torch backend). sdpa / flex only run where the
formula *is* standard (optionally causal) attention, which they implement. Without CUDA
there is nothing to time: `correctness_check` compares the Triton kernels (under the
interpreter) with the torch backend at a small shape instead.
"""
from __future__ import annotations

import math
import platform
import time

from attnc.compiler.errors import ConfigError

import attnc

BACKENDS = ("triton", "torch", "sdpa", "flex")
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}
STANDARD = "softmax(Q @ K^T / sqrt(d)) @ V"
CAUSAL = "softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V"


def parse_names(text: str, allowed, what: str, example: str = "") -> tuple[str, ...]:
    """A comma-separated list of names out of `allowed` (a ConfigError naming the bad ones)."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise ConfigError(f"unknown {what} {', '.join(bad) or '(none)'}",
                          hint=f"choose from {','.join(allowed)}{example}")
    return names


def parse_backends(text: str) -> tuple[str, ...]:
    return parse_names(text, BACKENDS, "backend(s)")


def torch_dtype(name: str):
    import torch
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", hint="fp32, fp16 or bf16")
    return getattr(torch, DTYPES[name])


def _standard_kind(formula: str) -> str | None:
    canon = attnc.analyze(formula).canonical
    if canon == attnc.analyze(STANDARD).canonical:
        return "standard"
    if canon == attnc.analyze(CAUSAL).canonical:
        return "causal"
    return None


def bench_flops(formula: str, *, batch: int, heads: int, seq: int, dim: int, backward: bool,
                dtype: str = "bf16") -> dict:
    """FLOPs of the attention products (4 n^2 d per head forward, 3.5x that with the backward),
    counting only the score blocks the fused forward kernel computes: key blocks that a causal
    or banded mask of the formula masks wholly are skipped (default block config of the kernel).
    Returns {"flops", "dense_flops", "computed_fraction", "band"}."""
    from .plan import classify
    from .structure import computed_entries, mask_band
    from .tune import configs

    g = attnc.analyze(formula).simplified
    c = classify(g)
    band = mask_band(g, c.plan) if c.streaming else None
    cfg = configs("fwd", head_dim=dim, dtype=DTYPES.get(dtype, dtype), n=seq)[0]
    entries = computed_entries(band, seq, cfg.block_m, cfg.block_n)
    per_entry = 4.0 * batch * heads * dim * (3.5 if backward else 1.0)
    return {"flops": per_entry * entries, "dense_flops": per_entry * seq * seq,
            "computed_fraction": entries / (seq * seq), "band": None if band is None else str(band),
            "blocks": [cfg.block_m, cfg.block_n]}


def environment() -> dict:
    import torch
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"device": dev, "torch": torch.__version__, "triton": tv, "python": platform.python_version()}


def _callables(formula, backends, kind):
    import torch
    import torch.nn.functional as F

    out = {}
    for b in backends:
        if b in ("triton", "torch"):
            fn = attnc.compile(formula, backend=b)
            out[b] = _wrap(fn)
        elif b == "sdpa":
            if kind is None:
                out[b] = None
                continue
            out[b] = lambda q, k, v, p: F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
        elif b == "flex":
            if kind is None:
                out[b] = None
                continue
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            except ImportError:
                out[b] = None
                continue
            compiled = torch.compile(flex_attention)
            cache = {}

            def run(q, k, v, p, compiled=compiled, cache=cache):
                if kind == "causal":
                    n = q.shape[-2]
                    if n not in cache:
                        cache[n] = create_block_mask(lambda b, h, qi, kv: kv <= qi, None, None, n, n,
                                                     device=q.device)
                    return compiled(q, k, v, block_mask=cache[n])
                return compiled(q, k, v)
            out[b] = run
    return out


def _wrap(fn):
    def run(q, k, v, p):
        return fn(q=q, k=k, v=v, p=p)
    return run


def _time(fn, args, backward: bool, warmup: int, iters: int):
    import torch

    def step():
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return ms, peak


def run_bench(formula: str, *, batch=4, heads=8, seq=1024, dim=64, dtype="bf16",
              backends=BACKENDS, backward=False, warmup=5, iters=20) -> dict:
    """Time `formula` on a CUDA device; one row per backend (None fields where not applicable)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("timing needs a CUDA device", hint="use correctness_check on a CPU")
    dt = torch_dtype(dtype)
    kind = _standard_kind(formula)
    inputs = attnc.analyze(formula).inputs
    gen = torch.Generator(device="cuda").manual_seed(0)
    ts = {x: torch.randn(batch, heads, seq, dim, device="cuda", dtype=dt, generator=gen,
                         requires_grad=backward) for x in "QKVP"}
    args = [ts[x] if x in inputs else None for x in "QKVP"]
    count = bench_flops(formula, batch=batch, heads=heads, seq=seq, dim=dim, backward=backward,
                        dtype=dtype)
    flops = count["flops"]
    rows = []
    fns = _callables(formula, backends, kind)
    for b in backends:
        fn = fns.get(b)
        if fn is None:
            rows.append({"backend": b, "ms": None, "tflops": None, "peak_mib": None,
                         "note": "only for standard / causal softmax attention"})
            continue
        try:
            ms, peak = _time(fn, args, backward, warmup, iters)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"backend": b, "ms": None, "tflops": None, "peak_mib": None, "note": "out of memory"})
            continue
        rows.append({"backend": b, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_mib": peak,
                     "note": ""})
    ref = next((r["ms"] for r in rows if r["backend"] == "torch" and r["ms"]), None)
    for r in rows:
        r["vs_torch"] = (ref / r["ms"]) if (ref and r["ms"]) else None
    return {"formula": formula, "canonical": attnc.analyze(formula).canonical,
            "shape": {"batch": batch, "heads": heads, "seq": seq, "dim": dim}, "dtype": DTYPES[dtype],
            "backward": backward, "rows": rows, "flops": count, **environment(), "time": time.time()}


def correctness_check(formula: str, *, seq=16, dim=16, batch=1, heads=2) -> dict:
    """Compare the Triton backend with the torch backend at a small shape (any device)."""
    import torch

    ref = attnc.compile(formula, backend="torch")
    tri = attnc.compile(formula, backend="triton")
    gen = torch.Generator().manual_seed(0)
    ts = {x: torch.randn(batch, heads, seq, dim, generator=gen, requires_grad=True) for x in tri.inputs}
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[-1, seq - seq // 4:] = False
    kw = {x.lower(): t for x, t in ts.items()}
    a = ref(**kw, key_padding_mask=mask)
    b = tri(**kw, key_padding_mask=mask)
    ga = torch.autograd.grad(a.sum(), list(ts.values()))
    gb = torch.autograd.grad(b.sum(), list(ts.values()))
    err = (a - b).abs().max().item()
    gerr = max((x - y).abs().max().item() for x, y in zip(ga, gb))
    ok = math.isfinite(err) and err < 1e-4 and gerr < 1e-3
    return {"formula": formula, "plan": getattr(tri, "plan", None), "max_abs_err": err,
            "max_abs_grad_err": gerr, "ok": ok, "shape": {"batch": batch, "heads": heads, "seq": seq,
                                                          "dim": dim}, **environment()}


__all__ = ["BACKENDS", "bench_flops", "correctness_check", "environment", "parse_backends", "run_bench"]
