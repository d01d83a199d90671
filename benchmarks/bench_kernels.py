"""Benchmark the fused Triton kernels on a set of formulas (GPU), or check them (CPU).

    python benchmarks/bench_kernels.py [--seq 1024 --dim 64 --dtype bf16 --backward] [--out DIR]

On a CUDA device: one `attnc.kernels.bench.run_bench` per formula (triton, torch, sdpa, flex),
a table on stdout and one JSON file per formula. Without CUDA: the correctness check only
(set TRITON_INTERPRET=1 before running, the Triton interpreter is slow).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMULAS = {
    "standard": "softmax(Q @ K^T / sqrt(d)) @ V",
    "causal": "softmax(mask(Q @ K^T / sqrt(d), j <= i)) @ V",
    "autobert_l2": "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "autobert_l12": "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
    "cosine": "softmax(cos(Q, K) * 8) @ V",
    "alibi": "softmax(Q @ K^T / sqrt(d) - 0.5 * abs(i - j)) @ V",
    "sigmoid": "sigmoid(Q @ K^T / sqrt(d) - 4) @ V",
}


def main(argv=None) -> int:
    import torch
    from attnc.kernels import bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(FORMULAS))
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(FORMULAS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in names:
        formula = FORMULAS[name]
        if torch.cuda.is_available():
            res = bench.run_bench(formula, batch=args.batch, heads=args.heads, seq=args.seq,
                                  dim=args.dim, dtype=args.dtype, backward=args.backward)
            cells = "  ".join(f"{r['backend']}={r['ms']:.3f}ms" if r["ms"] else f"{r['backend']}=-"
                              for r in res["rows"])
            print(f"{name:<14} {cells}")
        else:
            res = bench.correctness_check(formula)
            ok &= res["ok"]
            print(f"{name:<14} plan={res['plan']} err={res['max_abs_err']:.2g} "
                  f"grad err={res['max_abs_grad_err']:.2g} {'OK' if res['ok'] else 'MISMATCH'}")
        (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
