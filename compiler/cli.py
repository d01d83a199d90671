"""`attnc compile | check | equiv | ops | demo` — the compiler's commands (this module prints).

Start-up matters here (benchmarks/bench_cli_start.py): this module imports only argparse-level
things; each command imports what it uses. `check` and `compile` (report, --show ir/sympy/code,
--graph) never import torch: the generated PyTorch source is text. torch is imported only by
what runs tensors: `compile --fingerprint`, `--backend triton|auto`, `--explain`, `--show
triton`, `equiv` (numeric fallback) and `demo`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import AttncError, BackendError, ConfigError

PAPER_FORMULAS = {
    "standard": "softmax(Q @ K^T / sqrt(d)) @ V",
    "autobert-zero layer 2": "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "autobert-zero layer 12": "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
}


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile formulas and show what came out",
                       description="Compile a formula (or a file of `formula NAME = ...` "
                                   "definitions) and report its canonical form, hash, inputs, "
                                   "parameters and FLOPs.")
    p.add_argument("formula", metavar="FORMULA_OR_FILE")
    p.add_argument("--show", choices=["ir", "sympy", "code", "triton"], action="append", default=[],
                   help="also print the IR, the SymPy expression, the generated PyTorch code or "
                        "the generated Triton code (repeatable)")
    p.add_argument("--graph", metavar="OUT.{dot,png,svg}", help="write a picture of the formula DAG")
    p.add_argument("--simplified", action="store_true", help="draw the simplified graph with --graph")
    p.add_argument("--explain", action="store_true", help="say which kernel class the formula falls in")
    p.add_argument("--json", action="store_true", help="print one JSON object (a list for files)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"],
                   help="backend whose code to generate (default torch: its source is shown with "
                        "--show code; triton or auto also build the formula, importing torch)")
    p.add_argument("--fingerprint", action="store_true",
                   help="also compute the float64 fingerprint (evaluates the formula with torch)")
    p.add_argument("--dtype", default="float32", help="dtype for --show triton (default float32)")
    _size_args(p)
    _check_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="check a formula (parse, shapes, inputs) without compiling")
    p.add_argument("formula", metavar="FORMULA_OR_FILE")
    _check_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("equiv", help="are two formulas equal? exit 0 if so, 1 if not",
                       description="Exit 0 when the formulas are equivalent (by the rewrite rules, "
                                   "or numerically on random float64 inputs), 1 when not.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    _check_args(p)
    p.set_defaults(func=cmd_equiv)

    p = sub.add_parser("ops", help="list the operations of the formula language")
    ops_option(p)
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("demo", help="the main job: compile the paper's formulas and run a small OP-NAS "
                                    "search (--tinybert: a tiny AutoTinyBERT search instead)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/tinybert-demo)")
    p.add_argument("--compile-only", action="store_true", help="only compile the paper's formulas")
    p.add_argument("--tinybert", action="store_true",
                   help="AutoTinyBERT end to end: SuperPLM training, latency predictor, evolution "
                        "under a latency window, extraction of the best sub-model")
    p.add_argument("--steps", type=int, default=None, help="MLM steps per weight-shared child (OP-NAS demo); SuperPLM steps with --tinybert")
    p.add_argument("--budget", type=int, default=None, help="evaluations of the OP-NAS demo (default 24)")
    p.set_defaults(func=cmd_demo)


def _size_args(p) -> None:
    g = p.add_argument_group("sizes for the parameter and FLOP counts")
    g.add_argument("--seq", type=int, default=128, help="sequence length n (default 128)")
    g.add_argument("--dim", type=int, default=64, help="head dim d (default 64)")
    g.add_argument("--heads", type=int, default=12, help="heads (default 12)")
    g.add_argument("--hidden", type=int, default=768, help="hidden size (default 768)")
    g.add_argument("--batch", type=int, default=1, help="batch (default 1)")


def _check_args(p) -> None:
    p.add_argument("--min-inputs", type=int, default=2, help="fewest distinct inputs (default 2)")
    p.add_argument("--max-inputs", type=int, default=4, help="most distinct inputs (default 4)")
    ops_option(p)


def ops_option(p) -> None:
    """`--ops MODULE` on a command (other stages' commands use it too: attnc search)."""
    p.add_argument("--ops", metavar="MODULE", action="append", default=[], dest="ops_modules",
                   help="import MODULE first: a module of yours that registers elementwise "
                        "functions with attnc.ops.register_elementwise (repeatable)")


def load_ops(args) -> None:
    """Import the user's --ops modules (their registrations are how functions get added)."""
    modules = getattr(args, "ops_modules", [])
    if modules:
        from attnc.ops import import_ops_modules
        import_ops_modules(modules)


def _checks(args):
    from .check import CheckOptions
    load_ops(args)
    return CheckOptions(min_inputs=args.min_inputs, max_inputs=args.max_inputs)


def _analyses(text_or_path: str, checks):
    from .api import analyze, analyze_file
    path = Path(text_or_path)
    looks_like_file = "\n" not in text_or_path and len(text_or_path) < 4096 and (
        path.suffix in (".attn", ".txt", ".formula") or path.is_file())
    if looks_like_file:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise AttncError(f"cannot read formula file {text_or_path}: {e.strerror}",
                             hint="pass a formula in quotes or an existing file") from None
        return analyze_file(text, path=str(path), checks=checks)
    return [analyze(text_or_path, checks=checks)]


def cmd_compile(args) -> int:
    from . import backends
    from .report import report

    checks = _checks(args)
    results = []
    for a in _analyses(args.formula, checks):
        rep = report(a, n=args.seq, d=args.dim, batch=args.batch, heads=args.heads, hidden=args.hidden)
        fn = None
        if args.backend != "torch" and a.name is None:   # the torch backend's code is text (_show)
            from .api import compile as compile_formula
            fn = compile_formula(a.source, backend=args.backend, name=a.name, checks=checks)
        entry = rep.to_dict()
        if args.fingerprint:
            from .equiv import fingerprint
            entry["fingerprint"] = fingerprint(a.simplified)
        if args.explain or "triton" in args.show:
            entry["kernel"] = backends.get("triton").explain(a)
        shows = [(what, _show(a, what, args, fn)) for what in args.show]  # errors before output
        if shows:
            entry["show"] = dict(shows)
        results.append((a, rep, entry, shows))
    if args.graph:
        a = results[0][0]
        if len(results) > 1:
            stem = Path(args.graph)
            for k, (ak, *_rest) in enumerate(results):
                _write_graph(ak, str(stem.with_name(f"{stem.stem}_{ak.name or k}{stem.suffix}")),
                             args.simplified)
        else:
            _write_graph(a, args.graph, args.simplified)
    if args.json:
        objs = [e for _, _, e, _ in results]
        print(json.dumps(objs[0] if len(objs) == 1 else objs, indent=2))
        return 0
    for a, rep, entry, shows in results:
        _print_report(a, rep, entry)
        for what, text in shows:
            print(f"\n--- {what} ---")
            print(text)
        if len(results) > 1:
            print()
    return 0


def _print_report(a, rep, entry) -> None:
    title = f"[{a.name}] " if a.name else ""
    print(f"{title}{' '.join(a.source.split())}")
    print(f"  canonical   {rep.canonical}")
    fp = f"   (float64 fingerprint {entry['fingerprint']})" if "fingerprint" in entry else ""
    print(f"  hash        {rep.hash}{fp}")
    print(f"  inputs      {' '.join(rep.inputs)}   path length {rep.path_length}   ops "
          + ", ".join(f"{k} {v}" for k, v in rep.ops.items()))
    s = rep.sizes
    print(f"  params      {rep.params:,}   (projections for hidden {s['hidden']}, {s['heads']} heads "
          f"of {s['d']})")
    print(f"  flops       {rep.flops:,}   (per head: {rep.flops_per_head}; n={s['n']}, d={s['d']}, "
          f"batch {s['batch']}, {s['heads']} heads)")
    if "kernel" in entry:
        print("  kernel      " + entry["kernel"].replace("\n", "\n              "))


def _show(a, what: str, args, fn) -> str:
    if what == "ir":
        return format_ir(a.graph) + "\n\nsimplified:\n" + format_ir(a.simplified)
    if what == "sympy":
        return str(a.expr)
    if what == "code":
        if fn is not None:   # built for --backend triton / auto: that backend's source
            return fn.source
        from .codegen_torch import generate   # the torch backend's source, without importing torch
        return generate(a.simplified, formula=a.source, canonical=a.canonical, digest=a.hash)
    from . import backends
    return backends.get("triton").source(a, dtype=args.dtype, head_dim=args.dim)


def format_ir(g) -> str:
    from .ir import Op, label, shape_str, topo
    lines = []
    for nid, node in topo(g):
        ops = ", ".join(f"%{o}" for o in node.operands)
        where = f"  @ {node.span}" if node.span else ""
        text = label(node) if node.op in (Op.INPUT, Op.SYMBOL, Op.INDEX, Op.CONST) else node.op.value
        lines.append(f"%{nid} = {text}{' ' + ops if ops else ''} : {shape_str(node.shape)}{where}")
    return "\n".join(lines)


def _write_graph(a, out: str, simplified: bool) -> None:
    dot = a.dot(simplified=simplified)
    path = Path(out)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("dot", "gv", "png", "svg", "pdf"):
        raise AttncError(f"--graph {out}: unknown picture format {fmt!r}", hint="use .dot, .png or .svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("dot", "gv"):
        path.write_text(dot)
    else:
        exe = shutil.which("dot")
        if exe is None:
            raise BackendError(f"cannot draw {out}: graphviz's `dot` is not installed",
                               hint="install it (apt-get install graphviz) or write a .dot file")
        subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot.encode(), check=True)
    print(f"wrote {path}", file=sys.stderr)


def cmd_check(args) -> int:
    for a in _analyses(args.formula, _checks(args)):
        name = f"[{a.name}] " if a.name else ""
        print(f"ok: {name}{a.canonical}   inputs {' '.join(a.inputs)}")
    return 0


def cmd_equiv(args) -> int:
    from .api import analyze
    from .equiv import equivalent
    checks = _checks(args)
    a, b = analyze(args.a, checks=checks), analyze(args.b, checks=checks)
    res = equivalent(a, b)
    if args.json:
        print(json.dumps({"equivalent": res.equal, "how": res.how or None, "max_diff": res.max_diff,
                          "a": a.canonical, "b": b.canonical, "hash_a": a.hash, "hash_b": b.hash}))
    elif res.equal and res.how == "rules":
        print(f"equivalent by the rewrite rules: both are {a.canonical}  [{a.hash}]")
    elif res.equal:
        print(f"numerically equivalent (max |a - b| = {res.max_diff:.3g} on random float64 inputs); "
              f"the rules give different forms:\n  a: {a.canonical}\n  b: {b.canonical}")
    else:
        print(f"not equivalent (max |a - b| = {res.max_diff:.3g}):\n  a: {a.canonical}\n  b: {b.canonical}")
    return 0 if res.equal else 1


def cmd_ops(args) -> int:
    from . import elementwise, structural
    from .ir import FUNCTIONS, OP_DOC, Op
    load_ops(args)
    names = {op: [k for k, (o, _) in FUNCTIONS.items() if o is op] for op in OP_DOC}
    print(f"{'op':12s} {'write it as':28s} math")
    syntax = {Op.NEG: "-x", Op.ADD: "x + y", Op.SUB: "x - y", Op.MUL: "x * y", Op.DIV: "x / y",
              Op.POW: "x ^ c"}
    for op, doc in OP_DOC.items():
        how = syntax.get(op, ", ".join(f"{k}(...)" for k in names[op]))
        print(f"{op.value:12s} {how:28s} {doc}")
    for spec in structural.TABLE.values():
        how = spec.syntax or ", ".join(f"{k}(...)" for k in spec.calls)
        print(f"{spec.name:12s} {how:28s} {spec.doc}")
    print("\nelementwise functions (f(x) entrywise; attnc.ops.register_elementwise adds more):")
    print(f"{'name':12s} {'origin':10s} {'definition':28s} derivative")
    for e in elementwise.entries():
        definition = str(e.expr) + ("" if e.domain is None else f", {e.domain}")
        print(f"{e.name:12s} {'built-in' if e.builtin else 'registered':10s} {definition:28s} "
              f"{e.derivative}")
    print("\ninputs Q K V P (n x d); sizes n d; positions i (n x 1), j (1 x n); constants, inf, pi, e;")
    print("comparisons < <= > >= == != and & | ! only inside where(cond, x, y) / mask(x, cond);")
    print("`let name = expr` bindings, `#` comments, `formula NAME = ...` / `formula NAME { ... }` files.")
    return 0


def cmd_demo(args) -> int:
    if args.tinybert:
        return _demo_tinybert(args)
    from . import backends
    from .api import analyze, compile as compile_formula
    from .report import report
    args.out = args.out or "runs/demo"
    print("== attnc demo: the AutoBERT-Zero paper's formulas ==")
    for title, text in PAPER_FORMULAS.items():
        a = analyze(text)
        rep = report(a)
        fn = compile_formula(text)
        print(f"\n[{title}] {text}")
        print(f"  canonical  {a.canonical}")
        print(f"  hash {a.hash}  inputs {' '.join(a.inputs)}  params {rep.params:,}  "
              f"flops {rep.flops:,} (n=128, d=64, 12 heads)")
        try:
            print("  kernel     " + backends.get("triton").explain(a).splitlines()[0])
        except (ImportError, AttncError):
            pass
        _smoke(fn)
    if args.compile_only:
        return 0
    try:
        from attnc.runtime.demo import run_search_demo
    except ImportError:
        print("\n(the runtime is not installed; compile-only demo)")
        return 0
    print("\n== a small OP-NAS search: 4-layer attention/conv hybrids, BIWS proxy "
          "(wiki-sample MLM; score = -held-out MLM loss) ==")
    kw = {} if args.steps is None else {"shared_steps": args.steps}
    if args.budget is not None:
        if args.budget < 2:
            raise ConfigError(f"--budget must be at least 2, got {args.budget}")
        kw["budget"] = args.budget
    result = run_search_demo(os.fspath(args.out), progress=True, **kw)
    s = result["search"]
    print(f"\n{s['evaluated']} evaluated, {s['failed']} failed, {s['duplicates']} duplicates "
          f"({s['proxy']})")
    if s["best_score"] is None:
        print("no candidate finished; see the study's error texts")
        return 1
    curve = s["best_so_far"]
    marks = sorted({0, len(curve) // 4, len(curve) // 2, len(curve) - 1})
    print("best so far: " + ", ".join(f"after {i + 1}: {curve[i]:.4f}" for i in marks if curve[i] is not None))
    for rank, t in enumerate(s["top"], 1):
        print(f"  #{rank}  score {t['score']:.4f}  " + " | ".join(t["layers"]))
    if s.get("score_se") is not None:
        print(f"one evaluation's standard error (held-out blocks): {s['score_se']:.4f}")
    for t in s.get("rescored") or []:
        print(f"  re-scored from the final supernet, {t['seeds']} seeds: {t['score']:.4f} +- {t['se']:.4f} "
              f"(during the search {t['search_score']:.4f})  " + " | ".join(t["layers"]))
    what = "re-scored mean" if s.get("rescored") else "score"
    print(f"best {what} (-held-out MLM loss) {s['best_score']:.4f}; its layers:")
    for i, layer in enumerate(s["best_layers"]):
        print(f"  layer {i}: {layer}")
    if result["export"]:
        print(f"exported to {result['export']} (loads with transformers.AutoModel after `import attnc`)")
    print(f"done in {result['seconds']:.0f} s; study in {s['study']}, full summary in {args.out}/demo.json")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "demo.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


def _demo_tinybert(args) -> int:
    from attnc.search.tinybert.demo import format_summary, run_tinybert_demo

    out = args.out
    if out is None:   # the default folder: a fresh one next to earlier runs, so `make demo` can run again
        out, i = Path("runs/tinybert-demo"), 1
        while (out / "search" / "study.db").exists():
            i += 1
            out = Path(f"runs/tinybert-demo-{i}")
    print("== attnc demo --tinybert: AutoTinyBERT on a tiny SuperPLM (wiki-sample MLM, CPU latency) ==")
    kw = {} if args.steps is None else {"steps": args.steps}
    summary = run_tinybert_demo(out, progress=True, **kw)
    print(format_summary(summary))
    print(f"full summary in {Path(out, 'demo.json')}")
    return 0


def _smoke(fn) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v, p = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(4))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    out = fn(q=q, k=k, v=v, p=p, key_padding_mask=mask)
    print(f"  ran on (2, 2, 16, 8) with padding: output {tuple(out.shape)}, "
          f"finite={bool(torch.isfinite(out).all())}")


__all__ = ["register", "PAPER_FORMULAS", "format_ir"]

