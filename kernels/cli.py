"""`attnc bench FORMULA`: time the fused Triton kernels against the torch backend, SDPA, flex."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a formula: triton vs torch vs sdpa vs flex",
                       description="Time one formula on several backends (ms, TFLOP/s, peak memory, "
                                   "ratio to the torch backend) and write a JSON result. Without "
                                   "CUDA it only checks correctness at a small shape.")
    p.add_argument("formula", help="formula text, e.g. 'softmax(Q @ K^T / sqrt(d)) @ V'")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", help="fp32, fp16 or bf16 (default bf16)")
    p.add_argument("--backends", default="triton,torch,sdpa,flex",
                   help="comma-separated subset of triton,torch,sdpa,flex")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", dest="json_path", default="bench_result.json",
                   help="where to write the JSON result (default bench_result.json)")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    import torch
    from attnc.compiler.errors import ConfigError

    from . import bench

    backends = bench.parse_backends(args.backends)
    bench.torch_dtype(args.dtype)
    for name in ("batch", "heads", "seq", "dim", "iters"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if not torch.cuda.is_available():
        if os.environ.get("ATTNC_BENCH_CHILD") != "1":
                print("no CUDA device: on a CPU attnc bench can only check correctness (the Triton "
                  "kernels under the interpreter vs the torch backend, at a small shape); time on a GPU",
                  flush=True)
        if os.environ.get("TRITON_INTERPRET") != "1":
            # the interpreter must be on before triton is imported: rerun in a fresh process
            env = dict(os.environ, TRITON_INTERPRET="1")
            env["ATTNC_BENCH_CHILD"] = "1"
            cmd = [sys.executable, "-m", "attnc", "bench", args.formula, "--json", args.json_path]
            return subprocess.run(cmd, env=env, check=False).returncode
        result = bench.correctness_check(args.formula)
        print(f"plan: {result['plan']}   max |out err| {result['max_abs_err']:.3g}   "
              f"max |grad err| {result['max_abs_grad_err']:.3g}   -> {'OK' if result['ok'] else 'MISMATCH'}")
        _write(args.json_path, {"mode": "correctness", **result})
        return 0 if result["ok"] else 1
    result = bench.run_bench(args.formula, batch=args.batch, heads=args.heads, seq=args.seq, dim=args.dim,
                             dtype=args.dtype, backends=backends, backward=args.backward,
                             warmup=args.warmup, iters=args.iters)
    print(f"{result['canonical']}   B={args.batch} H={args.heads} n={args.seq} d={args.dim} "
          f"{result['dtype']}{' fwd+bwd' if args.backward else ' fwd'}   on {result['device']}")
    count = result["flops"]
    if count["computed_fraction"] < 1:
        print(f"TFLOP/s count the {count['computed_fraction']:.1%} of score blocks the fused kernel "
              f"computes (the mask keeps {count['band']})")
    print(f"{'backend':<8} {'ms':>9} {'TFLOP/s':>9} {'peak MiB':>9} {'vs torch':>9}  note")
    for r in result["rows"]:
        fmt = lambda x, spec: format(x, spec) if x is not None else "-"
        print(f"{r['backend']:<8} {fmt(r['ms'], '9.3f')} {fmt(r['tflops'], '9.2f')} "
              f"{fmt(r['peak_mib'], '9.1f')} {fmt(r['vs_torch'], '8.2f') + 'x' if r['vs_torch'] else '        -'}"
              f"  {r['note']}")
    _write(args.json_path, {"mode": "timing", **result})
    return 0


def _write(path: str, data: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {p}")
