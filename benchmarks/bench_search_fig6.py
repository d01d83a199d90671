"""AutoBERT-Zero's Figure 6 at a size this machine affords: RS, RS+WS, EA+WS and OP-NAS (+WS).

Each method runs `opnas.search` with the real proxy (wiki-sample MLM; score = -held-out MLM loss)
on tiny hybrids, for --budget evaluations and several seeds, and reports
  * the best-so-far proxy score after every evaluation (the figure's curves), and
  * a common yardstick: the top-1 architecture of each run trained stand-alone from scratch for
    --truth-steps and scored the same way. Weight-shared proxy scores improve as the supernet
    trains, so only the yardstick compares methods with and without weight sharing fairly.

    python benchmarks/bench_search_fig6.py --json benchmarks/results/search_fig6_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

METHODS = {   # name -> (algorithm, weight sharing)
    "RS": ("random", False),
    "RS+WS": ("random", True),
    "EA+WS": ("ea", True),
    "OP-NAS": ("opnas", True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--shared-steps", type=int, default=8, help="MLM steps of a weight-shared child")
    ap.add_argument("--scratch-steps", type=int, default=40, help="MLM steps of a from-scratch child")
    ap.add_argument("--truth-steps", type=int, default=150, help="stand-alone steps of the yardstick")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2000, help="WordPiece vocabulary trained on the corpus")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--plot", metavar="FILE", help="the figure: best so far vs evaluations per method "
                    "(mean over seeds, min-max band), as `attnc search report --plot` draws it")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from attnc.runtime.demo import demo_tokenizer
    from attnc.search import opnas
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator

    tokenizer = str(demo_tokenizer(args.vocab)) if args.vocab else None

    def proxy(weight_sharing: bool, steps: int | None = None, seed: int = 0) -> ProxyEvaluator:
        return ProxyEvaluator(ProxyConfig(
            task=None, tokenizer=tokenizer, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
            shared_pretrain_steps=args.shared_steps, pretrain_steps=steps or args.scratch_steps,
            weight_sharing=weight_sharing, device="cpu", seed=seed))

    space = opnas.Space(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_heads=args.heads)
    seeds = [int(s) for s in args.seeds.split(",")]
    truth_run = proxy(False, steps=args.truth_steps).runner()
    runs = []
    t_all = time.time()
    if args.plot:
        from attnc.search import plots
        plots.check_plot_path(args.plot)
    studies = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            algorithm, ws = METHODS[name]
            for seed in seeds:
                t0 = time.time()
                res = opnas.search(space, evaluate=proxy(ws, seed=seed), algorithm=algorithm, budget=args.budget,
                                   seed=seed, population=args.population, top_k=args.top_k,
                                   children=args.children, study=Path(tmp) / f"{name}-{seed}" / "study.db")
                studies.append(Path(tmp) / f"{name}-{seed}")
                curve, best = [], float("-inf")
                for e in res.evaluations:
                    if e.score is not None:
                        best = max(best, e.score)
                    curve.append(best)
                top = res.best_architecture
                truth = truth_run(top, None, 0).score
                runs.append({"method": name, "seed": seed, "best_so_far": curve, "best_proxy": res.best_score,
                             "best_layers": [str(x) for x in top.layers], "yardstick": truth,
                             "seconds": time.time() - t0, "failed": res.failed, "duplicates": res.duplicates})
                print(f"{name:<7} seed {seed}: best proxy {res.best_score:+.4f}, yardstick {truth:+.4f} "
                      f"({time.time() - t0:.0f}s)  " + " | ".join(runs[-1]["best_layers"]), flush=True)
        if args.plot:
            plots.save_report([plots.load_study(p) for p in studies], args.plot)
            print(f"wrote {args.plot}")
    print("\nmean over seeds (yardstick = -MLM loss of the top-1 architecture trained "
          f"{args.truth_steps} steps stand-alone; higher is better)")
    summary = {}
    for name in args.methods.split(","):
        rs = [r for r in runs if r["method"] == name]
        y = sum(r["yardstick"] for r in rs) / len(rs)
        s = sum(r["seconds"] for r in rs) / len(rs)
        summary[name] = {"yardstick": y, "seconds": s}
        print(f"  {name:<7} yardstick {y:+.4f}   {s:6.1f} s per search")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "benchmark": "search_fig6", "command": "python " + " ".join(map(shlex.quote, sys.argv)),
            "torch": torch.__version__, "device": "cpu", "threads": args.threads, "args": vars(args),
            "runs": runs, "summary": summary, "seconds": time.time() - t_all}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
