"""Deduplication: the share of the first 200 candidates an OP-NAS search generates that need no
evaluation, by plain formula text, by canonical hash (the compiler's rules) and by canonical hash
plus the float64 fingerprint ("numerically equivalent"). Two spaces: 4-layer architectures (a
candidate is saved when all layers equal an evaluated one's) and single layers (formula level).

    python benchmarks/bench_search_dedup.py [--candidates 200] [--seeds 0 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path


def shares(db_path: Path, n: int) -> dict:
    from attnc.search.paths import Path as FPath, to_text
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT genes, arch, arch_key, fp_key FROM candidates ORDER BY id LIMIT ?", (n,)).fetchall()
    db.close()
    seen = {"text": set(), "hash": set(), "hash+fingerprint": set()}
    saved = dict.fromkeys(seen, 0)
    for genes, arch, ak, fk in rows:
        layers = json.loads(arch)["layers"]
        text = "|".join(to_text(FPath.from_json(g)) if g else f"conv{layer['kernel_size']}"
                        for g, layer in zip(json.loads(genes), layers))
        keys = {"text": (text,), "hash": (ak,), "hash+fingerprint": (ak, fk)}
        for how, ks in keys.items():
            if any(k in seen[how] for k in ks):
                saved[how] += 1
            seen[how].update(ks)
    # "text" is the naive baseline: the same path written the same way
    return {"candidates": len(rows), **{f"saved_{k}": v / len(rows) for k, v in saved.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    from attnc.search import opnas
    from attnc.search.synthetic import known_ops

    results = []
    for label, space in (("4 layers", opnas.Space(num_layers=4)),
                         ("1 layer, attention only", opnas.Space(num_layers=1, conv_prob=0.0))):
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as d:
                db = Path(d) / "study.db"
                t0 = time.perf_counter()
                # population 50, then 10 parents x 5 children: the budget is reached after >= N rows
                opnas.search(space, known_ops, budget=args.candidates, population=50, top_k=10, children=5,
                             seed=seed, study=db)
                r = {"space": label, "seed": seed, **shares(db, args.candidates),
                     "seconds": round(time.perf_counter() - t0, 2)}
            results.append(r)
            print(f"{label:26s} seed {seed}: of {r['candidates']} candidates saved  text {r['saved_text']:.1%}"
                  f"  hash {r['saved_hash']:.1%}  hash+fingerprint {r['saved_hash+fingerprint']:.1%}")
    if args.json:
        out = {"command": "python " + " ".join(sys.argv), "python": platform.python_version(),
               "machine": platform.machine(), "evaluator": "attnc.search.synthetic:known_ops",
               "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
