"""AutoTinyBERT Appendix E at tiny scale: do SuperPLM sub-model scores rank architectures like
stand-alone training does, with batch-wise training (N sub-models per batch) vs one per batch?

  1. Pick --archs architectures spread over a tiny mlm-mode space (sorted by parameter count,
     evenly spaced quantiles of a fixed random sample, plus the smallest and largest).
  2. Train two SuperPLMs from the same init on wiki-sample for the same number of sub-model passes
     and the same sequences: batch-wise (Algorithm 1, N=--sub-batches, --steps optimizer steps of
     --batch-size sequences) and one sub-model per batch (N=1, N x --steps steps of
     --batch-size / N sequences).
  3. Score every arch by its held-out MLM loss read through each SuperPLM (no further training).
  4. Train every arch stand-alone from scratch with the training core (same data, --standalone-steps
     steps of --batch-size), once per --truth-seeds seed (init and data order): the ground truth is
     the mean held-out loss; the seeds' agreement with each other (pairwise accuracy of one seed's
     ranking against another's) is the ceiling any proxy can reach on these archs.
  5. Print pairwise accuracy (the paper's metric: the share of arch pairs both rank in the same order)
     and Kendall's tau of each SuperPLM against the ground truth. Target: >= 90% (paper: 96.7%).

    python benchmarks/bench_tinybert_pairwise.py --json benchmarks/results/tinybert_pairwise_cpu.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import time


def pairwise_accuracy(a, b) -> float:
    """Share of pairs (i, j) that a and b order the same way (pairs tied in either are skipped)."""
    agree = total = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 or db == 0:
            continue
        total += 1
        agree += (da > 0) == (db > 0)
    return agree / total if total else float("nan")


def pick_archs(space, k: int, seed: int):
    """k distinct archs spread by parameter count: the smallest and largest of the space, and
    evenly spaced quantiles of 400 random samples."""
    from attnc.search.tinybert.space import Arch

    rng = random.Random(seed)
    pool = sorted({space.sample(rng) for _ in range(400)}, key=space.params)
    smallest = Arch(space.min_layers, space.min_hidden, space.min_ffn, 1, space.head_dim)
    chosen = [smallest, space.max_arch]
    for q in range(1, k - 1):
        a = pool[round(q * (len(pool) - 1) / (k - 1))]
        if a not in chosen:
            chosen.append(a)
    return sorted(chosen, key=space.params)


def pick_band(space, k: int, seed: int, band: float = 0.1):
    """k distinct archs of about the same size: among 4000 random samples, those whose parameter count
    is within +-band of the samples' median, spread by FLOPs (evenly spaced quantiles). Since the
    parameter count alone ranks archs of different sizes almost perfectly (the embedding, vocab x dm,
    dominates at tiny scale), this harder set asks the SuperPLM to rank shapes, not sizes."""
    import statistics

    rng = random.Random(seed)
    pool = list({space.sample(rng) for _ in range(4000)})
    mid = statistics.median(space.params(a) for a in pool)
    near = sorted((a for a in pool if abs(space.params(a) / mid - 1) <= band), key=lambda a: (space.flops(a), str(a)))
    if len(near) < k:
        raise SystemExit(f"only {len(near)} archs within {band:.0%} of the median size; widen --band")
    return [near[round(q * (len(near) - 1) / (k - 1))] for q in range(k)]


def baselines(space, archs, truth, seq_len: int) -> dict:
    """Pairwise accuracy / Kendall tau of size alone as the score (more parameters or FLOPs = lower
    loss): what a SuperPLM must beat to show it ranks more than size."""
    from scipy.stats import kendalltau

    out = {}
    for name, fn in (("parameters", space.params), ("flops", lambda a: space.flops(a, seq_len))):
        score = [-fn(a) for a in archs]      # a loss-like score: bigger models rank as lower loss
        out[name] = {"pairwise_accuracy": pairwise_accuracy(score, truth),
                     "kendall_tau": float(kendalltau(score, truth).statistic)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-layers", type=int, default=4)
    ap.add_argument("--max-hidden", type=int, default=128)
    ap.add_argument("--max-ffn", type=int, default=256)
    ap.add_argument("--max-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--archs", type=int, default=10)
    ap.add_argument("--pick", choices=("spread", "band"), default="spread",
                    help="spread: archs spread by size (the smallest and the largest included); band: archs "
                         "of about the same parameter count (+-10%%), spread by FLOPs")
    ap.add_argument("--steps", type=int, default=400, help="batch-wise SuperPLM optimizer steps")
    ap.add_argument("--sub-batches", type=int, default=4, help="N of the batch-wise run")
    ap.add_argument("--standalone-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truth-seeds", type=int, default=1, help="stand-alone runs per arch (seeds seed..)")
    ap.add_argument("--vocab", type=int, default=0,
                    help="a WordPiece vocabulary of this size trained on wiki-sample (the demo's); 0: the "
                         "uncased 30,522 one. A small vocabulary keeps the embedding from dominating size "
                         "and lets tiny models learn past unigram statistics in a few hundred steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from scipy.stats import kendalltau
    from attnc.runtime import data as D
    from attnc.runtime.modeling import AttncBertForMaskedLM
    from attnc.runtime.trainer import MLMData, TrainConfig, train
    from attnc.search.tinybert.space import Space
    from attnc.search.tinybert.supernet import SuperPLM
    from attnc.search.tinybert.train import SuperTrainConfig, heldout_mlm_loss, train_superplm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vocab:
        from attnc.runtime.demo import demo_tokenizer
        tok = D.load_tokenizer(demo_tokenizer(args.vocab))
    else:
        tok = D.load_tokenizer()
    data = MLMData(D.cached_blocks("wiki-sample", tok, args.seq_len), tok)
    space = Space(max_layers=args.max_layers, max_hidden=args.max_hidden, max_ffn=args.max_ffn,
                  max_heads=args.max_heads, head_dim=args.head_dim, vocab_size=len(tok),
                  max_position_embeddings=max(64, args.seq_len))
    archs = (pick_archs if args.pick == "spread" else pick_band)(space, args.archs, args.seed)
    print(f"space max {space.max_arch}, {len(archs)} archs: {', '.join(map(str, archs))}", flush=True)

    torch.manual_seed(args.seed)
    init = SuperPLM(space).state_dict()
    N = args.sub_batches
    runs = {"batchwise": SuperTrainConfig(steps=args.steps, batch_size=args.batch_size, sub_batches=N,
                                          lr=args.lr, seed=args.seed, device="cpu"),
            "one_per_batch": SuperTrainConfig(steps=N * args.steps, batch_size=args.batch_size // N,
                                              sub_batches=1, lr=args.lr, seed=args.seed, device="cpu")}
    scores, seconds, final = {}, {}, {}
    for name, cfg in runs.items():
        net = SuperPLM(space)
        net.load_state_dict(init)
        t0 = time.perf_counter()
        m = train_superplm(net, data, cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)
        scores[name] = [heldout_mlm_loss(net, data, a, batch_size=32) for a in archs]
        final[name] = m["final_eval"]["loss"]
        print(f"{name}: {cfg.steps} steps x {cfg.batch_size} seqs (N={cfg.sub_batches}) in {seconds[name]} s; "
              f"held-out losses {[round(x, 3) for x in scores[name]]}", flush=True)

    per_seed, t_truth = [], time.perf_counter()
    for k in range(args.truth_seeds):
        seed = args.seed + k
        losses = []
        for a in archs:
            torch.manual_seed(seed)
            model = AttncBertForMaskedLM(space.config(a))
            # the trainer splits the data with its seed: each truth seed scores every arch on its own
            # held-out blocks (the same for all archs of that seed)
            r = train(model, data, TrainConfig(steps=args.standalone_steps, batch_size=args.batch_size, lr=args.lr,
                                               seed=seed, device="cpu", checkpoint_every_minutes=None))
            losses.append(r.metrics["final_eval"]["loss"])
            print(f"stand-alone {a} (seed {seed}): held-out loss {losses[-1]:.3f}", flush=True)
        per_seed.append(losses)
    truth = [sum(col) / len(col) for col in zip(*per_seed)]
    agreement = [pairwise_accuracy(per_seed[i], per_seed[j])
                 for i, j in itertools.combinations(range(len(per_seed)), 2)]
    if agreement:
        print(f"truth self-agreement (pairwise accuracy between seeds): "
              f"{', '.join(f'{x:.1%}' for x in agreement)}", flush=True)
    seconds["standalone"] = round(time.perf_counter() - t_truth, 1)

    results = {}
    for name in runs:
        # all three are losses (lower is better), so orders compare directly
        tau = kendalltau(scores[name], truth).statistic
        results[name] = {"pairwise_accuracy": pairwise_accuracy(scores[name], truth), "kendall_tau": float(tau),
                         "scores": scores[name], "seconds": seconds[name]}
        print(f"{name:14s} pairwise accuracy {results[name]['pairwise_accuracy']:.1%}  Kendall tau {tau:.3f}")
    base = baselines(space, archs, truth, args.seq_len)
    for name, r in base.items():
        print(f"size baseline: {name:10s} pairwise accuracy {r['pairwise_accuracy']:.1%}  "
              f"Kendall tau {r['kendall_tau']:.3f}")
    out = {
        "benchmark": "tinybert_pairwise (AutoTinyBERT Appendix E)",
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:])),
        "args": vars(args), "space": space.to_json(), "archs": [str(a) for a in archs],
        "params": [space.params(a) for a in archs], "standalone_losses": truth,
        "standalone_losses_per_seed": per_seed, "truth_self_agreement": agreement,
        "vocab_size": len(tok), "results": results, "size_baselines": base,
        "seconds_standalone": seconds["standalone"], "target_pairwise": 0.9, "paper_pairwise": 0.967,
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor()} "
        f"{os.cpu_count()} cpus, {torch.get_num_threads()} threads", "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
