"""BIWS fidelity against scoring steps: one supernet warmed up as `run_cpu.sh`'s 96-child run (same
children, same seeds), every architecture of archs32.txt then scored from it with 1, 4, 16 and 48 MLM
steps (one seed for all), Kendall tau / Spearman rho against that run's truth.

    python benchmarks/fidelity/score_steps.py [--json benchmarks/results/fidelity_score_steps_cpu.json]

Run from the repository root after `sh benchmarks/fidelity/run_cpu.sh` (it reads the truth from
benchmarks/results/fidelity_cpu_w96.json).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--truth", default="benchmarks/results/fidelity_cpu_w96.json")
    ap.add_argument("--archs", default="benchmarks/fidelity/archs32.txt")
    ap.add_argument("--steps", default="1,4,16,48")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from attnc.runtime.demo import demo_tokenizer
    from attnc.search import proxy_fidelity as pf
    from attnc.search import ranking
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator

    d = json.loads(Path(args.truth).read_text())
    truth, cfg = d["truth"]["mean"], d["config"]
    archs = pf.read_architectures(args.archs, 64, 256, 4)
    if [pf.arch_line(a) for a in archs] != d["architectures"]:
        raise SystemExit(f"{args.archs} is not the architecture list of {args.truth}")
    base = dict(task=None, **cfg["proxy"])     # the run's own proxy settings (its tokenizer folder included)
    if not Path(base.get("tokenizer") or ".").exists():
        base["tokenizer"] = str(demo_tokenizer(2000))
    ev = ProxyEvaluator(ProxyConfig(weight_sharing=True, shared_pretrain_steps=cfg["shared_steps"], **base))
    runner = ev.runner()
    rng = random.Random(f"attnc-fidelity-warmup:{cfg['seed']}")     # the fidelity tool's warm-up
    for i in range(cfg["warmup_children"]):
        a = rng.choice(archs)
        ev.commit(a, runner(a, ev.prepare(a), 30_000 + i + cfg["seed"]))
    rows = []
    for k in (int(x) for x in args.steps.split(",")):
        t0 = time.time()
        scores = [float(runner(a, ev.prepare(a), 20_000 + cfg["seed"], steps_override=k).score) for a in archs]
        if k == cfg["shared_steps"]:   # the run's own scoring: the same supernet and seeds, so the same scores
            want = d["proxies"]["biws"]["scores"]
            if max(abs(a - b) for a, b in zip(scores, want)) > 1e-4:
                raise SystemExit(f"the {k}-step scores do not reproduce {args.truth}'s BIWS scores")
        rows.append({"score_steps": k, "kendall_tau": ranking.kendall_tau(scores, truth),
                     "spearman_rho": ranking.spearman_rho(scores, truth), "scores": scores,
                     "seconds": time.time() - t0})
        print(f"score steps {k:3d}: tau {rows[-1]['kendall_tau']:+.3f}  rho {rows[-1]['spearman_rho']:+.3f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "fidelity_score_steps", "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
            "torch": torch.__version__, "warmup_children": cfg["warmup_children"], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
