"""`attnc bench FORMULA`: time the fused Triton kernels against the torch backend, SDPA, flex;
`attnc bench --aot sm_80,sm_90a FORMULA...`: compile them for GPU targets without a GPU."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a formula: triton vs torch vs sdpa vs flex; or compile "
                                     "its kernels for GPU targets (--aot)",
                       description="Time one formula on several backends (ms, TFLOP/s, peak memory, "
                                   "ratio to the torch backend) and write a JSON result. Without "
                                   "CUDA it only checks correctness at a small shape. With --aot, "
                                   "compile every kernel of the formulas for GPU targets instead "
                                   "(no GPU needed) and report registers, spills, shared memory and "
                                   "the products' tensor-core instructions.")
    p.add_argument("formulas", nargs="+", metavar="FORMULA",
                   help="formula text, e.g. 'softmax(Q @ K^T / sqrt(d)) @ V' (several with --aot)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", default=None,
                   help="head dim (default 64); with --aot a comma-separated list (default 64,128)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (default bf16); with --aot a list (default fp16,bf16)")
    p.add_argument("--backends", default="triton,torch,sdpa,flex",
                   help="comma-separated subset of triton,torch,sdpa,flex")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", dest="json_path", default="bench_result.json",
                   help="where to write the JSON result (default bench_result.json)")
    g = p.add_argument_group("ahead-of-time compilation (no GPU needed)")
    g.add_argument("--aot", metavar="TARGETS",
                   help="compile for these GPU targets instead of timing: sm_80, sm_86, sm_89, sm_90a")
    g.add_argument("--configs", choices=("default", "all"), default="default",
                   help="the tuner's default config per kernel (default), or every config it may try")
    g.add_argument("--no-mask", action="store_true", help="compile without the key padding mask")
    g.add_argument("--reference", action="store_true",
                   help="also compile the hand-written FlashAttention-2 (kernels/fa2_reference.py) and "
                        "compare the standard formula's kernels with it, config by config")
    g.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    from attnc.compiler.errors import ConfigError

    if args.aot:
        return _aot(args)
    if len(args.formulas) != 1:
        raise ConfigError("timing takes one formula", hint="several formulas only with --aot")
    args.formula = args.formulas[0]
    args.dtype = args.dtype or "bf16"
    try:
        args.dim = int(args.dim or 64)
    except ValueError:
        raise ConfigError(f"--dim {args.dim!r} is not a number", hint="e.g. --dim 64") from None
    import torch

    from . import bench

    backends = bench.parse_backends(args.backends)
    bench.torch_dtype(args.dtype)
    for name in ("batch", "heads", "seq", "dim", "iters"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if not torch.cuda.is_available():
        if os.environ.get("ATTNC_BENCH_CHILD") != "1":
            print("no CUDA device: on a CPU attnc bench can only check correctness (the Triton "
                  "kernels under the interpreter vs the torch backend, at a small shape); time on a "
                  "GPU, or compile for one with --aot", flush=True)
        if os.environ.get("TRITON_INTERPRET") != "1":
            # the interpreter must be on before triton is imported: rerun in a fresh process
            env = dict(os.environ, TRITON_INTERPRET="1")
            env["ATTNC_BENCH_CHILD"] = "1"
            cmd = [sys.executable, "-m", "attnc", "bench", args.formula, "--json", args.json_path]
            return subprocess.run(cmd, env=env, check=False).returncode
        result = bench.correctness_check(args.formula)
        print(f"plan: {result['plan']}   max |out err| {result['max_abs_err']:.3g}   "
              f"max |grad err| {result['max_abs_grad_err']:.3g}   -> {'OK' if result['ok'] else 'MISMATCH'}")
        _write(args.json_path, {"mode": "correctness", **result})
        return 0 if result["ok"] else 1
    result = bench.run_bench(args.formula, batch=args.batch, heads=args.heads, seq=args.seq, dim=args.dim,
                             dtype=args.dtype, backends=backends, backward=args.backward,
                             warmup=args.warmup, iters=args.iters)
    print(f"{result['canonical']}   B={args.batch} H={args.heads} n={args.seq} d={args.dim} "
          f"{result['dtype']}{' fwd+bwd' if args.backward else ' fwd'}   on {result['device']}")
    count = result["flops"]
    if count["computed_fraction"] < 1:
        print(f"TFLOP/s count the {count['computed_fraction']:.1%} of score blocks the fused kernel "
              f"computes (the mask keeps {count['band']})")
    print(f"{'backend':<8} {'ms':>9} {'TFLOP/s':>9} {'peak MiB':>9} {'vs torch':>9}  note")
    for r in result["rows"]:
        fmt = lambda x, spec: format(x, spec) if x is not None else "-"
        print(f"{r['backend']:<8} {fmt(r['ms'], '9.3f')} {fmt(r['tflops'], '9.2f')} "
              f"{fmt(r['peak_mib'], '9.1f')} {fmt(r['vs_torch'], '8.2f') + 'x' if r['vs_torch'] else '        -'}"
              f"  {r['note']}")
    _write(args.json_path, {"mode": "timing", **result})
    return 0


# ---- --aot ---------------------------------------------------------------------------------------

def _aot(args) -> int:
    from attnc.compiler.errors import ConfigError

    from . import aot

    targets = aot.parse_targets(args.aot)
    dtypes = _dtypes(args.dtype or "fp16,bf16")
    dims = _ints(args.dim or "64,128", "--dim")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Triton must be imported without its interpreter to compile: rerun in a fresh process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "attnc", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else None
        if cmd is None:
            raise ConfigError("ahead-of-time compilation needs TRITON_INTERPRET unset")
        return subprocess.run(cmd, env=env, check=False).returncode
    import attnc
    for f in args.formulas:      # the project's own errors for a bad formula, before any work
        attnc.analyze(f)
    formulas = list(dict.fromkeys(args.formulas))
    standard = attnc.analyze(aot.STANDARD).hash
    if args.reference:
        formulas.append(aot.REFERENCE)
    jobs = [aot.Job(f, dt, d, targets, which=args.configs,
                    has_mask=not args.no_mask and f != aot.REFERENCE)
            for f in formulas for dt in dtypes for d in dims]
    if args.reference and not (args.no_mask and any(attnc.analyze(f).hash == standard for f in formulas
                                                     if f != aot.REFERENCE)):
        # the standard formula as the reference runs it: no mask, the same configs
        jobs += [aot.Job(aot.STANDARD, dt, d, targets, which=args.configs, has_mask=False)
                 for dt in dtypes for d in dims]
    print(f"compiling {len(jobs)} kernel modules x {len(targets)} target(s) ({args.configs} configs) "
          f"with {args.jobs or os.cpu_count()} worker(s)", flush=True)
    from attnc._progress import progress_bar
    with progress_bar(total=len(jobs), desc="aot", unit="module") as bar:
        reports = aot.run(jobs, workers=args.jobs, progress=bar.update)
    _print_reports(reports)
    comparison = aot.compare_reference(reports) if args.reference else []
    if comparison:
        _print_comparison(comparison)
    problems = aot.violations(reports)
    problems += [f"{c['kernel']} {c['dtype']} d{c['head_dim']} {c['target']} {c['config']}: the standard "
                 f"formula has {c['registers']} registers / {c['shared']} B shared / {c['products']} products, "
                 f"the reference {c['ref_registers']} / {c['ref_shared']} B / {c['ref_products']}"
                 for c in comparison if not c["ok"]]
    print(f"\n{len(reports)} kernels compiled; {len(problems)} miss the targets (spills in default "
          "configs, products without wgmma on sm_90a, default configs over the shared memory"
          f"{', +10% over the reference or another product count' if args.reference else ''})")
    for line in problems:
        print(f"  {line}")
    _write(args.json_path, {"mode": "aot", "command": "attnc " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                            "environment": aot.environment(), "targets": {t: aot.TARGETS[t] for t in targets},
                            "shared_limit": {t: aot.SHARED_LIMIT[aot.TARGETS[t][1]] for t in targets},
                            "configs": args.configs, "violations": problems,
                            "reference_comparison": comparison, "rows": [r.as_dict() for r in reports]})
    return 1 if problems else 0


def _dtypes(text: str) -> list[str]:
    from attnc.compiler.errors import ConfigError

    from .bench import DTYPES
    out = []
    for x in (s.strip() for s in text.split(",") if s.strip()):
        if x not in DTYPES:
            raise ConfigError(f"unknown dtype {x!r}", hint="fp32, fp16 or bf16, comma-separated")
        out.append(DTYPES[x])
    return list(dict.fromkeys(out))


def _ints(text: str, flag: str) -> list[int]:
    from attnc.compiler.errors import ConfigError
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected numbers, e.g. 64,128") from None
    if not out or any(not 1 <= x <= 256 for x in out):
        raise ConfigError(f"{flag} {text!r}: head dims are 1..256")
    return out


def _print_reports(reports) -> None:
    from .tune import Config
    print(f"{'kernel':<14} {'dtype':<9} {'d':>3} {'target':<7} {'config':<15} {'regs':>4} {'spills':>11} "
          f"{'smem KiB':>9} {'products':<10} formula")
    for r in reports:
        if r.error:
            print(f"{r.kernel:<14} {r.dtype:<9} {r.head_dim:>3} {r.target:<7} "
                  f"{str(Config.from_dict(r.config)):<15} does not compile: {r.error}")
            continue
        wg = sum(d.wgmma for d in r.dots)
        prods = f"{len(r.dots)}" + (f" ({wg} wgmma)" if r.target == "sm_90a" and r.dots else "")
        flags = ("" if r.fits else " OVER") + (" *" if r.default else "")
        print(f"{r.kernel:<14} {r.dtype:<9} {r.head_dim:>3} {r.target:<7} {str(Config.from_dict(r.config)):<15} "
              f"{r.registers:>4} {f'{r.spill_stores}/{r.spill_loads} B':>11} {r.shared / 1024:>9.1f}"
              f"{flags:<3} {prods:<10} {r.formula[:60]}")
    print("(* the tuner's default config; spills: stores/loads; OVER: more shared memory than the target "
          "has, so the tuner drops the config there)")


def _print_comparison(rows) -> None:
    print("\nthe standard formula's kernels vs the reference FlashAttention-2 (same config, no mask):")
    print(f"{'kernel':<14} {'dtype':<9} {'d':>3} {'target':<7} {'config':<15} {'registers':>13} "
          f"{'shared KiB':>17} {'products':>9}")
    for c in rows:
        print(f"{c['kernel']:<14} {c['dtype']:<9} {c['head_dim']:>3} {c['target']:<7} {c['config']:<15} "
              f"{c['registers']:>4}/{c['ref_registers']:<3} {c['registers_ratio'] - 1:+5.0%} "
              f"{c['shared'] / 1024:>6.1f}/{c['ref_shared'] / 1024:<6.1f}{c['shared_ratio'] - 1:+4.0%} "
              f"{c['products']:>4}/{c['ref_products']}")


def _write(path: str, data: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {p}")
