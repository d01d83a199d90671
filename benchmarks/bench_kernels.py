"""Issue 13: the fused Triton kernels side by side with SDPA-flash, FlexAttention, eager and attnc's
torch backend, on one GPU, in bf16, forward and forward+backward.

    python benchmarks/bench_kernels.py --out DIR [--grid 512x64x384,2048x64x64,8192x128x16]
    python benchmarks/bench_kernels.py --warm-only --only cosine ...   # compile caches, no timing

Each grid cell is n x d x (batch*heads). Baselines per formula:
  sdpa   F.scaled_dot_product_attention with the flash backend (standard and causal only)
  flex   torch.compile(flex_attention) with the best rewrite a user would write: Q/K/V transformed
         in eager PyTorch first where the formula needs it, then a score_mod / block mask
  eager  hand-written PyTorch that materialises the n x n scores
  torch  attnc's generated PyTorch function
FLOP convention (for TFLOP/s): the two n x n x d matmuls of attention, 4 n^2 d per head forward,
2.5x that for forward+backward, halved for causal -- the same count for every backend, so the
TFLOP/s column is a rescaled speed, comparable across rows.

Without CUDA it runs nothing but the correctness of the eager / flex rewrites against attnc's torch
backend at a tiny shape (--check), so the rewrites can be read and checked anywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FORMULAS = {
    "standard": "softmax(Q @ K^T / sqrt(d)) @ V",
    "autobert_l2": "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "autobert_l12": "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
    "cosine": "softmax(cos(Q, K) * 8) @ V",
    "euclidean": "softmax(-dist(Q, K)) @ V",
    "softsign": "softsign(Q @ K^T / sqrt(d)) @ V",
    "alibi": "softmax(Q @ K^T / sqrt(d) - 0.5 * abs(i - j)) @ V",
    "causal": "softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V",
}
CAUSAL = {"causal"}


# ---- eager PyTorch, materialising n x n ------------------------------------------------------

def _idx(n, device):
    i = torch.arange(n, device=device)
    return i[:, None], i[None, :]


def eager(name, q, k, v):
    s = 1.0 / math.sqrt(q.shape[-1])
    if name == "standard":
        return torch.softmax(q @ k.transpose(-1, -2) * s, -1) @ v
    if name == "autobert_l2":
        return torch.softmax(q @ F.softplus(k).transpose(-1, -2) * s, -1) @ (k + q)
    if name == "autobert_l12":
        return torch.softmax(q @ (k * s + v).transpose(-1, -2) * s, -1) @ v
    if name == "cosine":
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return torch.softmax(qn @ kn.transpose(-1, -2) * 8, -1) @ v
    if name == "euclidean":
        qq = (q.float() ** 2).sum(-1, keepdim=True)
        kk = (k.float() ** 2).sum(-1, keepdim=True)
        d2 = qq + kk.transpose(-1, -2) - 2 * (q @ k.transpose(-1, -2)).float()
        return torch.softmax(-d2.clamp_min(1e-12).sqrt(), -1).to(q.dtype) @ v
    if name == "softsign":
        return F.softsign(q @ k.transpose(-1, -2) * s) @ v
    i, j = _idx(q.shape[-2], q.device)
    if name == "alibi":
        return torch.softmax(q @ k.transpose(-1, -2) * s - 0.5 * (i - j).abs().to(q.dtype), -1) @ v
    if name == "causal":
        z = (q @ k.transpose(-1, -2) * s).masked_fill(j > i, float("-inf"))
        return torch.softmax(z, -1) @ v
    raise KeyError(name)


# ---- FlexAttention: the best rewrite a user would write ------------------------------------------

def _alibi_mod(sc, b, h, qi, kj):
    return sc - 0.5 * (qi - kj).abs()


def _causal_mask(b, h, qi, kj):
    return kj <= qi


def flex_fn(name, compiled):
    """A callable (q, k, v) -> out, or a string saying why flex cannot express the formula.

    score_mod / mask_mod are module-level functions (one object for every call): a new closure per
    call makes torch.compile recompile on every call until it gives up and runs flex_attention
    unfused (n x n memory) -- the first run of this benchmark measured that by mistake."""
    from torch.nn.attention.flex_attention import create_block_mask

    masks = {}
    if name == "softsign":
        return "flex_attention always normalises with a softmax; softsign weights are not expressible"

    def run(q, k, v):
        s = 1.0 / math.sqrt(q.shape[-1])
        if name == "standard":
            return compiled(q, k, v)
        if name == "causal":
            n = q.shape[-2]
            if n not in masks:
                masks[n] = create_block_mask(_causal_mask, None, None, n, n, device=q.device)
            return compiled(q, k, v, block_mask=masks[n])
        if name == "alibi":
            return compiled(q, k, v, score_mod=_alibi_mod)
        if name == "autobert_l2":
            return compiled(q, F.softplus(k), k + q)
        if name == "autobert_l12":
            return compiled(q, k * s + v, v)
        if name == "cosine":
            return compiled(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=8.0)
        if name == "euclidean":
            # -dist = -sqrt(|q|^2 + |k|^2 - 2 q.k): append the norms as extra head-dim columns so
            # that one dot product gives |q|^2 + |k|^2 - 2 q.k and no tensor is captured
            qq = (q.float() ** 2).sum(-1, keepdim=True).to(q.dtype)
            kk = (k.float() ** 2).sum(-1, keepdim=True).to(k.dtype)
            one = torch.ones_like(qq)
            pad = torch.zeros(*q.shape[:-1], 14, device=q.device, dtype=q.dtype)  # head dim % 16
            q2 = torch.cat([-2 * q, qq, one, pad], -1)
            k2 = torch.cat([k, one, kk, pad], -1)
            return compiled(q2, k2, v, score_mod=_neg_sqrt_mod, scale=1.0)
        raise KeyError(name)
    return run


def _neg_sqrt_mod(sc, b, h, qi, kj):
    return -(sc.clamp_min(1e-12)).sqrt()


# ---- timing ----------------------------------------------------------------------------------------

def _time(fn, args, backward, ms_budget=150):
    from triton.testing import do_bench

    def step():
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    step()
    torch.cuda.synchronize()
    for a in args:
        a.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    grad_to_none = list(args) if backward else None
    ms = do_bench(step, warmup=25, rep=ms_budget, grad_to_none=grad_to_none)
    return ms, peak


def callables(name, backends, warm_only=False):
    import attnc
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch._dynamo.config.cache_size_limit = 64   # 3 shapes x 2 modes per formula, no fallbacks

    formula = FORMULAS[name]
    out = {}
    for b in backends:
        if b == "triton":
            fn = attnc.compile(formula, backend="triton")
            out[b] = lambda q, k, v, fn=fn: fn(q=q, k=k, v=v)
        elif b == "torch" and not warm_only:
            fn = attnc.compile(formula, backend="torch")
            out[b] = lambda q, k, v, fn=fn: fn(q=q, k=k, v=v)
        elif b == "sdpa" and not warm_only:
            if name not in ("standard", "causal"):
                out[b] = "SDPA implements standard (and causal) softmax attention only"
                continue

            def sd(q, k, v, causal=name == "causal"):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            out[b] = sd
        elif b == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            out[b] = flex_fn(name, torch.compile(flex_attention, dynamic=False))
        elif b == "eager" and not warm_only:
            out[b] = lambda q, k, v, name=name: eager(name, q, k, v)
    return out


def flops(n, d, bh, backward, causal):
    f = 4.0 * bh * n * n * d * (2.5 if backward else 1.0)
    return f / 2 if causal else f


def environment():
    import triton
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        drv = None
    return {"device": torch.cuda.get_device_name(), "driver": drv, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "autotune": os.environ.get("ATTNC_TRITON_AUTOTUNE", "1")}


def parse_grid(text):
    cells = []
    for part in text.split(","):
        n, d, bh = (int(x) for x in part.split("x"))
        cells.append((n, d, bh))
    return cells


def bench(names, grid, backends, out_path, deadline, warm_only=False, modes=("fwd", "fwd+bwd")):
    results = {"command": " ".join([sys.executable] + sys.argv), **environment(), "rows": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in names:
        fns = callables(name, backends, warm_only)
        for n, d, bh in grid:
            heads = 12 if bh % 12 == 0 else 8 if bh % 8 == 0 else 1
            shape = (bh // heads, heads, n, d)
            for mode in modes:
                if time.time() > deadline:
                    results["stopped_early"] = True
                    return results
                bwd = mode == "fwd+bwd"
                args = [(torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.5)
                        .requires_grad_(bwd) for _ in range(3)]
                for b in backends:
                    fn = fns.get(b)
                    if fn is None:
                        continue
                    row = {"formula": name, "n": n, "d": d, "batch": shape[0], "heads": heads,
                           "mode": mode, "backend": b}
                    if isinstance(fn, str):
                        row["note"] = fn
                    elif b == "eager" and n * n * bh * 4 * (6 if bwd else 2) > 60 * 2 ** 30:
                        row["note"] = "skipped: the n x n tensors would not fit"
                    else:
                        try:
                            if warm_only:
                                fn(*args).sum().backward() if bwd else fn(*args)
                                torch.cuda.synchronize()
                                continue
                            ms, peak = _time(fn, args, bwd)
                            row.update(ms=ms, peak_mib=peak,
                                       tflops=flops(n, d, bh, bwd, name in CAUSAL) / ms / 1e9)
                        except Exception as e:  # noqa: BLE001 - a baseline may not support a case
                            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                            torch.cuda.empty_cache()
                    if not warm_only:
                        results["rows"].append(row)
                        print(json.dumps(row), flush=True)
                if out_path and not warm_only:
                    out_path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def markdown(results) -> str:
    rows = [r for r in results["rows"]]
    head = (f"Device {results['device']} (driver {results['driver']}), torch {results['torch']}, "
            f"triton {results['triton']}, bf16. Command: `{results['command']}`\n\n"
            "ms per call (TFLOP/s in the attention-matmul convention, peak extra MiB); "
            "ratio = baseline ms / triton ms (> 1: attnc faster).\n\n")
    backends = ["triton", "sdpa", "flex", "eager", "torch"]
    lines = ["| formula | n | d | B*H | mode | " + " | ".join(backends) +
             " | vs sdpa | vs flex | vs eager |", "|" + "---|" * (len(backends) + 8)]
    keys = sorted({(r["formula"], r["n"], r["d"], r["batch"] * r["heads"], r["mode"]) for r in rows},
                  key=lambda k: (list(FORMULAS).index(k[0]), k[1], k[2], k[4]))
    for key in keys:
        cell = {r["backend"]: r for r in rows
                if (r["formula"], r["n"], r["d"], r["batch"] * r["heads"], r["mode"]) == key}

        def show(b):
            r = cell.get(b)
            if not r or "ms" not in r:
                return "n/a" if r and r.get("note", "").startswith(("SDPA", "flex")) else (
                    "err" if r and "error" in r.get("note", "") else "-")
            return f"{r['ms']:.3f} ({r['tflops']:.0f}, {r['peak_mib']:.0f})"

        def ratio(b):
            t, o = cell.get("triton", {}).get("ms"), cell.get(b, {}).get("ms")
            return f"{o / t:.2f}x" if t and o else "-"
        lines.append("| " + " | ".join(str(x) for x in key) + " | " + " | ".join(show(b) for b in backends)
                     + f" | {ratio('sdpa')} | {ratio('flex')} | {ratio('eager')} |")
    notes = sorted({f"- {r['backend']} / {r['formula']}: {r['note']}" for r in rows if r.get("note")})
    return head + "\n".join(lines) + "\n\nNotes:\n" + "\n".join(notes) + "\n"


def check_rewrites() -> int:
    """CPU: the eager and (uncompiled) flex rewrites agree with attnc's torch backend."""
    import attnc
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    bad = 0
    for name, formula in FORMULAS.items():
        ref = attnc.compile(formula, backend="torch")(q=q, k=k, v=v)
        errs = {"eager": (eager(name, q, k, v) - ref).abs().max().item()}
        f = flex_fn(name, flex_attention)
        if not isinstance(f, str):
            errs["flex"] = (f(q.float(), k.float(), v.float()).double() - ref).abs().max().item()
        ok = all(e < 1e-4 for e in errs.values())
        bad += not ok
        print(f"{name:<14} " + "  ".join(f"{b} err={e:.2g}" for b, e in errs.items()) +
              ("" if ok else "  MISMATCH"))
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="512x64x384,2048x64x64,8192x128x16")
    ap.add_argument("--only", default=",".join(FORMULAS))
    ap.add_argument("--backends", default="triton,sdpa,flex,eager,torch")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cells after this")
    ap.add_argument("--warm-only", action="store_true", help="compile (triton, flex) without timing")
    ap.add_argument("--check", action="store_true", help="CPU: check the eager / flex rewrites")
    args = ap.parse_args(argv)
    if args.check or not torch.cuda.is_available():
        return check_rewrites()
    names = args.only.split(",")
    out = Path(args.out) if args.out else None
    res = bench(names, parse_grid(args.grid), args.backends.split(","), out, time.time() + args.budget_s,
                warm_only=args.warm_only, modes=tuple(args.modes.split(",")))
    if out and not args.warm_only:
        out.write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
