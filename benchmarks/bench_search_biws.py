"""BIWS fidelity and cost: does the weight-shared proxy rank architectures like longer training?

For a fixed set of architectures (default 10, tiny widths) this measures
  * ground truth: stand-alone training from scratch for --truth-steps MLM steps;
  * BIWS proxy: children of a supernet that was first warmed up by --warmup evaluations of random
    architectures of the same space (the training a search does anyway; --shared-steps each,
    written back after each evaluation, as in a search); the scored children then all start from
    that same supernet state, so the order of scoring does not favour later ones;
  * from-scratch proxy of the same cost: --shared-steps steps from a random init;
  * the regular from-scratch proxy: --scratch-steps steps (default 5x the shared budget);
and prints Kendall's tau of each proxy against the ground truth plus the cost ratio (measured
seconds per evaluation of the regular from-scratch proxy / the weight-shared one).
Target: weight sharing >= 5x cheaper per evaluation at a tau no worse than the regular proxy's
(and above 0: a ranking that does not agree with the truth at all meets nothing).

Score = -held-out MLM loss on wiki-sample by default (--task rt-polarity fine-tunes as well;
at these sizes rt-polarity accuracy is mostly noise, so the MLM loss is the default signal).

    python benchmarks/bench_search_biws.py [--seeds 0 1 2] [--json benchmarks/results/search_biws_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

FORMULAS = {
    "std": "softmax(Q @ K^T / sqrt(d)) @ V",
    "azl2": "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "azl12": "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
    "cos": "softsign(cos(Q, K)) @ V",
    "dist": "softmax(-dist(Q, K)) @ (V + P)",
    "qq": "softmax(Q @ K^T / sqrt(d)) @ Q",
    "lin": "Q @ (K^T @ V) / n",
    "sig": "sigmoid(Q @ K^T / sqrt(d)) @ V / n",
}
ARCHS = [   # a layer is a FORMULAS key or a kernel size
    ("std", "std", "std"), (3, 3, 3), (65, 65, 65), ("azl2", 7, "azl12"), ("cos", "cos", "std"),
    ("dist", 15, "dist"), (9, "std", 31), ("qq", 5, "std"), ("lin", 3, "std"), ("azl12", "azl12", "azl12"),
]
KERNELS = (3, 5, 7, 9, 15, 31, 65)


def kendall_tau(a, b) -> float:
    """Kendall's tau-b of two equally long score lists (ties counted as in scipy's tau-b)."""
    n = len(a)
    conc = disc = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + ties_a) * (conc + disc + ties_b)) ** 0.5
    return (conc - disc) / denom if denom else 0.0


TRUTH_SETTINGS = ("hidden", "ffn", "heads", "truth_steps", "batch_size", "seq_len", "lr", "task",
                  "finetune_steps", "vocab", "threads")


def reused_truth(args, names) -> dict:
    """{seed: truth scores} of an earlier run; refuses one made with other settings or architectures."""
    with open(args.reuse_truth) as f:
        old = json.load(f)
    diff = [k for k in TRUTH_SETTINGS if old["settings"].get(k) != getattr(args, k)]
    if diff or old["architectures"] != names:
        raise SystemExit(f"--reuse-truth {args.reuse_truth}: made with other settings "
                         f"({', '.join(diff) or 'architectures'}); run without it")
    per_seed = old.get("per_seed") or [{"seed": old["settings"]["seed"], "scores": old["scores"]}]
    truth = {r["seed"]: r["scores"]["truth"] for r in per_seed}
    missing = [s for s in args.seeds if s not in truth]
    if missing:
        raise SystemExit(f"--reuse-truth {args.reuse_truth} has no truth for seed(s) {missing}")
    return truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--shared-steps", type=int, default=20)
    ap.add_argument("--scratch-steps", type=int, default=None, help="default: 5x --shared-steps")
    ap.add_argument("--truth-steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20, help="random-architecture evaluations warming the supernet")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="MLM peak learning rate (all runs)")
    ap.add_argument("--task", default=None, help="fine-tuning task (default: none, score = -MLM loss)")
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=2000,
                    help="train a WordPiece vocabulary of this size on the corpus (0: the default 30,522 vocab); "
                         "a small vocabulary keeps the MLM head from dominating the cost at these widths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="repeat everything (truth, supernet warm-up, proxies) per seed; tau is averaged "
                         "over seeds (10 architectures make one tau noisy), times are pooled")
    ap.add_argument("--reuse-truth", metavar="FILE",
                    help="take the ground-truth scores from an earlier result JSON with the same settings "
                         "and seeds (the truth runs are the slow part; they do not depend on the proxies)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    scratch_steps = args.scratch_steps or 5 * args.shared_steps

    import statistics

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator
    from attnc.search.space import Architecture, LayerChoice

    def arch_of(layers):
        return Architecture(layers=tuple(LayerChoice.conv(x) if isinstance(x, int)
                                         else LayerChoice.attention(FORMULAS[x]) for x in layers),
                            hidden_size=args.hidden, intermediate_size=args.ffn, num_heads=args.heads)

    tokenizer = None
    if args.vocab:
        from attnc.runtime.data import cache_dir, load_corpus, train_wordpiece

        tokenizer = cache_dir() / f"bench-biws-wordpiece-{args.vocab}"
        if not (tokenizer / "tokenizer.json").is_file():
            train_wordpiece(load_corpus("wiki-sample")["text"], args.vocab).save_pretrained(tokenizer)
        tokenizer = str(tokenizer)

    archs = [arch_of(a) for a in ARCHS]
    names = [" ".join(map(str, a)) for a in ARCHS]
    old_truth = reused_truth(args, names) if args.reuse_truth else None

    def run_seed(seed: int) -> dict:
        def cfg(**kw):
            return ProxyConfig(task=args.task, tokenizer=tokenizer, lr=args.lr, batch_size=args.batch_size,
                               seq_len=args.seq_len, finetune_max_len=args.seq_len,
                               finetune_steps=args.finetune_steps, seed=seed, **kw)

        ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=1)).runner()(archs[0], None, 0)   # fill the data caches
        if old_truth is not None:
            truth, truth_s = old_truth[seed], []
            print(f"seed {seed}: ground truth ({args.truth_steps} MLM steps from scratch) reused from "
                  f"{args.reuse_truth}", flush=True)
        else:
            print(f"seed {seed}: ground truth, {args.truth_steps} MLM steps from scratch", flush=True)
            ev = ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=args.truth_steps)).runner()
            truth, truth_s = [], []
            for name, arch in zip(names, archs):
                r = ev(arch, None, seed)
                truth.append(r.score)
                truth_s.append(r.seconds)
                print(f"  truth {name:<22} score {r.score:+.4f}  {r.seconds:.2f}s", flush=True)

        print(f"seed {seed}: BIWS proxy, {args.warmup} warm-up evaluations, then {args.shared_steps} steps "
              f"per child", flush=True)
        ws = ProxyEvaluator(cfg(weight_sharing=True, shared_pretrain_steps=args.shared_steps))
        run = ws.runner()
        rng = random.Random(seed)
        pool = list(FORMULAS) + list(KERNELS)
        warm_s = []
        for i in range(args.warmup):
            a = arch_of(tuple(rng.choice(pool) for _ in range(3)))
            t0 = time.perf_counter()
            r = run(a, ws.prepare(a), seed + 1000 + i)
            ws.commit(a, r)
            warm_s.append(time.perf_counter() - t0)
        # every scored child starts from the same warmed-up supernet: its write-back is timed (it is
        # part of a weight-shared evaluation's cost) and then undone, untimed, before the next child;
        # with write-backs kept the later children would inherit more training and the order would be measured
        warmed = {k: v.clone() for k, v in ws.supernet.state_dict().items()}
        scratch_ev = ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=scratch_steps)).runner()
        same_ev = ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=args.shared_steps)).runner()
        scratch, scratch_s, same, same_s, shared, shared_s = [], [], [], [], [], []
        parts = {"prepare": [], "train_and_score": [], "write_back": []}
        print(f"seed {seed}: interleaved per architecture: from-scratch proxy ({scratch_steps} steps), from "
              f"scratch at the weight-shared cost ({args.shared_steps} steps), BIWS child "
              f"({args.shared_steps} steps)", flush=True)
        for name, arch in zip(names, archs):
            # side by side, so that a busy machine slows all three alike
            r = scratch_ev(arch, None, seed)
            scratch.append(r.score)
            scratch_s.append(r.seconds)
            r = same_ev(arch, None, seed)
            same.append(r.score)
            same_s.append(r.seconds)
            t0 = time.perf_counter()
            payload = ws.prepare(arch)
            t1 = time.perf_counter()
            r = run(arch, payload, seed)
            t2 = time.perf_counter()
            ws.commit(arch, r)
            t3 = time.perf_counter()
            ws.supernet.load_state_dict(warmed)
            shared.append(r.score)
            shared_s.append(t3 - t0)
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
            print(f"  {name:<22} scratch {scratch[-1]:+.4f} {scratch_s[-1]:.2f}s | same-cost {same[-1]:+.4f} "
                  f"{same_s[-1]:.2f}s | biws {shared[-1]:+.4f} {shared_s[-1]:.2f}s", flush=True)
        tau = {"biws": kendall_tau(shared, truth), "scratch": kendall_tau(scratch, truth),
               "scratch_same_cost": kendall_tau(same, truth)}
        print(f"seed {seed}: Kendall tau BIWS {tau['biws']:+.3f}, scratch {tau['scratch']:+.3f}, "
              f"scratch same cost {tau['scratch_same_cost']:+.3f}", flush=True)
        return {"seed": seed,
                "scores": {"truth": truth, "biws": shared, "scratch": scratch, "scratch_same_cost": same},
                "kendall_tau": tau,
                "seconds_each": {"truth": truth_s, "biws": shared_s, "biws_warmup": warm_s,
                                 "scratch": scratch_s, "scratch_same_cost": same_s},
                "biws_seconds_parts": parts}

    t_all = time.time()
    per_seed = [run_seed(seed) for seed in args.seeds]

    def pooled(key):
        return [x for r in per_seed for x in r["seconds_each"][key]]

    med = statistics.median   # the median per-evaluation time: robust to a busy shared machine
    seconds = {k: (med(pooled(k)) if pooled(k) else None)
               for k in ("truth", "biws", "biws_warmup", "scratch", "scratch_same_cost")}
    tau = {k: statistics.mean(r["kendall_tau"][k] for r in per_seed)
           for k in ("biws", "scratch", "scratch_same_cost")}
    # why the cost ratio stays below the step ratio: a from-scratch evaluation costs fixed + steps * s
    # (model build, trainer set-up, the held-out evaluation; s = one training step), solved from the
    # two from-scratch proxies measured side by side; a weight-shared child pays the same fixed part
    per_step = (seconds["scratch"] - seconds["scratch_same_cost"]) / (scratch_steps - args.shared_steps)
    fixed = seconds["scratch_same_cost"] - args.shared_steps * per_step
    out = {
        "command": "python benchmarks/bench_search_biws.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"scratch_steps": scratch_steps},
        "torch_threads": torch.get_num_threads(),
        "architectures": names,
        "kendall_tau_mean": tau,
        "kendall_tau_per_seed": {k: [r["kendall_tau"][k] for r in per_seed] for k in tau},
        "seconds_per_eval_median": seconds,
        "biws_seconds_median_parts": {k: med([x for r in per_seed for x in r["biws_seconds_parts"][k]])
                                      for k in ("prepare", "train_and_score", "write_back")},
        "scratch_cost_model": {"fixed_seconds": fixed, "seconds_per_step": per_step},
        "truth_from": args.reuse_truth,
        "steps_per_eval": {"truth": args.truth_steps, "biws": args.shared_steps, "scratch": scratch_steps,
                           "scratch_same_cost": args.shared_steps},
        "per_seed": per_seed,
    }
    out["cost_ratio_scratch_over_biws"] = seconds["scratch"] / seconds["biws"]
    out["step_ratio_scratch_over_biws"] = scratch_steps / args.shared_steps
    # the ratio a weight-shared child with no overhead of its own at all (prepare, write-back) would reach
    out["cost_ratio_bound_at_these_steps"] = seconds["scratch"] / (fixed + args.shared_steps * per_step)
    # "a tau no worse" only means something when the weight-shared ranking agrees with the truth at
    # all: a BIWS tau <= 0 does not meet the target even when the from-scratch tau is lower still
    out["target_met"] = bool(out["cost_ratio_scratch_over_biws"] >= 5 and tau["biws"] >= tau["scratch"]
                             and tau["biws"] > 0)
    out["total_seconds"] = time.time() - t_all
    print(f"Kendall tau vs {args.truth_steps}-step training, mean of {len(args.seeds)} seed(s): "
          f"BIWS {tau['biws']:+.3f}, scratch ({scratch_steps} steps) {tau['scratch']:+.3f}, "
          f"scratch same cost ({args.shared_steps} steps) {tau['scratch_same_cost']:+.3f}")
    print(f"median seconds per evaluation: BIWS {seconds['biws']:.3f}, scratch {seconds['scratch']:.3f} -> "
          f"ratio {out['cost_ratio_scratch_over_biws']:.2f}x (step ratio {out['step_ratio_scratch_over_biws']:.2f}; "
          f"fixed cost per evaluation {fixed:.3f}s = {fixed / per_step:.1f} steps caps it at "
          f"{out['cost_ratio_bound_at_these_steps']:.2f}x); "
          f"target (>= 5x at a tau no worse, and positive) {'met' if out['target_met'] else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
