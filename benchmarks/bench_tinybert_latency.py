"""Issue 10: the AutoTinyBERT latency predictor on this machine's CPU (the paper's target: one thread,
batch 1, sequence length 128).

    python benchmarks/bench_tinybert_latency.py --samples 300 --data runs/tinybert_latency \
        --out benchmarks/results/tinybert_latency_cpu.json

Collects (or resumes: the dataset folder is attnc.search.tinybert.latency's resumable JSONL) the
latencies of `--samples` architectures of a mid-sized space (max 6-512-2048-8-512, head dim 64, the
real 30522-word vocabulary), then fits the MLP predictor on the same fixed held-out split in a few
variants (log-ms vs ms target, median vs min of the repeats, widths) and reports held-out RMSE (ms) and
MAPE (%) next to a mean predictor and least squares on the same features. Target: MAPE <= 3% (HAT
reports about 1.7%). Also measures BERT-base on the same target (the --speedup reference).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from attnc.search.tinybert.latency import LatencyPredictor, bert_base_latency_ms, collect, read_meta
from attnc.search.tinybert.space import Space

SPACE = Space(max_layers=6, max_hidden=512, max_ffn=2048, max_heads=8)
VARIANTS = [   # (name, fit kwargs)
    ("log_median_400x3", dict(target="log", value="ms", hidden=(400, 400, 400), epochs=2000)),
    ("ms_median_400x3", dict(target="ms", value="ms", hidden=(400, 400, 400), epochs=2000)),
    ("log_min_400x3", dict(target="log", value="min_ms", hidden=(400, 400, 400), epochs=2000)),
    ("log_median_128x3", dict(target="log", value="ms", hidden=(128, 128, 128), epochs=2000)),
    ("log_median_64x2", dict(target="log", value="ms", hidden=(64, 64), epochs=2000)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--data", default="runs/tinybert_latency", help="dataset folder (resumable)")
    ap.add_argument("--out", default="benchmarks/results/tinybert_latency_cpu.json")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    records = collect(SPACE, args.samples, args.data, warmup=args.warmup, repeats=args.repeats,
                      seed=args.seed, progress=True)
    collect_s = time.perf_counter() - t0
    base_ms = bert_base_latency_ms("cpu", 1, 1, 128, warmup=args.warmup, repeats=args.repeats, folder=args.data)
    lat = sorted(r["ms"] for r in records)
    results = {}
    names = [n for n, _ in VARIANTS] if args.variants == "all" else args.variants.split(",")
    for name, kw in VARIANTS:
        if name not in names:
            continue
        _, m = LatencyPredictor.fit(SPACE, records, seed=args.seed, holdout=0.2, seq=128, **kw)
        results[name] = m
        print(f"{name:18s} held-out RMSE {m['rmse_ms']:.3f} ms  MAPE {m['mape_pct']:.2f}%  | mean predictor "
              f"RMSE {m['mean_predictor']['rmse_ms']:.3f} ms MAPE {m['mean_predictor']['mape_pct']:.2f}%  | "
              f"least squares MAPE {m['linear']['mape_pct']:.2f}%  (fit {m['fit_seconds']:.1f} s)", flush=True)
    out = {
        "benchmark": "tinybert_latency", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "torch": torch.__version__, "machine": read_meta(args.data).get("machine"), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": {"device": "cpu", "threads": 1, "batch": 1, "seq": 128, "warmup": args.warmup,
                   "repeats": args.repeats},
        "space": SPACE.to_json(), "samples": len(records), "collect_seconds_this_run": collect_s,
        "latency_ms": {"min": lat[0], "median": lat[len(lat) // 2], "max": lat[-1]},
        "bert_base_ms": base_ms, "variants": results,
        "note": "held-out split: 20% of the archs (seed 0), never an arch at a feature's min or max; "
                "the machine is shared (2 cores), so the latencies carry contention noise",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
