"""AutoBERT-Zero's Figure 6 at a size this machine affords: RS, RS+WS, EA+WS and OP-NAS (+WS).

Each method runs `opnas.search` with the real proxy (wiki-sample MLM; score = -held-out MLM loss) for
--budget evaluations (population M, top-K parents, C children each) and several seeds, and reports
  * the best-so-far proxy score after every evaluation (the figure's curves), and
  * a common yardstick: the reported best architecture of each run (under weight sharing the best of
    the final re-scores) trained stand-alone from scratch for --truth-steps x --truth-seeds and scored
    the same way. Weight-shared proxy scores rise as the supernet trains, so only the yardstick
    compares methods with and without weight sharing fairly.
Every figure has a bootstrap 90% interval over seeds; each method's difference from RS too. Baselines:
"no search" (architectures drawn at random from the space, the yardstick of each) and RS itself.

The proxy's own seed (held-out split, supernet init) is 0 for every search and for the yardstick, so
all methods and seeds are scored on the same held-out blocks; the intervals cover the searches' own
randomness (architectures drawn, training seeds), not a change of held-out data.

Searches and yardstick trainings run in --jobs processes; everything lands in --out (studies and
yardstick.jsonl), so a run that stops resumes where it was. The committed run:

    python benchmarks/bench_search_fig6.py --budget 200 --population 50 --top-k 5 --children 5 \\
        --seeds 0,1,2,3,4 --truth-steps 2000 --truth-seeds 2 --jobs 2 --out runs/fig6 \\
        --json benchmarks/results/search_fig6_cpu.json --plot benchmarks/results/search_fig6_cpu.png
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

METHODS = {   # name -> (algorithm, weight sharing)
    "RS": ("random", False),
    "RS+WS": ("random", True),
    "EA+WS": ("ea", True),
    "OP-NAS": ("opnas", True),
}


def _proxy_kwargs(args, weight_sharing: bool, steps: int | None = None, tokenizer=None) -> dict:
    return dict(task=None, tokenizer=tokenizer, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                eval_blocks=args.eval_blocks, shared_pretrain_steps=args.shared_steps,
                pretrain_steps=steps or args.scratch_steps, weight_sharing=weight_sharing,
                warmup_children=args.warmup_children if weight_sharing else 0, device="cpu", seed=0)


def _space(args):
    from attnc.search import opnas
    return opnas.Space(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_heads=args.heads)


def _init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def run_search(args, name: str, seed: int, tokenizer: str) -> dict:
    """One (method, seed) search in its own study folder (resumed when it is there)."""
    from attnc.search import opnas
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator

    algorithm, ws = METHODS[name]
    t0 = time.time()
    res = opnas.search(_space(args), evaluate=ProxyEvaluator(ProxyConfig(**_proxy_kwargs(args, ws, tokenizer=tokenizer))),
                       algorithm=algorithm, budget=args.budget, seed=seed, population=args.population,
                       top_k=args.top_k, children=args.children, study=Path(args.out) / f"{name}-{seed}" / "study.db")
    import sqlite3
    db = sqlite3.connect(Path(args.out) / f"{name}-{seed}" / "study.db")
    rescores = db.execute("SELECT COUNT(*) FROM rescores WHERE status='done'").fetchone()[0]
    db.close()
    curve, best = [], float("-inf")
    for e in res.evaluations:
        best = max(best, e.score)
        curve.append(best)
    return {"method": name, "seed": seed, "best_so_far": curve, "best_proxy": res.best_score,
            "best_layers": [str(x) for x in res.best_architecture.layers],
            "best_arch": res.best_architecture.to_json(), "seconds": time.time() - t0,
            "failed": res.failed, "duplicates": res.duplicates, "warmup_children": res.warmup,
            "rescore_evaluations": rescores}   # parents re-scored each generation + the final top: outside the budget


def run_truth(args, arch_json: dict, s: int, tokenizer: str) -> float:
    from attnc.search.proxy_fidelity import train_from_scratch
    return train_from_scratch(_proxy_kwargs(args, False, steps=args.truth_steps, tokenizer=tokenizer),
                              arch_json, 10_000 * (s + 1))[0]   # seed s: the same for every architecture


def _ci(xs, reps, seed):
    from attnc.search import ranking
    return list(ranking.bootstrap(lambda i: sum(xs[k] for k in i) / len(i), len(xs), reps=reps, seed=seed))


def _diff_ci(a, b, reps, seed):
    """Bootstrap 90% interval of mean(a) - mean(b), each resampled on its own (different searches)."""
    from attnc.search import ranking
    rng = random.Random(seed)
    vals = []
    for _ in range(reps):
        ra = [a[rng.randrange(len(a))] for _ in a]
        rb = [b[rng.randrange(len(b))] for _ in b]
        vals.append(sum(ra) / len(ra) - sum(rb) / len(rb))
    return [ranking.percentile(vals, 0.05), ranking.percentile(vals, 0.95)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--population", type=int, default=8, help="M")
    ap.add_argument("--top-k", type=int, default=3, help="K")
    ap.add_argument("--children", type=int, default=3, help="C")
    ap.add_argument("--shared-steps", type=int, default=16, help="MLM steps of a weight-shared child")
    ap.add_argument("--warmup-children", type=int, default=60, help="supernet warm-up children (weight sharing)")
    ap.add_argument("--scratch-steps", type=int, default=40, help="MLM steps of a from-scratch child (RS)")
    ap.add_argument("--truth-steps", type=int, default=150, help="stand-alone steps of the yardstick")
    ap.add_argument("--truth-seeds", type=int, default=1)
    ap.add_argument("--no-search", type=int, default=5, metavar="N",
                    help="the 'no search' baseline: N architectures drawn at random from the space")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-blocks", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2000, help="WordPiece vocabulary trained on the corpus")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jobs", type=int, default=1, help="searches / yardstick trainings at once (processes)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", default="runs/fig6", help="studies and yardstick.jsonl (a rerun resumes)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--plot", metavar="FILE", help="the figure: best so far vs evaluations per method "
                    "(mean over seeds, min-max band), as `attnc search report --plot` draws it")
    args = ap.parse_args(argv)

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from attnc.runtime.demo import demo_tokenizer
    from attnc.search import opnas

    if args.plot:
        from attnc.search import plots
        plots.check_plot_path(args.plot)
    tokenizer = str(demo_tokenizer(args.vocab))
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    # the searches
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                               initargs=(threads,))
    runs = {}
    runs_path = out / "runs.jsonl"      # each finished search's record (its seconds too): a rerun reuses it
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            if r["method"] in methods and r["seed"] in seeds:
                runs[(r["method"], r["seed"])] = r
    futures = {pool.submit(run_search, args, name, seed, tokenizer): (name, seed)
               for name in methods for seed in seeds if (name, seed) not in runs}
    for f in as_completed(futures):
        r = f.result()
        runs[futures[f]] = r
        with open(runs_path, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(f"{r['method']:<7} seed {r['seed']}: best proxy {r['best_proxy']:+.4f} ({r['seconds']:.0f}s)  "
              + " | ".join(r["best_layers"]), flush=True)

    # the yardstick: each run's reported best, and the no-search draws, trained stand-alone
    rng = random.Random("fig6-no-search")
    drawn = [opnas.sample_arch(rng, _space(args)).arch.to_json() for _ in range(args.no_search)]
    log_path = out / "yardstick.jsonl"
    settings = {"truth_steps": args.truth_steps, "proxy": _proxy_kwargs(args, False, args.truth_steps, tokenizer),
                "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads}
    truth = {}
    if log_path.exists():
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        if not lines or lines[0].get("settings") != json.loads(json.dumps(settings)):
            raise SystemExit(f"{log_path} was made with other yardstick settings: use another --out")
        for row in lines[1:]:
            truth[(row["key"], row["seed"])] = row["score"]
    else:
        log_path.write_text(json.dumps({"settings": settings}) + "\n")
    keys = {json.dumps(a, sort_keys=True) for a in [r["best_arch"] for r in runs.values()] + drawn}
    todo = [(k, s) for k in sorted(keys) for s in range(args.truth_seeds) if (k, s) not in truth]
    futures = {pool.submit(run_truth, args, json.loads(k), s, tokenizer): (k, s) for k, s in todo}
    for f in as_completed(futures):
        k, s = futures[f]
        truth[(k, s)] = f.result()
        with open(log_path, "a") as fh:
            fh.write(json.dumps({"key": k, "seed": s, "score": truth[(k, s)]}) + "\n")
        print(f"yardstick seed {s}: {truth[(k, s)]:+.4f}", flush=True)
    pool.shutdown()

    def yard(a: dict) -> float:
        k = json.dumps(a, sort_keys=True)
        return sum(truth[(k, s)] for s in range(args.truth_seeds)) / args.truth_seeds

    rows = []
    for (name, seed), r in sorted(runs.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
        r["yardstick"] = yard(r["best_arch"])
        rows.append(r)
    if args.plot:
        from attnc.search import plots
        plots.save_report([plots.load_study(out / f"{r['method']}-{r['seed']}") for r in rows], args.plot)
        print(f"wrote {args.plot}")

    b = args.bootstrap
    print(f"\nyardstick = -MLM loss of the reported best trained {args.truth_steps} steps x {args.truth_seeds} "
          f"seeds stand-alone (higher is better); mean over {len(seeds)} seeds [90% bootstrap interval]")
    summary = {}
    no_search = [yard(a) for a in drawn]
    rs = [r["yardstick"] for r in rows if r["method"] == "RS"]
    for name in methods:
        ys = [r["yardstick"] for r in rows if r["method"] == name]
        sec = sum(r["seconds"] for r in rows if r["method"] == name) / len(ys)
        extra_evals = sum(r["rescore_evaluations"] + r["warmup_children"] for r in rows if r["method"] == name) / len(ys)
        summary[name] = {"yardstick": sum(ys) / len(ys), "yardstick_ci90": _ci(ys, b, 1), "per_seed": ys,
                         "seconds": sec, "evaluations_beyond_budget": extra_evals,
                         "best_proxy": sum(r["best_proxy"] for r in rows if r["method"] == name) / len(ys)}
        if rs and name != "RS":
            summary[name]["minus_rs"] = sum(ys) / len(ys) - sum(rs) / len(rs)
            summary[name]["minus_rs_ci90"] = _diff_ci(ys, rs, b, 2)
        lo, hi = summary[name]["yardstick_ci90"]
        extra = (f"   vs RS {summary[name]['minus_rs']:+.4f} [{summary[name]['minus_rs_ci90'][0]:+.4f}, "
                 f"{summary[name]['minus_rs_ci90'][1]:+.4f}]") if "minus_rs" in summary[name] else ""
        print(f"  {name:<9} {summary[name]['yardstick']:+.4f} [{lo:+.4f}, {hi:+.4f}]  {sec:6.0f} s per search, "
              f"{extra_evals:.0f} trainings beyond the budget (warm-up, re-scores){extra}")
    for i, a in enumerate(methods):           # every pair: is one method's yardstick above another's?
        for b_name in methods[i + 1:]:
            ya = [r["yardstick"] for r in rows if r["method"] == a]
            yb = [r["yardstick"] for r in rows if r["method"] == b_name]
            d = sum(yb) / len(yb) - sum(ya) / len(ya)
            lo, hi = _diff_ci(yb, ya, b, 4)
            summary.setdefault("differences", {})[f"{b_name} - {a}"] = {"mean": d, "ci90": [lo, hi]}
            print(f"  {b_name} - {a}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    summary["no search"] = {"yardstick": sum(no_search) / len(no_search), "yardstick_ci90": _ci(no_search, b, 3),
                            "per_arch": no_search}
    lo, hi = summary["no search"]["yardstick_ci90"]
    print(f"  {'no search':<9} {summary['no search']['yardstick']:+.4f} [{lo:+.4f}, {hi:+.4f}]  "
          f"({len(no_search)} architectures drawn at random)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "benchmark": "search_fig6", "command": "python " + " ".join(map(shlex.quote, [sys.argv[0]] + (argv or sys.argv[1:]))),
            "torch": torch.__version__, "device": "cpu", "threads_per_job": threads, "args": vars(args),
            "runs": rows, "no_search": [{"arch": a, "yardstick": y} for a, y in zip(drawn, no_search)],
            "summary": summary, "seconds": time.time() - t_all}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
