"""BIWS fidelity and cost: does the weight-shared proxy rank architectures like longer training?

For a fixed set of 12 architectures (3 layers, tiny widths) chosen to differ genuinely in quality
-- conv kernels from small to large, standard attention, AutoBERT-Zero's formulas, hybrids, and
formulas a search does generate that are poor: a context-free layer (Q + V: no token sees another)
and unnormalised linear attention -- this measures
  * ground truth: stand-alone training from scratch for --truth-steps MLM steps, once per truth
    seed (default 2; the truth score is their mean), on a larger held-out set (--truth-eval-blocks);
    the Kendall tau between the truth seeds is a ceiling for any proxy, and the truth's spread
    across architectures is reported next to its seed-to-seed noise;
  * per search seed (default 3):
    - BIWS proxy: children of a supernet that was first warmed up by --warmup evaluations of random
      architectures of the same space (the training a search has done before a typical child; each
      --shared-steps steps, written back, as in a search); the scored children then all start from
      that same supernet state, so the order of scoring does not favour later ones;
    - the regular from-scratch proxy: --scratch-steps steps from a random init;
    - the from-scratch proxy at the weight-shared cost: --shared-steps steps from a random init;
    each candidate gets its own seed (as in a search); the three proxies of a candidate share it;
and reports Kendall's tau of each proxy against the truth (mean and per seed) and the medians of
the measured seconds per evaluation, with the cost ratio regular-scratch / BIWS.
Target (issue 9): weight sharing >= 5x cheaper per evaluation than the regular from-scratch proxy
at a tau no worse (and above 0: a ranking that does not agree with the truth meets nothing).

Score = -held-out MLM loss on wiki-sample (--task rt-polarity fine-tunes as well; at these sizes
rt-polarity accuracy is mostly noise, so the MLM loss is the default signal). One torch thread by
default: on a shared 2-core machine two threads of one process slow down several-fold as soon as
another process runs; the truth runs use --jobs processes side by side (their time is not compared),
the proxies run in this process, interleaved per architecture, so that a busy machine slows all
three alike. Times are medians.

    python benchmarks/bench_search_biws.py --json benchmarks/results/search_biws_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context

FORMULAS = {
    "std": "softmax(Q @ K^T / sqrt(d)) @ V",
    "azl2": "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",      # AutoBERT-Zero (the paper's)
    "azl12": "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",         # AutoBERT-Zero (the paper's)
    "dist": "softmax(-dist(Q, K)) @ (V + P)",
    "lin": "Q @ (K^T @ V) / n",                  # linear attention, no normalisation
    "sig": "sigmoid(Q @ K^T / sqrt(d)) @ V / n",  # no softmax: nearly uniform mixing at init
    "qv": "Q + V",                               # context-free: no token sees another
    "gate": "V * sigmoid(Q)",                    # context-free, gated
    "cos": "softsign(cos(Q, K)) @ V",
    "qq": "softmax(Q @ K^T / sqrt(d)) @ Q",
}
ARCHS = [   # a layer is a FORMULAS key or a kernel size
    ("std", "std", "std"), (3, 3, 3), (15, 15, 15), (31, 31, 31), (65, 65, 65), ("azl2", 7, "azl12"),
    ("std", 5, "std"), ("dist", 15, "dist"), (9, "std", 31), ("qv", "std", "qv"), ("lin", "lin", "lin"),
    ("qv", "qv", "qv"),
]
KERNELS = (3, 5, 7, 9, 15, 31, 65)


def kendall_tau(a, b) -> float:
    """Kendall's tau-b of two equally long score lists (ties counted as in scipy's tau-b; 0 when one
    list is constant)."""
    from attnc.search.ranking import kendall_tau as tau_b
    t = tau_b(a, b)
    return 0.0 if math.isnan(t) else t


TRUTH_SETTINGS = ("hidden", "ffn", "heads", "truth_steps", "truth_seeds", "truth_eval_blocks", "batch_size",
                  "seq_len", "lr", "task", "finetune_steps", "vocab")


def _setup(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _tokenizer_path(vocab: int) -> str | None:
    if not vocab:
        return None
    from attnc.runtime.data import cache_dir, load_corpus, train_wordpiece

    path = cache_dir() / f"bench-biws-wordpiece-{vocab}"
    if not (path / "tokenizer.json").is_file():
        train_wordpiece(load_corpus("wiki-sample")["text"], vocab).save_pretrained(path)
    return str(path)


def _arch(args, layers):
    from attnc.search.space import Architecture, LayerChoice

    return Architecture(layers=tuple(LayerChoice.conv(x) if isinstance(x, int)
                                     else LayerChoice.attention(FORMULAS[x]) for x in layers),
                        hidden_size=args.hidden, intermediate_size=args.ffn, num_heads=args.heads)


def _cfg(args, tokenizer, seed, **kw):
    from attnc.search.proxy import ProxyConfig

    return ProxyConfig(task=args.task, tokenizer=tokenizer, lr=args.lr, batch_size=args.batch_size,
                       seq_len=args.seq_len, finetune_max_len=args.seq_len, finetune_steps=args.finetune_steps,
                       seed=seed, **kw)


def _truth_job(args, tokenizer, layers, truth_seed) -> tuple[float, float]:
    """One stand-alone training (in a worker process): (score, seconds). The held-out blocks are
    the same for every truth run (config seed 0); the truth seed seeds init, order, masks, dropout."""
    _setup(args)
    from attnc.search.proxy import ProxyEvaluator

    ev = ProxyEvaluator(_cfg(args, tokenizer, 0, weight_sharing=False, pretrain_steps=args.truth_steps,
                             eval_blocks=args.truth_eval_blocks)).runner()
    r = ev(_arch(args, layers), None, truth_seed)
    return r.score, r.seconds


def run_truth(args, tokenizer, names) -> dict:
    jobs = [(layers, s) for s in args.truth_seeds for layers in ARCHS]
    print(f"ground truth: {len(jobs)} stand-alone trainings of {args.truth_steps} MLM steps "
          f"({len(args.truth_seeds)} seeds), {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futs = [pool.submit(_truth_job, args, tokenizer, layers, s) for layers, s in jobs]
        out = {s: {"scores": [None] * len(ARCHS), "seconds": [None] * len(ARCHS)} for s in args.truth_seeds}
        for (layers, s), f in zip(jobs, futs):
            score, sec = f.result()
            i = ARCHS.index(layers)
            out[s]["scores"][i], out[s]["seconds"][i] = score, sec
            print(f"  truth seed {s} {names[i]:<18} score {score:+.4f}  {sec:.1f}s", flush=True)
    return out


def reused_truth(args, names) -> dict:
    """The truth of an earlier result JSON; refuses one made with other settings or architectures."""
    with open(args.reuse_truth) as f:
        old = json.load(f)
    diff = [k for k in TRUTH_SETTINGS if old["settings"].get(k) != getattr(args, k)]
    if diff or old["architectures"] != names:
        raise SystemExit(f"--reuse-truth {args.reuse_truth}: made with other settings "
                         f"({', '.join(diff) or 'architectures'}); run without it")
    return {int(s): v for s, v in old["truth"]["per_seed"].items()}


def truth_summary(truth: dict) -> dict:
    seeds = sorted(truth)
    per = [truth[s]["scores"] for s in seeds]
    mean = [statistics.mean(x) for x in zip(*per)]
    out = {"seeds": seeds, "mean_scores": mean, "per_seed": {str(s): truth[s] for s in seeds},
           "spread_std_across_archs": statistics.pstdev(mean)}
    if len(seeds) >= 2:
        # seed-to-seed noise of one truth run: the per-architecture std over seeds, pooled (RMS)
        noise = (statistics.mean(statistics.variance(x) for x in zip(*per))) ** 0.5
        out["seed_noise_std"] = noise
        out["spread_over_noise"] = out["spread_std_across_archs"] / noise if noise else None
        taus = [kendall_tau(per[i], per[j]) for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
        out["kendall_tau_between_seeds"] = statistics.mean(taus)
    return out


def run_seed(args, tokenizer, names, seed, truth_mean) -> dict:
    import torch
    from attnc.search.proxy import ProxyEvaluator

    archs = [_arch(args, a) for a in ARCHS]

    def cfg(**kw):
        return _cfg(args, tokenizer, seed, **kw)

    ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=1)).runner()(archs[0], None, 0)   # fill the caches
    print(f"seed {seed}: BIWS supernet warm-up, {args.warmup} evaluations of random architectures, "
          f"{args.shared_steps} steps each", flush=True)
    ws = ProxyEvaluator(cfg(weight_sharing=True, shared_pretrain_steps=args.shared_steps))
    run = ws.runner()
    rng = random.Random(seed)
    pool = list(FORMULAS) + list(KERNELS)
    warm_s = []
    for i in range(args.warmup):
        a = _arch(args, tuple(rng.choice(pool) for _ in range(3)))
        t0 = time.perf_counter()
        r = run(a, ws.prepare(a), seed * 1_000_003 + 500_000 + i)
        ws.commit(a, r)
        warm_s.append(time.perf_counter() - t0)
    # every scored child starts from the same warmed-up supernet: its write-back is timed (it is
    # part of a weight-shared evaluation's cost) and then undone, untimed, before the next child;
    # with write-backs kept the later children would inherit more training and the order would be measured
    warmed = {k: v.clone() for k, v in ws.supernet.state_dict().items()}
    scratch_ev = ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=args.scratch_steps)).runner()
    same_ev = ProxyEvaluator(cfg(weight_sharing=False, pretrain_steps=args.shared_steps)).runner()
    scores = {"biws": [], "scratch": [], "scratch_same_cost": []}
    secs = {"biws": [], "scratch": [], "scratch_same_cost": [], "biws_warmup": warm_s}
    parts = {"prepare": [], "train_and_score": [], "write_back": []}
    print(f"seed {seed}: per architecture, interleaved: from-scratch proxy ({args.scratch_steps} steps), "
          f"from scratch at the weight-shared cost ({args.shared_steps} steps), BIWS child "
          f"({args.shared_steps} steps)", flush=True)
    for i, (name, arch) in enumerate(zip(names, archs)):
        cand_seed = seed * 1_000_003 + i   # each candidate its own seed, as in a search
        r = scratch_ev(arch, None, cand_seed)
        scores["scratch"].append(r.score)
        secs["scratch"].append(r.seconds)
        r = same_ev(arch, None, cand_seed)
        scores["scratch_same_cost"].append(r.score)
        secs["scratch_same_cost"].append(r.seconds)
        t0 = time.perf_counter()
        payload = ws.prepare(arch)
        t1 = time.perf_counter()
        r = run(arch, payload, cand_seed)
        t2 = time.perf_counter()
        ws.commit(arch, r)
        t3 = time.perf_counter()
        with torch.no_grad():
            ws.supernet.load_state_dict(warmed)
        scores["biws"].append(r.score)
        secs["biws"].append(t3 - t0)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[k].append(v)
        print(f"  {name:<18} truth {truth_mean[i]:+.4f} | scratch {scores['scratch'][-1]:+.4f} "
              f"{secs['scratch'][-1]:.3f}s | same-cost {scores['scratch_same_cost'][-1]:+.4f} "
              f"{secs['scratch_same_cost'][-1]:.3f}s | biws {scores['biws'][-1]:+.4f} {secs['biws'][-1]:.3f}s",
              flush=True)
    tau = {k: kendall_tau(v, truth_mean) for k, v in scores.items()}
    print(f"seed {seed}: Kendall tau vs truth: BIWS {tau['biws']:+.3f}, scratch {tau['scratch']:+.3f}, "
          f"scratch same cost {tau['scratch_same_cost']:+.3f}", flush=True)
    return {"seed": seed, "scores": scores, "kendall_tau": tau, "seconds_each": secs, "biws_seconds_parts": parts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--shared-steps", type=int, default=16, help="MLM steps of a weight-shared child")
    ap.add_argument("--scratch-steps", type=int, default=100, help="MLM steps of the regular from-scratch proxy")
    ap.add_argument("--truth-steps", type=int, default=2000)
    ap.add_argument("--truth-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--truth-eval-blocks", type=int, default=512, help="held-out blocks of the truth runs")
    ap.add_argument("--warmup", type=int, default=100, help="random-architecture evaluations warming the supernet")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="MLM peak learning rate (all runs)")
    ap.add_argument("--task", default=None, help="fine-tuning task (default: none, score = -MLM loss)")
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=2000,
                    help="train a WordPiece vocabulary of this size on the corpus (0: the default 30,522 vocab); "
                         "a small vocabulary keeps the MLM head from dominating the cost at these widths")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the truth runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="search seeds: supernet init and warm-up, proxies, the proxies' held-out blocks")
    ap.add_argument("--reuse-truth", metavar="FILE",
                    help="take the ground truth from an earlier result JSON with the same settings (the truth "
                         "runs are the slow part; they do not depend on the proxies)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    t_all = time.time()
    _setup(args)
    import torch

    tokenizer = _tokenizer_path(args.vocab)
    names = [" ".join(map(str, a)) for a in ARCHS]
    t_truth = time.time()
    truth = reused_truth(args, names) if args.reuse_truth else run_truth(args, tokenizer, names)
    t_truth = time.time() - t_truth
    ts = truth_summary(truth)
    if "seed_noise_std" in ts:
        print(f"truth: spread across architectures (std) {ts['spread_std_across_archs']:.4f} nats, seed-to-seed "
              f"noise (std) {ts['seed_noise_std']:.4f} -> ratio {ts['spread_over_noise']:.1f}; Kendall tau "
              f"between truth seeds {ts['kendall_tau_between_seeds']:+.3f} (a ceiling for any proxy)", flush=True)
    per_seed = [run_seed(args, tokenizer, names, s, ts["mean_scores"]) for s in args.seeds]

    def pooled(key):
        return [x for r in per_seed for x in r["seconds_each"][key]]

    med = statistics.median   # per-evaluation medians: robust to a busy shared machine
    seconds = {k: med(pooled(k)) for k in ("biws", "biws_warmup", "scratch", "scratch_same_cost")}
    seconds["truth"] = med([x for s in truth.values() for x in s["seconds"]]) if not args.reuse_truth else None
    methods = ("biws", "scratch", "scratch_same_cost")
    tau_per_seed = {k: [r["kendall_tau"][k] for r in per_seed] for k in methods}
    tau = {k: statistics.mean(v) for k, v in tau_per_seed.items()}
    # a from-scratch evaluation costs fixed + steps * s (model build, trainer set-up, held-out
    # evaluation; s = one training step), solved from the two from-scratch proxies measured side by side
    per_step = (seconds["scratch"] - seconds["scratch_same_cost"]) / (args.scratch_steps - args.shared_steps)
    fixed = seconds["scratch_same_cost"] - args.shared_steps * per_step
    ratio = seconds["scratch"] / seconds["biws"]
    out = {
        "command": "python benchmarks/bench_search_biws.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "torch_threads": torch.get_num_threads(),
        "architectures": names,
        "formulas": FORMULAS,
        "steps_per_eval": {"truth": args.truth_steps, "biws": args.shared_steps, "scratch": args.scratch_steps,
                           "scratch_same_cost": args.shared_steps,
                           "biws_warmup_before_scoring": args.warmup * args.shared_steps},
        "truth": ts,
        "kendall_tau_mean": tau,
        "kendall_tau_per_seed": tau_per_seed,
        "seconds_per_eval_median": seconds,
        "biws_seconds_median_parts": {k: med([x for r in per_seed for x in r["biws_seconds_parts"][k]])
                                      for k in ("prepare", "train_and_score", "write_back")},
        "scratch_cost_model": {"fixed_seconds": fixed, "seconds_per_step": per_step},
        "cost_ratio_scratch_over_biws": ratio,
        "cost_ratio_same_cost_scratch_over_biws": seconds["scratch_same_cost"] / seconds["biws"],
        "step_ratio_scratch_over_biws": args.scratch_steps / args.shared_steps,
        "truth_from": args.reuse_truth,
        "per_seed": per_seed,
    }
    # "a tau no worse" only means something when the weight-shared ranking agrees with the truth at
    # all: a BIWS tau <= 0 does not meet the target even when the from-scratch tau is lower still
    out["target_met"] = bool(ratio >= 5 and tau["biws"] >= tau["scratch"] and tau["biws"] > 0)
    out["seconds_truth_phase"] = t_truth
    out["total_seconds"] = time.time() - t_all
    print(f"Kendall tau vs {args.truth_steps}-step training (mean of {len(args.truth_seeds)} truth seeds), "
          f"mean [per seed] over {len(args.seeds)} search seeds:")
    for k, label in (("biws", f"BIWS ({args.shared_steps} steps)"), ("scratch", f"scratch ({args.scratch_steps} steps)"),
                     ("scratch_same_cost", f"scratch same cost ({args.shared_steps} steps)")):
        print(f"  {label:<32} {tau[k]:+.3f}  [{', '.join(f'{x:+.3f}' for x in tau_per_seed[k])}]  "
              f"median {seconds[k]:.3f} s/eval")
    print(f"cost ratio scratch / BIWS {ratio:.2f}x (step ratio {args.scratch_steps / args.shared_steps:.2f}; fixed cost "
          f"per evaluation {fixed * 1000:.1f} ms = {fixed / per_step:.1f} steps of {per_step * 1000:.1f} ms); target "
          f"(>= 5x at a tau no worse, and positive) {'met' if out['target_met'] else 'NOT met'}; "
          f"{out['total_seconds'] / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
