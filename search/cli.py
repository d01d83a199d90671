"""`attnc search opnas | report | export` (registered by attnc.cli).

    attnc search opnas --out runs/s --layers 4 --budget 100
    attnc search opnas --out runs/s --evaluator attnc.search.synthetic:known_ops --budget 50
    attnc search report runs/s --json --plot runs/s/search.png
    attnc search report runs/opnas runs/ea runs/random --plot compare.png   # one line per run
    attnc search export runs/s --rank 1 --out runs/s/best
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

from attnc.compiler.cli import load_ops, ops_option   # --ops MODULE: the user's registered functions
from attnc.compiler.errors import ConfigError, DataError

_EVAL_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register(subparsers) -> None:
    top = subparsers.add_parser("search", help="architecture search (OP-NAS) over formulas and convolutions",
                                description="Architecture search: run, report on and export OP-NAS studies.")
    sub = top.add_subparsers(dest="search_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("opnas", help="run or resume an OP-NAS / EA / random search",
                       description="Search per-layer attention formulas and convolutions. The study "
                                   "(DIR/study.db) holds every candidate; --resume continues it.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--budget", type=int, default=100, help="finished evaluations (duplicates don't count)")
    p.add_argument("--algorithm", choices=("opnas", "ea", "random"), default="opnas")
    p.add_argument("--no-weight-sharing", action="store_true")
    p.add_argument("--evaluator", metavar="MODULE:FUNCTION",
                   help="a function architecture -> score (higher is better); default: the BIWS proxy")
    p.add_argument("--resume", action="store_true", help="continue the study in DIR")
    p.add_argument("--population", type=int, default=100)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--children", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", type=int, metavar="N", help="start a local Ray with N workers")
    p.add_argument("--ray-address", metavar="ADDR", help="join an existing Ray cluster")
    p.add_argument("--ray-in-flight", type=int, metavar="N",
                   help="the most evaluations running at once on Ray (default: the cluster's CPUs); "
                        "1 reproduces the in-process search exactly under weight sharing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--primitive", action="append", default=[], metavar="NAME", dest="extra_primitives",
                   help="add an elementwise function (built-in or registered through --ops) to the "
                        "paper's Table 1 primitives (repeatable; pass the same on --resume)")
    ops_option(p)
    p.set_defaults(func=_opnas)

    p = sub.add_parser("report", help="best architectures and counts of one or more studies",
                       description="Summarise studies: best architectures, evaluated / failed / duplicate "
                                   "counts; optional plots comparing them.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="one or more studies (search --out folders)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON (several DIRs: a list, one summary per DIR)")
    p.add_argument("--plot", metavar="FILE",
                   help="draw best so far vs evaluations (one line per study; seeds of one algorithm: "
                        "mean with a min-max band), the operation-priority heatmap and the best "
                        "architecture's formulas (PNG/PDF/SVG)")
    ops_option(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("export", help="an architecture of a study as a Hugging Face folder",
                       description="Write the architecture of the given rank with its supernet weights "
                                   "(a fresh initialisation, with a warning, when the study has none).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--out", required=True, metavar="MODEL")
    ops_option(p)
    p.set_defaults(func=_export)

    from .tinybert.cli import register as register_tinybert   # superplm ..., latency (AutoTinyBERT)
    register_tinybert(sub)


def load_evaluator(spec: str):
    """'module:function' -> the function (imported by name; nothing is evaluated)."""
    if not _EVAL_RE.match(spec):
        raise ConfigError(f"bad --evaluator {spec!r}", hint="write MODULE:FUNCTION, e.g. mypkg.scores:score")
    mod, fn = spec.split(":")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(f"cannot import evaluator module {mod!r}: {e}",
                          hint="make it importable (PYTHONPATH or an installed package)") from None
    f = getattr(module, fn, None)
    if not callable(f):
        raise ConfigError(f"evaluator module {mod} has no function {fn!r}")
    return f


def _opnas(args) -> int:
    from . import opnas

    out = Path(args.out)
    db = out / "study.db"
    if db.exists() and not args.resume:
        raise ConfigError(f"{db} exists", hint="pass --resume to continue it, or choose another --out")
    if args.resume and not db.exists():
        raise ConfigError(f"nothing to resume: no study at {db}")
    load_ops(args)
    evaluate = load_evaluator(args.evaluator) if args.evaluator else None
    space = opnas.Space(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_heads=args.heads,
                        primitives=opnas.TABLE1 + tuple(p for p in args.extra_primitives
                                                        if p not in opnas.TABLE1))
    result = opnas.search(space, evaluate, algorithm=args.algorithm,
                          weight_sharing=not args.no_weight_sharing, budget=args.budget, seed=args.seed,
                          population=args.population, top_k=args.top_k, children=args.children,
                          alpha=args.alpha, study=db, ray=args.ray, ray_address=args.ray_address,
                          ray_in_flight=args.ray_in_flight,
                          progress=not args.no_progress)
    summary = _summary(result, top=5)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


REPORT_SEQ = 128   # the sequence length of the reported FLOPs


def _arch_info(a) -> tuple[list[dict], int]:
    """Per layer: its JSON plus `params` (the token mixer's weights: projections / GLU input
    projection and kernel, and the output dense) and `flops` (the token mixing itself at
    n=REPORT_SEQ, batch 1, projections excluded: the compiler's count of the formula over all heads,
    or 2·n·C·K multiply-adds of the depthwise convolution); and the parameters of the whole encoder
    (all layers, FFNs and LayerNorms included; embeddings excluded since they depend on the vocabulary).
    Parameter counts come from the model itself, built on the meta device (no memory, no init)."""
    import torch

    from attnc.compiler.api import analyze
    from attnc.compiler.check import CheckOptions
    from attnc.compiler.report import report
    from attnc.runtime.modeling import AttncBertModel

    with torch.device("meta"):
        encoder = AttncBertModel(a.to_config(), add_pooling_layer=False).encoder
    layers = []
    for choice, module in zip(a.layers, encoder.layer):
        info = choice.to_json()
        att = module.attention
        info["params"] = sum(p.numel() for p in att.self.parameters()) + \
            sum(p.numel() for p in att.output.dense.parameters())
        if choice.kind == "attention":
            # the space checked the formula already (perhaps with other input counts): accept 1-4 here
            rep = report(analyze(choice.formula, checks=CheckOptions(min_inputs=1, max_inputs=4)),
                         n=REPORT_SEQ, d=a.hidden_size // a.num_heads, heads=a.num_heads, hidden=a.hidden_size)
            info["flops"] = rep.flops
        else:
            info["flops"] = 2 * REPORT_SEQ * a.hidden_size * choice.kernel_size
        layers.append(info)
    return layers, sum(p.numel() for p in encoder.parameters())


def _summary(result, top: int) -> dict:
    def arch(e):
        layers, params = _arch_info(e.architecture)
        return {"id": e.id, "score": e.score, "generation": e.generation, "params": params,
                "layers": layers, "architecture": e.architecture.to_json()}
    best = result.top(top)
    return {"study": result.study, "evaluated": len(result.evaluations), "failed": result.failed,
            "duplicates": result.duplicates, "illegal": result.illegal,
            "best": arch(best[0]) if best else None, "top": [arch(e) for e in best]}


def _print_summary(s: dict) -> None:
    print(f"study {s['study']}: {s['evaluated']} evaluated, {s['failed']} failed, "
          f"{s['duplicates']} duplicates (not evaluated), {s['illegal']} illegal graphs rejected")
    for rank, e in enumerate(s["top"], 1):
        print(f"#{rank}  score {e['score']:.4f}  (candidate {e['id']}, generation {e['generation']}; "
              f"encoder {e['params']:,} params)")
        for i, layer in enumerate(e["layers"]):
            what = f"conv, kernel {layer['kernel_size']}" if layer["kind"] == "conv" else layer["formula"]
            print(f"    layer {i}: {what}   ({layer['params']:,} params, {layer['flops']:,} FLOPs at "
                  f"n={REPORT_SEQ})")


def _report(args) -> int:
    from . import opnas, plots
    load_ops(args)

    if args.top < 1:
        raise ConfigError(f"--top must be positive, got {args.top}")
    summaries = [_summary(opnas.open_result(d), top=args.top) for d in args.dirs]
    if args.plot:
        plots.save_report([plots.load_study(d) for d in args.dirs], args.plot)
    if args.json:
        if args.plot:
            for s in summaries:
                s["plot"] = args.plot
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    else:
        for s in summaries:
            _print_summary(s)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _export(args) -> int:
    from . import opnas
    from .study import Study
    load_ops(args)

    result = opnas.open_result(args.dir)
    ranked = result.top(len(result.evaluations))
    if not 1 <= args.rank <= len(ranked):
        raise DataError(f"rank {args.rank} out of range: the study has {len(ranked)} evaluated architectures")
    arch = ranked[args.rank - 1].architecture
    st = Study(result.study)
    try:
        name = st.latest_state_file()
        state = st.load_state(name) if name else None
    finally:
        st.close()
    blob = state.get("supernet") if isinstance(state, dict) else None
    if blob is not None:
        from .biws import Supernet, export_model
        model = export_model(Supernet.from_state_copy(blob), arch)
        source = f"supernet weights of {name}"
    else:
        from attnc.runtime.modeling import AttncBertForMaskedLM
        print("warning: the study has no supernet weights; the exported model is freshly initialised",
              file=sys.stderr)
        model = AttncBertForMaskedLM(arch.to_config())
        source = "fresh initialisation"
    model.save_pretrained(args.out)
    print(f"exported rank {args.rank} (score {ranked[args.rank - 1].score:.4f}) to {args.out} ({source})")
    return 0
