"""CPU latency of the attnc runtime vs transformers.BertModel of the same architecture.

Batch 1, length 128, one thread, both models in one process with the same weights, interleaved
for several rounds (the best per-model median counts, which is robust to a busy machine).
Target: ratio attnc / BertModel <= 1.05.

    python benchmarks/bench_runtime.py [--arch 12-768-3072-12-768] [--runs 20] [--rounds 3] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append",
                    help="arch string(s); default: bert-base 12-768-3072-12-768 and 4-256-1024-4-256")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)

    from attnc.runtime import resolve_config
    from attnc.runtime.latency import compare_with_bert

    results = []
    for arch in args.arch or ["12-768-3072-12-768", "4-256-1024-4-256"]:
        r = compare_with_bert(resolve_config(arch), args.seq, args.batch, warmup=args.warmup,
                              runs=args.runs, threads=args.threads, rounds=args.rounds)
        results.append(r)
        print(f"{arch}: BertModel ({r['bert_attn_impl']}) {r['bert_ms']:.2f} ms, attnc {r['attnc_ms']:.2f} ms, "
              f"ratio {r['ratio']:.3f} {'OK' if r['ratio'] <= 1.05 else 'ABOVE TARGET'} "
              f"(batch {args.batch}, seq {args.seq}, {args.threads} thread(s), torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["ratio"] <= 1.05 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
