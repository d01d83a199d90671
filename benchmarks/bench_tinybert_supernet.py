"""Issue 10: the SuperPLM's overhead. A sub-model run through the SuperPLM (set_arch + a forward with
sliced weights) side by side with the same architecture extracted as a stand-alone
AttncBertForMaskedLM, on the CPU, interleaved rounds, median times.

    python benchmarks/bench_tinybert_supernet.py [--archs 6] [--runs 10] [--rounds 3] [--threads 1]
        [--batch 1] [--seq 128] [--json benchmarks/results/tinybert_supernet_cpu.json]

Per space (the README's demo space 4-256-1024-4-256 and the paper's SuperPLM 8-768-3072-12-768) and
per architecture (the max arch and random samples) it prints the forward time of both (inference,
no_grad), forward+backward of the MLM loss (training), and the ratio supernet / extracted; also the
cost of set_arch alone and of extract(). The ratio is the price of one-shot weight sharing per step.
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
from datetime import datetime, timezone

import torch

from attnc.search.tinybert import Space, SuperPLM

SPACES = {
    "demo": dict(max_layers=4, max_hidden=256, max_ffn=1024, max_heads=4, mode="mlm"),
    "paper": dict(max_layers=8, max_hidden=768, max_ffn=3072, max_heads=12, mode="mlm"),
    "paper-kd": dict(max_layers=8, max_hidden=768, max_ffn=3072, max_heads=12, mode="kd"),
}


def _time(fn, runs: int) -> float:
    t = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t) / runs * 1e3


def bench_space(name: str, space: Space, args) -> dict:
    torch.manual_seed(0)
    sup = SuperPLM(space, config_overrides=dict(hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0))
    rng = random.Random(args.seed)
    archs = [space.max_arch] + [space.sample(rng) for _ in range(args.archs - 1)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, space.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, ::7] = ids[:, ::7]                       # ~15% labelled positions, as MLM

    many = [space.sample(rng) for _ in range(5000)]
    t = time.perf_counter()
    for a in many:
        sup.set_arch(a)
    set_arch_us = (time.perf_counter() - t) / len(many) * 1e6

    rows = []
    for arch in archs:
        t = time.perf_counter()
        sub = sup.extract(arch)
        extract_ms = (time.perf_counter() - t) * 1e3

        def sup_fwd():
            sup.set_arch(arch)
            with torch.no_grad():
                sup(ids, attention_mask=mask)

        def sub_fwd():
            with torch.no_grad():
                sub(ids, attention_mask=mask)

        def sup_train():
            sup.set_arch(arch)
            sup.zero_grad(set_to_none=True)
            sup.mlm_loss(ids, mask, labels).backward()

        def sub_train():
            sub.zero_grad(set_to_none=True)
            sub.mlm_loss(ids, mask, labels).backward()

        times = {k: [] for k in ("sup_fwd", "sub_fwd", "sup_train", "sub_train")}
        fns = {"sup_fwd": sup_fwd, "sub_fwd": sub_fwd, "sup_train": sup_train, "sub_train": sub_train}
        sup.eval()
        sub.eval()
        for fn in fns.values():   # warm-up
            fn()
        for _ in range(args.rounds):   # interleaved so that machine drift hits both alike
            for k, fn in fns.items():
                times[k].append(_time(fn, args.runs))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"arch": str(arch), "extract_ms": round(extract_ms, 2),
               **{f"{k}_ms": round(v, 3) for k, v in med.items()},
               "ratio_fwd": round(med["sup_fwd"] / med["sub_fwd"], 3),
               "ratio_train": round(med["sup_train"] / med["sub_train"], 3)}
        rows.append(row)
        print(f"  {name:8s} {row['arch']:>20s}  fwd {row['sup_fwd_ms']:8.2f} vs "
              f"{row['sub_fwd_ms']:8.2f} ms (x{row['ratio_fwd']:.3f})   fwd+bwd "
              f"{row['sup_train_ms']:8.2f} vs {row['sub_train_ms']:8.2f} ms "
              f"(x{row['ratio_train']:.3f})   extract {row['extract_ms']:.1f} ms", flush=True)
    gm = lambda xs: statistics.geometric_mean(xs)   # noqa: E731
    return {"space": space.to_json(), "set_arch_us": round(set_arch_us, 2), "rows": rows,
            "geomean_ratio_fwd": round(gm([r["ratio_fwd"] for r in rows]), 3),
            "geomean_ratio_train": round(gm([r["ratio_train"] for r in rows]), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", default="demo,paper,paper-kd", help=f"comma list of {', '.join(SPACES)}")
    ap.add_argument("--archs", type=int, default=4, help="archs per space (the max arch + random ones)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"command": " ".join(["python", "benchmarks/bench_tinybert_supernet.py", *sys.argv[1:]]),
           "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor()}".strip(),
           "cpus": os.cpu_count(), "threads": args.threads, "batch": args.batch, "seq": args.seq,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "spaces": {}}
    for name in args.spaces.split(","):
        res = bench_space(name, Space(**SPACES[name]), args)
        out["spaces"][name] = res
        print(f"{name}: set_arch {res['set_arch_us']:.1f} us; supernet / extracted, geometric mean: "
              f"forward x{res['geomean_ratio_fwd']:.3f}, "
              f"forward+backward x{res['geomean_ratio_train']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
