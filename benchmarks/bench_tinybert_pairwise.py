"""AutoTinyBERT Appendix E at CPU scale, as a benchmark that could fail (issue 20): does a SuperPLM
sub-model's held-out MLM loss rank architectures like stand-alone training does, and better than
ranking by size or shape alone?

  1. Two sets of architectures of one mlm-mode space (default max 4-128-512-4-128, head dim 32,
     a 4000-word WordPiece vocabulary, sequences of 64 tokens):
     - "miniatures": the 16 BERT miniatures' shapes (Turc et al.: L in {2,4,6,8} x H in {128,256,512,
       768}, FFN 4H, H/64 heads) scaled down to L in {1,2,3,4} x H in {32,64,96,128}, FFN 4H, H/32
       heads of 32 dims (qkv = H): the paper's own Appendix E set;
     - "band": --band-archs architectures of about the same size (parameters within +-10% of the
       median of 4000 random samples), spread by FLOPs: here size cannot rank, shape must;
     - with --band-hidden H, a band of the same kind among archs of hidden size H: neither size nor
       hidden size can rank, only how the budget is spent (depth, FFN, heads, qkv).
  2. One SuperPLM trained batch-wise (Algorithm 1, N=--sub-batches) for --steps steps; every
     architecture scored by its held-out MLM loss read through it (no further training).
  3. The truth: every architecture trained stand-alone from scratch for --standalone-steps steps,
     once per seed (--truth-seeds: init, data order, masks and dropout; the held-out split is the
     same for all runs and for the SuperPLM); the truth is the mean held-out loss over the seeds.
     Its self-agreement (pairwise accuracy between two seeds' losses) is the ceiling of any proxy.
  4. Statistics (attnc.search.ranking): pairwise accuracy and Kendall tau-b against the
     truth with 90% bootstrap intervals over architectures; the trivial rules "larger X wins" and
     "smaller X wins" for X in hidden size, parameters, FLOPs and depth; the best of them (picked
     after the fact: a generous baseline), and the SuperPLM's paired difference to it with its 90%
     interval. Target: on the band the SuperPLM beats the best trivial rule with the whole interval
     above 0. Chance: a random ranking's 90% range is printed too.

Every measured loss is kept in --cache (JSON) as soon as it exists, so a killed run resumes.

    python benchmarks/bench_tinybert_pairwise.py --cache runs/pairwise_cache.json \
        --json benchmarks/results/tinybert_pairwise_cpu.json

The parts can run in parallel processes, each into its own cache, then be merged (how the committed
results were made, on the shared 2-core machine):

    A="--steps 1500 --standalone-steps 500 --truth-seeds 2 --band-archs 12 --seq-len 32"
    python benchmarks/bench_tinybert_pairwise.py $A --train-seeds "" --cache runs/pw/sp.json &
    python benchmarks/bench_tinybert_pairwise.py $A --skip-superplm --train-seeds 0 --cache runs/pw/s0.json &
    python benchmarks/bench_tinybert_pairwise.py $A --skip-superplm --train-seeds 1 --cache runs/pw/s1.json &
    wait
    python benchmarks/bench_tinybert_pairwise.py $A --cache runs/pw/sp.json --merge runs/pw/s0.json \
        --merge runs/pw/s1.json --json benchmarks/results/tinybert_pairwise_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path


def miniatures(space):
    """The 16 BERT miniatures' shapes scaled to the space: L in 1..4 quarters of max_layers, H in
    quarters of max_hidden, FFN 4H, heads H / head_dim (qkv = H)."""
    from attnc.search.tinybert.space import Arch

    out = []
    for q in range(1, 5):
        L = max(1, space.max_layers * q // 4)
        for r in range(1, 5):
            H = space.max_hidden * r // 4
            out.append(space.validate(Arch(L, H, min(4 * H, space.max_ffn), H // space.head_dim, H)))
    return out


def pick_band(space, k: int, seed: int, band: float = 0.1, hidden: int | None = None):
    """k distinct archs of about the same size: among 4000 random samples (with `hidden`: those of that
    hidden size), those whose parameter count is within +-band of the samples' median, spread by FLOPs
    (evenly spaced quantiles)."""
    rng = random.Random(seed)
    pool = list({space.sample(rng) for _ in range(4000)})
    if hidden is not None:
        pool = [a for a in pool if a.hidden == hidden]
        if not pool:
            raise SystemExit(f"no sampled arch has hidden size {hidden}; pick one of the space's grid")
    mid = statistics.median(space.params(a) for a in pool)
    near = sorted((a for a in pool if abs(space.params(a) / mid - 1) <= band), key=lambda a: (space.flops(a), str(a)))
    if len(near) < k:
        raise SystemExit(f"only {len(near)} archs within {band:.0%} of the median size; widen the band")
    return [near[round(q * (len(near) - 1) / (k - 1))] for q in range(k)]


class Cache:
    """Measured losses by key, written to a JSON file at once (a killed run resumes)."""

    def __init__(self, path: str | None, settings: dict):
        self.path = Path(path) if path else None
        self.data = {"settings": settings, "losses": {}}
        if self.path and self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                raise SystemExit(f"{self.path} holds losses of other settings; use another --cache")
            self.data = old

    def get(self, key):
        return self.data["losses"].get(key)

    def put(self, key, value) -> None:
        self.data["losses"][key] = value
        if self.path:
            from attnc.search.tinybert.latency import write_json_atomic
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)


def analyse(space, archs, superplm, per_seed, seq_len: int, reps: int) -> dict:
    """The statistics of one set (see the module doc)."""
    from attnc.search import ranking as R

    truth = [statistics.fmean(col) for col in zip(*per_seed)]
    features = {"hidden size": [a.hidden for a in archs], "parameters": [space.params(a) for a in archs],
                "FLOPs": [space.flops(a, seq_len) for a in archs], "depth": [a.layers for a in archs]}
    rules = R.trivial_rules(features)
    out = {"archs": [str(a) for a in archs], "truth": truth, "truth_per_seed": per_seed,
           "superplm_scores": superplm, **{f"feature_{k}": v for k, v in features.items()},
           "truth_self_agreement": R.self_agreement(per_seed, reps=reps),
           "superplm": R.summarise(superplm, truth, reps=reps),
           "superplm_vs_each_seed": [R.pairwise_accuracy(superplm, s) for s in per_seed],
           "trivial_rules": {name: R.summarise(s, truth, reps=reps) for name, s in rules.items()},
           "random_ranking_90pct_range": R.random_ranking_range(len(archs), reps=reps)}
    best = max(out["trivial_rules"], key=lambda k: out["trivial_rules"][k]["pairwise_accuracy"])
    d = R.paired_difference(superplm, rules[best], truth, reps=reps)
    out["best_trivial_rule"] = best
    out["superplm_minus_best_rule"] = d
    out["superplm_beats_best_rule"] = d["ci"][0] > 0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-layers", type=int, default=4)
    ap.add_argument("--max-hidden", type=int, default=128)
    ap.add_argument("--max-ffn", type=int, default=512)
    ap.add_argument("--max-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--band-archs", type=int, default=12)
    ap.add_argument("--band-hidden", type=int, default=None, metavar="H",
                    help="also a band of --band-archs archs of one hidden size H and about one size: how to spend "
                         "a budget (depth, FFN, heads, qkv) when neither size nor hidden size can rank")
    ap.add_argument("--steps", type=int, default=2000, help="batch-wise SuperPLM optimizer steps")
    ap.add_argument("--sub-batches", type=int, default=4, help="N of the batch-wise run")
    ap.add_argument("--standalone-steps", type=int, default=1000)
    ap.add_argument("--truth-seeds", type=int, default=3, help="stand-alone runs per arch (seeds seed..)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4000,
                    help="a WordPiece vocabulary of this size trained on wiki-sample (the demo's); 0: the "
                         "uncased 30,522 one (the embedding then dominates every tiny model's size)")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--cache", default=None, help="JSON file of the measured losses (resumable)")
    ap.add_argument("--train-seeds", default=None,
                    help="comma-separated truth seed indices (0..--truth-seeds - 1) this process trains; the "
                         "others must come from --merge (seeds trained in parallel, each into its own --cache)")
    ap.add_argument("--skip-superplm", action="store_true",
                    help="train no SuperPLM in this process (its scores come from --merge)")
    ap.add_argument("--reverse", action="store_true",
                    help="train the archs in reverse order (a second process on the same seed meets the first "
                         "half-way; merge both caches)")
    ap.add_argument("--partial", action="store_true",
                    help="analyse the archs whose losses are all measured, dropping (and listing) the others")
    ap.add_argument("--merge", action="append", default=[],
                    help="another --cache file of the same settings whose losses join this run's (repeatable)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--cpu-lock", default="/tmp/attnc-cpu.lock",
                    help="held shared while training, let go every 20 s for waiting timing windows ('' : none)")
    args = ap.parse_args(argv)
    if args.band_archs < 2:
        ap.error("--band-archs must be at least 2 (pairs are compared)")
    from cpu_lock import CpuLock
    lock = CpuLock(args.cpu_lock)
    lock.share()
    yielder = lock.yielder()

    import torch

    from attnc.runtime import data as D
    from attnc.runtime.modeling import AttncBertForMaskedLM
    from attnc.runtime.trainer import MLMData, TrainConfig, train
    from attnc.search.tinybert.space import Space
    from attnc.search.tinybert.supernet import SuperPLM
    from attnc.search.tinybert.train import SuperTrainConfig, heldout_mlm_loss, train_superplm

    torch.set_num_threads(args.threads)
    if args.vocab:
        from attnc.runtime.demo import demo_tokenizer
        tok = D.load_tokenizer(demo_tokenizer(args.vocab))
    else:
        tok = D.load_tokenizer()

    class FixedSplit(MLMData):
        """One held-out split for every run (the SuperPLM's and every truth seed's): the seeds vary
        the init, data order, masks and dropout, never the blocks a model is scored on."""

        def split(self, seed):
            if not hasattr(self, "eval_idx"):
                super().split(args.seed)

    data = FixedSplit(D.cached_blocks("wiki-sample", tok, args.seq_len), tok)
    space = Space(max_layers=args.max_layers, max_hidden=args.max_hidden, max_ffn=args.max_ffn,
                  max_heads=args.max_heads, head_dim=args.head_dim, vocab_size=len(tok),
                  max_position_embeddings=max(64, args.seq_len))
    sets = {"miniatures": miniatures(space), "band": pick_band(space, args.band_archs, args.seed)}
    if args.band_hidden is not None:
        sets[f"band at hidden {args.band_hidden}"] = pick_band(space, args.band_archs, args.seed,
                                                                hidden=args.band_hidden)
    every = list(dict.fromkeys(a for s in sets.values() for a in s))
    for name, s in sets.items():
        print(f"{name} ({len(s)}): {', '.join(map(str, s))}", flush=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("cache", "json", "reps", "threads", "truth_seeds", "cpu_lock", "train_seeds", "merge",
                              "skip_superplm", "partial", "reverse", "band_hidden")}   # losses are per arch
    cache = Cache(args.cache, settings)
    for other in args.merge:
        for key, value in Cache(other, settings).data["losses"].items():
            if cache.get(key) is None:
                cache.put(key, value)
    train_seeds = (range(args.truth_seeds) if args.train_seeds is None
                   else [int(k) for k in args.train_seeds.split(",") if k.strip()])
    seconds = {}

    # --- the SuperPLM ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if not args.skip_superplm and any(cache.get(f"superplm/{a}") is None for a in every):
        torch.manual_seed(args.seed)
        net = SuperPLM(space)
        m = train_superplm(net, data, SuperTrainConfig(steps=args.steps, batch_size=args.batch_size,
                                                       sub_batches=args.sub_batches, lr=args.lr, seed=args.seed,
                                                       device="cpu"), progress=True,
                           callbacks=[yielder])
        cache.put("superplm/final_eval", m["final_eval"]["loss"])
        for a in every:
            cache.put(f"superplm/{a}", heldout_mlm_loss(net, data, a, batch_size=32))
        seconds["superplm"] = round(time.perf_counter() - t0, 1)
        print(f"SuperPLM ({args.steps} steps, N={args.sub_batches}): scored {len(every)} archs", flush=True)

    # --- the truth: stand-alone training, seed by seed (the first seeds complete first) ----------------
    t0 = time.perf_counter()
    for k in train_seeds:
        seed = args.seed + k
        for a in (every[::-1] if args.reverse else every):
            key = f"standalone/{a}/{seed}"
            if cache.get(key) is not None:
                continue
            torch.manual_seed(seed)
            model = AttncBertForMaskedLM(space.config(a))
            t1 = time.perf_counter()
            r = train(model, data, TrainConfig(steps=args.standalone_steps, batch_size=args.batch_size, lr=args.lr,
                                               seed=seed, device="cpu", checkpoint_every_minutes=None),
                      callbacks=[yielder])
            cache.put(key, r.metrics["final_eval"]["loss"])
            print(f"stand-alone {a} (seed {seed}): held-out loss {cache.get(key):.4f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
    seconds["standalone_this_run"] = round(time.perf_counter() - t0, 1)

    missing = [key for key in [f"superplm/{a}" for a in every] + [f"standalone/{a}/{args.seed + k}"
                                                                  for k in range(args.truth_seeds) for a in every]
               if cache.get(key) is None]
    dropped = {}
    if missing and args.partial:
        for name in sets:
            keep = [a for a in sets[name] if all(cache.get(k) is not None for k in
                                                 [f"superplm/{a}"] + [f"standalone/{a}/{args.seed + j}"
                                                                      for j in range(args.truth_seeds)])]
            dropped[name] = [str(a) for a in sets[name] if a not in keep]
            sets[name] = keep
            print(f"--partial: {name} keeps {len(keep)} archs, drops {dropped[name]}", flush=True)
    elif missing:
        print(f"{len(missing)} losses still missing (e.g. {missing[0]}): run the SuperPLM and the other seeds, then "
              f"--merge their caches", flush=True)
        return 0
    results = {}
    for name, archs in sets.items():
        per_seed = [[cache.get(f"standalone/{a}/{args.seed + k}") for a in archs] for k in range(args.truth_seeds)]
        sp = [cache.get(f"superplm/{a}") for a in archs]
        r = results[name] = analyse(space, archs, sp, per_seed, args.seq_len, args.reps)
        s, sa = r["superplm"], r["truth_self_agreement"]
        print(f"\n== {name}: {len(archs)} archs, {s['pairs']} pairs ==")
        print(f"truth self-agreement (seed pairs): {sa['mean']:.1%} [{sa['ci'][0]:.1%}, {sa['ci'][1]:.1%}]  "
              + ", ".join(f"{p['seeds']}: {p['pairwise_accuracy']:.1%}" for p in sa["pairs"]))
        print(f"SuperPLM: pairwise {s['pairwise_accuracy']:.1%} [{s['pairwise_accuracy_ci'][0]:.1%}, "
              f"{s['pairwise_accuracy_ci'][1]:.1%}], tau {s['kendall_tau']:.3f} "
              f"[{s['kendall_tau_ci'][0]:.3f}, {s['kendall_tau_ci'][1]:.3f}]")
        for rule, t in sorted(r["trivial_rules"].items(), key=lambda kv: -kv[1]["pairwise_accuracy"]):
            print(f"  {rule:26s} pairwise {t['pairwise_accuracy']:.1%} [{t['pairwise_accuracy_ci'][0]:.1%}, "
                  f"{t['pairwise_accuracy_ci'][1]:.1%}], tau {t['kendall_tau']:.3f}")
        d = r["superplm_minus_best_rule"]
        print(f"SuperPLM - best rule ({r['best_trivial_rule']}): {d['difference']:+.1%} "
              f"[{d['ci'][0]:+.1%}, {d['ci'][1]:+.1%}] -> "
              f"{'beats it' if r['superplm_beats_best_rule'] else 'does not beat it outside the interval'}; "
              f"a random ranking: {r['random_ranking_90pct_range'][0]:.1%}..{r['random_ranking_90pct_range'][1]:.1%}")

    out = {
        "benchmark": "tinybert_pairwise (AutoTinyBERT Appendix E, issue 20)",
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:])),
        "args": vars(args), "space": space.to_json(), "vocab_size": len(tok),
        "superplm_final_eval_max_arch": cache.get("superplm/final_eval"), "sets": results,
        "archs_dropped_unmeasured": dropped,
        "target": "bands: SuperPLM pairwise accuracy above the best trivial rule, 90% interval of the difference above 0",
        "paper_pairwise": 0.967, "seconds_this_run": seconds,
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus, "
                                               f"{torch.get_num_threads()} threads",
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
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
