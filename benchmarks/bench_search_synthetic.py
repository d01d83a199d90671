"""Best-so-far after N evaluations for OP-NAS, plain EA and random search on the synthetic
evaluator with known good operations (attnc.search.synthetic:known_ops), averaged over seeds.
A cheap stand-in for the paper's Figure 6 that isolates the search algorithm from proxy noise.

    python benchmarks/bench_search_synthetic.py [--budget 100] [--seeds 0 1 2 3 4] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    from attnc.search import opnas
    from attnc.search.synthetic import known_ops

    checkpoints = sorted({n for n in (20, 40, 60, 80, 100, args.budget) if n <= args.budget})
    out = {}
    for alg in ("opnas", "ea", "random"):
        curves, t0 = [], time.perf_counter()
        for seed in args.seeds:
            r = opnas.search(opnas.Space(num_layers=args.layers), known_ops, algorithm=alg, budget=args.budget,
                             population=args.population, top_k=args.top_k, children=args.children, seed=seed)
            best, curve = float("-inf"), []
            for e in r.evaluations:
                best = max(best, e.score)
                curve.append(best)
            curves.append(curve)
        mean = {n: statistics.mean(c[n - 1] for c in curves) for n in checkpoints}
        out[alg] = {"mean_best_after": mean, "final_per_seed": [c[-1] for c in curves],
                    "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{alg:7s} mean best after " + "  ".join(f"{n}: {v:.2f}" for n, v in mean.items()))
    ratio = out["opnas"]["mean_best_after"][args.budget] / out["random"]["mean_best_after"][args.budget]
    print(f"OP-NAS / random, mean best after {args.budget}: {ratio:.2f}")
    if args.json:
        res = {"command": "python " + " ".join(sys.argv), "python": platform.python_version(),
               "evaluator": "attnc.search.synthetic:known_ops", "seeds": args.seeds, "results": out,
               "opnas_over_random": ratio}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
