"""Every stage's output for a wide formula set, to check that a refactor of the compiler changes
nothing users depend on: canonical form, hash, simplified IR, FLOP polynomial, torch source,
kernel plan explanation and Triton source (fp32, fp16, bf16).

The set: the canonical pins and the kernel catalogue of the tests, 400 OP-NAS path samples
(seed 0; Table 1 plus the extra unary primitives) and a few hand-written cos / dist / norm /
where / transpose cases.

    PYTHONHASHSEED=0 python benchmarks/dump_compiler_outputs.py --json before.json   # on the old tree
    PYTHONHASHSEED=0 python benchmarks/dump_compiler_outputs.py --json after.json
    python benchmarks/dump_compiler_outputs.py --compare before.json after.json
"""
from __future__ import annotations

import argparse
import difflib
import json
import random
import sys
from pathlib import Path

EXTRA = ["cos(Q, K) @ V", "dist(Q, K) @ V", "softmax(-dist(Q, K)) @ V", "Q / norm(Q)",
         "softmax(mask(Q @ K^T, j <= i)) @ V", "where(j <= i, softmax(Q @ K^T), 0) @ V",
         "scale(Q) + K", "softmax(cos(2 * Q, K) + dist(3 * Q, 3 * K)) @ V", "(dist(Q, K))^T @ V",
         "norm(-2 * Q) * V", "softmax(Q @ K^T + norm(Q)) @ V", "cos(Q, K)^T @ V",
         "softmax(norm(Q) * Q @ K^T) @ V", "scale(Q^T @ K) ", "Q @ scale(K^T @ V)",
         "softmax(cos(Q @ K^T, Q @ K^T)) @ V", "dist(Q @ K^T, K @ Q^T) @ V"]


def formulas() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from kernel_catalogue import CATALOGUE
    from test_canonical_pins import PINS

    from attnc.search import paths
    from attnc.search.opnas import Space, sample_path
    out = [p[0] for p in PINS] + [c.formula for c in CATALOGUE]
    rng = random.Random(0)
    space = Space(primitives=paths.TABLE1 + paths.EXTRA_UNARY)
    out += [paths.to_text(sample_path(rng, space)[0]) for _ in range(400)]
    return list(dict.fromkeys(out + EXTRA))


def dump(texts: list[str]) -> dict:
    import attnc.kernels
    from attnc.compiler import backends
    from attnc.compiler.api import analyze
    from attnc.compiler.cli import format_ir
    from attnc.compiler.codegen_torch import generate
    from attnc.compiler.report import flops_expr
    triton = backends.get("triton")
    out = {}
    for f in texts:
        try:
            a = analyze(f)
        except Exception as e:   # noqa: BLE001 - a rejection is an output too
            out[f] = {"error": f"{type(e).__name__}: {e}"}
            continue
        rec = {"canonical": a.canonical, "hash": a.hash, "ir": format_ir(a.simplified),
               "flops": str(flops_expr(a.simplified)),
               "torch": generate(a.simplified, formula=a.source, canonical=a.canonical, digest=a.hash),
               "explain": attnc.kernels.explain(a)}
        for dt in ("float32", "float16", "bfloat16"):
            try:
                rec[f"triton_{dt}"] = triton.source(a, dtype=dt, head_dim=16)
            except Exception as e:   # noqa: BLE001 - not streaming: the reason is the output
                rec[f"triton_{dt}"] = f"{type(e).__name__}: {e}"
        out[f] = rec
    return out


def compare(a: dict, b: dict) -> int:
    if a.keys() != b.keys():
        print(f"different formula sets ({len(a)} vs {len(b)})")
        return 1
    diffs = [(f, k) for f in a for k in sorted(set(a[f]) | set(b[f])) if a[f].get(k) != b[f].get(k)]
    for f, k in diffs[:5]:
        print(f"== {f} [{k}]")
        print("\n".join(list(difflib.unified_diff(str(a[f].get(k)).splitlines(),
                                                  str(b[f].get(k)).splitlines(), lineterm=""))[:20]))
    reordered = sum(sorted(str(a[f].get(k)).splitlines()) == sorted(str(b[f].get(k)).splitlines())
                    for f, k in diffs)
    print(f"{len(a)} formulas, {len(diffs)} outputs differ ({reordered} only in line order)")
    return 0 if not diffs else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every stage's output here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="diff two dumps")
    args = ap.parse_args()
    if args.compare:
        return compare(*(json.loads(Path(p).read_text()) for p in args.compare))
    if not args.json:
        ap.error("give --json OUT or --compare BEFORE AFTER")
    out = dump(formulas())
    Path(args.json).write_text(json.dumps(out, indent=1, sort_keys=True))
    print(f"{len(out)} formulas, {sum('error' in r for r in out.values())} rejected -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
