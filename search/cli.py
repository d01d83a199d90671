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
# `search opnas` defaults of the settings a study records (a resumed study keeps its own)
_DEFAULTS = dict(layers=4, hidden=128, ffn=512, heads=4, algorithm="opnas", no_weight_sharing=False,
                 population=100, top_k=5, children=5, alpha=0.5, temperature=1.0, seed=0)
_PROXY_FLAGS = {"task": "task", "data_dir": "data_dir", "pretrain_steps": "pretrain_steps",
                "shared_steps": "shared_pretrain_steps", "finetune_steps": "finetune_steps", "device": "device",
                "warmup_children": "warmup_children", "warmup_steps": "warmup_steps", "target_se": "target_se"}


def register(subparsers) -> None:
    top = subparsers.add_parser("search", help="architecture search (OP-NAS) over formulas and convolutions",
                                description="Architecture search: run, report on and export OP-NAS studies.")
    sub = top.add_subparsers(dest="search_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("opnas", help="run or resume an OP-NAS / EA / random search",
                       description="Search per-layer attention formulas and convolutions. The study "
                                   "(DIR/study.db) holds every candidate; --resume continues it.")
    p.add_argument("--out", required=True, metavar="DIR")
    g = p.add_argument_group("space and algorithm (on --resume: the study's own, unless given)")
    g.add_argument("--layers", type=int, help=f"layers (default {_DEFAULTS['layers']})")
    g.add_argument("--hidden", type=int, help=f"hidden size (default {_DEFAULTS['hidden']})")
    g.add_argument("--ffn", type=int, help=f"FFN size (default {_DEFAULTS['ffn']})")
    g.add_argument("--heads", type=int, help=f"attention heads (default {_DEFAULTS['heads']})")
    g.add_argument("--algorithm", choices=("opnas", "ea", "random"), help="default opnas")
    g.add_argument("--no-weight-sharing", action="store_true", default=None,
                   help="train every child from scratch (default: BIWS weight sharing)")
    g.add_argument("--population", type=int, help=f"M (default {_DEFAULTS['population']})")
    g.add_argument("--top-k", type=int, help=f"K (default {_DEFAULTS['top_k']})")
    g.add_argument("--children", type=int, help=f"C (default {_DEFAULTS['children']})")
    g.add_argument("--alpha", type=float, help=f"UCB exploration weight (default {_DEFAULTS['alpha']})")
    g.add_argument("--temperature", type=float,
                   help=f"of Equation 3's softmax over scores z-scored within their generation "
                        f"(default {_DEFAULTS['temperature']}; lower: greedier priorities)")
    g.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--budget", type=int, default=100, help="finished evaluations (duplicates don't count)")
    p.add_argument("--evaluator", metavar="MODULE:FUNCTION",
                   help="a function architecture -> score (higher is better); default: the BIWS proxy")
    p.add_argument("--resume", action="store_true", help="continue the study in DIR")
    e = p.add_argument_group("the default proxy evaluator (short MLM pretraining, then a fine-tune)")
    e.add_argument("--task", help="rt-polarity (default) | bbc-topic | glue/NAME (with --data-dir) | mlm "
                                  "(score = minus the held-out MLM loss, no fine-tune)")
    e.add_argument("--data-dir", metavar="DIR", help="GLUE-format folder for glue/* tasks")
    e.add_argument("--pretrain-steps", type=int, metavar="N", help="MLM steps of a from-scratch child (200)")
    e.add_argument("--shared-steps", type=int, metavar="N", help="MLM steps of a weight-shared child (40)")
    e.add_argument("--finetune-steps", type=int, metavar="N", help="task steps (100)")
    e.add_argument("--device", help="auto (default: CUDA when present) | cpu | cuda[:N]")
    e.add_argument("--warmup-children", type=int, metavar="N",
                   help="supernet warm-up: N random children trained before anything is scored (0)")
    e.add_argument("--warmup-steps", type=int, metavar="N", help="MLM steps of a warm-up child (--shared-steps)")
    e.add_argument("--target-se", type=float, metavar="SE",
                   help="choose the held-out size (MLM blocks, or task dev examples) for this standard error "
                        "of one score, e.g. 0.05 (default: 64 held-out MLM blocks / 500 dev examples)")
    p.add_argument("--rescore-seeds", type=int, default=3, metavar="N",
                   help="weight sharing: the final top-K are scored again from the final supernet with N "
                        "seeds, and the best mean is reported (default 3)")
    p.add_argument("--ray", type=int, metavar="N", help="start a local Ray with N workers")
    p.add_argument("--ray-address", metavar="ADDR", help="join an existing Ray cluster (host:port)")
    p.add_argument("--ray-in-flight", type=int, metavar="N",
                   help="the most evaluations running at once on Ray (default: the cluster's CPUs); "
                        "1 reproduces the in-process search exactly under weight sharing")
    p.add_argument("--ray-gpus-per-task", type=float, metavar="G",
                   help="GPUs each Ray task asks for (default 1 with --device cuda, or auto on a cluster "
                        "with GPUs; else 0)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--primitive", action="append", default=[], metavar="NAME", dest="extra_primitives",
                   help="add an elementwise function (built-in or registered through --ops) to the "
                        "paper's Table 1 primitives (repeatable; on --resume: the study's own unless given)")
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

    p = sub.add_parser("fidelity", help="is a proxy worth its cost? rank agreement with longer training",
                       description="Train the truth (each architecture from scratch, T steps x S seeds) and "
                                   "score the architectures with each proxy (BIWS after its warm-up, from scratch "
                                   "at equal cost, any --evaluator); print Kendall tau and Spearman rho with "
                                   "bootstrap 90% intervals, the truth's self-agreement and seconds per "
                                   "evaluation. Resumable: run again with the same --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--archs", metavar="FILE", help="one architecture per line, layers separated by ' | ' "
                                                     "(a formula or conv(k=K)), as reports print them")
    src.add_argument("--sample", type=int, metavar="N", help="N architectures sampled from the space (--layers ...)")
    src.add_argument("--study", metavar="DIR", help="the best and worst --top of a study (search --out folder)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="with --study: N best and N worst (10)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--layers", type=int, default=4, help="with --sample (4)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of --archs / --sample (64)")
    p.add_argument("--ffn", type=int, help="FFN size (4 x hidden)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--truth-steps", type=int, default=2000, metavar="T")
    p.add_argument("--truth-seeds", type=int, default=2, metavar="S")
    p.add_argument("--shared-steps", type=int, default=40, metavar="N", help="BIWS steps per child (40)")
    p.add_argument("--warmup-children", type=int, default=60, metavar="N", help="BIWS warm-up children (60)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="MLM steps of a BIWS warm-up child (--shared-steps)")
    p.add_argument("--no-biws", action="store_true")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch proxy at BIWS's cost")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes training the truth and the from-scratch proxy (1); a run may resume with "
                        "another N")
    p.add_argument("--evaluator", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="another proxy (repeatable)")
    p.add_argument("--vocab", type=int, metavar="N", help="a WordPiece vocabulary of N trained on the corpus "
                                                         "(default: the proxy's tokenizer)")
    p.add_argument("--lr", type=float, help="MLM peak learning rate of the truth and the proxies (the proxy's 1e-3)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-blocks", type=int, default=256, help="held-out MLM blocks (256)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="proxy vs truth scatter (PNG/PDF/SVG)")
    ops_option(p)
    p.set_defaults(func=_fidelity)

    from .tinybert.cli import register as register_tinybert   # superplm ..., latency (AutoTinyBERT)
    register_tinybert(sub)


def load_evaluator(spec: str):
    """'module:function' -> the function (imported by name; nothing is evaluated). A class named
    there must be an attnc.search.Evaluator, made with no arguments."""
    import inspect

    from .evaluator import Evaluator

    if not _EVAL_RE.match(spec):
        raise ConfigError(f"bad --evaluator {spec!r}", hint="write MODULE:FUNCTION, e.g. mypkg.scores:score")
    mod, fn = spec.split(":")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(f"cannot import evaluator module {mod!r}: {e}",
                          hint="make it importable (PYTHONPATH or an installed package)") from None
    f = getattr(module, fn, None)
    if inspect.isclass(f):
        if not issubclass(f, Evaluator):
            raise ConfigError(f"evaluator {spec} is a class, not a function or an attnc.search.Evaluator",
                              hint="name a function architecture -> score, or an Evaluator subclass")
        try:
            return f()
        except TypeError as e:
            raise ConfigError(f"cannot make evaluator {spec} without arguments: {e}",
                              hint="give its arguments defaults, or name a function that builds it") from None
    if not callable(f):
        raise ConfigError(f"evaluator module {mod} has no function {fn!r}")
    return f


def _study_settings(db: Path) -> dict:
    """The CLI settings a study was made with (for --resume without repeating every flag)."""
    from .opnas import read_study

    with read_study(db) as (_, meta):
        sp = meta.get("space") or {}
    return {"layers": sp.get("num_layers"), "hidden": sp.get("hidden_size"), "ffn": sp.get("intermediate_size"),
            "heads": sp.get("num_heads"), "algorithm": meta.get("algorithm"),
            "no_weight_sharing": not meta.get("weight_sharing", True), "population": meta.get("population"),
            "top_k": meta.get("top_k"), "children": meta.get("children"), "alpha": meta.get("alpha"),
            "temperature": meta.get("temperature"),
            "seed": meta.get("seed"), "primitives": sp.get("primitives"), "evaluator": meta.get("evaluator")}


def _proxy_evaluator(args, weight_sharing: bool, stored: dict | None = None):
    """The evaluator of `search opnas`: --evaluator's; else the BIWS proxy with the CLI's --task /
    --*-steps / --device over the resumed study's own proxy settings (`stored`: the study's
    evaluator identity) or the defaults (None when nothing is given: the search builds the default)."""
    flags = [flag for flag in _PROXY_FLAGS if getattr(args, flag) is not None]
    given = {_PROXY_FLAGS[flag]: getattr(args, flag) for flag in flags}
    if args.evaluator:
        if flags:
            raise ConfigError(f"--{flags[0].replace('_', '-')} configures the default proxy evaluator, but "
                              "--evaluator replaces it", hint="drop one of them")
        return load_evaluator(args.evaluator)
    if stored and stored.get("kind") == "function":
        raise ConfigError(f"the study was scored by --evaluator {stored.get('name')}",
                          hint="pass the same --evaluator to resume it")
    base = dict(stored["config"]) if stored and stored.get("kind") == "proxy" else {}
    if not given and not base:
        return None
    from .proxy import ProxyConfig, ProxyEvaluator

    if given.get("task") == "mlm":
        given["task"] = None
    if "device" in given:
        from attnc.runtime.trainer import resolve_device
        resolve_device(given["device"])   # an unknown or absent device: ConfigError now, not per candidate
    settings = {**base, **given, "weight_sharing": weight_sharing}
    try:
        return ProxyEvaluator(ProxyConfig(**settings))
    except TypeError as e:   # a study written by another attnc version
        raise ConfigError(f"the study's proxy settings do not fit this attnc: {e}",
                          hint="resume with the attnc that made it, or start a new study") from None


def _opnas(args) -> int:
    from . import opnas

    out = Path(args.out)
    db = out / "study.db"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", hint="give a folder (the study goes in DIR/study.db)")
    if db.exists() and not args.resume:
        raise ConfigError(f"{db} exists", hint="pass --resume to continue it, or choose another --out")
    if args.resume and not db.exists():
        raise ConfigError(f"nothing to resume: no study at {db}")
    if args.ray is not None and args.ray < 1:
        raise ConfigError(f"--ray needs a positive number of workers, got {args.ray}")
    if args.ray is not None and args.ray_address:
        raise ConfigError("--ray starts a local Ray and --ray-address joins a cluster: give one of them")
    load_ops(args)
    stored = _study_settings(db) if args.resume else {}
    opt = {k: (getattr(args, k) if getattr(args, k) is not None else
               stored.get(k) if stored.get(k) is not None else v) for k, v in _DEFAULTS.items()}
    primitives = opnas.TABLE1 + tuple(p for p in args.extra_primitives if p not in opnas.TABLE1)
    if args.resume and not args.extra_primitives and stored.get("primitives"):
        primitives = tuple(stored["primitives"])
    evaluate = _proxy_evaluator(args, weight_sharing=not opt["no_weight_sharing"], stored=stored.get("evaluator"))
    space = opnas.Space(num_layers=opt["layers"], hidden_size=opt["hidden"], intermediate_size=opt["ffn"],
                        num_heads=opt["heads"], primitives=primitives)
    result = opnas.search(space, evaluate, algorithm=opt["algorithm"],
                          weight_sharing=not opt["no_weight_sharing"], budget=args.budget, seed=opt["seed"],
                          population=opt["population"], top_k=opt["top_k"], children=opt["children"],
                          alpha=opt["alpha"], temperature=opt["temperature"], study=db, ray=args.ray,
                          ray_address=args.ray_address, ray_in_flight=args.ray_in_flight,
                          ray_gpus_per_task=args.ray_gpus_per_task, rescore_seeds=args.rescore_seeds,
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
    from attnc.runtime.config import LAYER_CHECKS
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
            # the space checked the formula already (perhaps with other input counts): what a layer accepts
            rep = report(analyze(choice.formula, checks=LAYER_CHECKS),
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
    rescored = [{"id": r.id, "score": r.score, "se": r.se, "seeds": r.n, "search_score": r.search_score,
                 "layers": [str(x) for x in r.architecture.layers]} for r in result.rescored]
    first = None
    if result.rescored:   # the best is the best re-scored mean (one supernet state, several seeds)
        by_id = {e.id: e for e in result.evaluations}
        first = arch(by_id[result.rescored[0].id])
        first["rescored"] = rescored[0]
    elif best:
        first = arch(best[0])
    ses = sorted(e.metrics["score_se"] for e in result.evaluations if e.metrics.get("score_se") is not None)
    return {"study": result.study, "held_out": _held_out(result.study), "evaluated": len(result.evaluations), "failed": result.failed,
            "duplicates": result.duplicates, "illegal": result.illegal, "warmup_children": result.warmup,
            "score_se": ses[len(ses) // 2] if ses else None,
            "best": first, "top": [arch(e) for e in best], "rescored": rescored}


def _held_out(study) -> str | None:
    """What the study's proxy scored on: its held-out size, and the standard error it was chosen for."""
    ev = _study_settings(Path(study)).get("evaluator") or {}
    c = ev.get("config") if ev.get("kind") == "proxy" else None
    if not c:
        return None
    size = (f"{c.get('max_eval')} {c.get('task')} dev examples" if c.get("task")
            else f"{c.get('eval_blocks')} held-out MLM blocks")
    return size + (f", chosen for a standard error of {c['target_se']:g} (--target-se)" if c.get("target_se")
                   else " (pass --target-se to choose it for a standard error)")


def _print_summary(s: dict) -> None:
    print(f"study {s['study']}: {s['evaluated']} evaluated, {s['failed']} failed, "
          f"{s['duplicates']} duplicates (not evaluated), {s['illegal']} illegal graphs rejected"
          + (f", after a supernet warm-up of {s['warmup_children']} children" if s.get("warmup_children") else ""))
    if s.get("held_out"):
        print(f"scored on {s['held_out']}")
    if s.get("score_se") is not None:
        print(f"one evaluation's standard error (median over candidates): {s['score_se']:.4f}; scores closer "
              f"than about twice that are not told apart")
    if s.get("rescored"):
        print("re-scored from the final supernet (mean +- standard error over seeds; score during the search):")
        for r in s["rescored"]:
            print(f"    {r['score']:.4f} +- {r['se']:.4f} ({r['seeds']} seeds; {r['search_score']:.4f})  "
                  f"candidate {r['id']}: " + " | ".join(r["layers"]))
        print("best by re-scored mean: candidate " + str(s["rescored"][0]["id"]) + "; by search score:")
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
    if args.plot:
        plots.check_plot_path(args.plot)
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


def check_model_folder(out) -> Path:
    """An output folder for save_pretrained: ConfigError when the path is an existing file
    (transformers only logs that and writes nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", hint="give a folder for the model")
    return out


def _export(args) -> int:
    from . import opnas
    from .study import Study
    load_ops(args)
    check_model_folder(args.out)

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
    from attnc.runtime.data import load_tokenizer
    # the proxy's tokenizer as the study recorded it (None: the default uncased vocabulary)
    spec = (state.get("config") or {}).get("tokenizer") if isinstance(state, dict) else None
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        tok = None
        print(f"warning: the study's tokenizer {spec} cannot be loaded ({e}): no tokenizer was saved",
              file=sys.stderr)
    if tok is not None and len(tok) == model.config.vocab_size:
        tok.save_pretrained(args.out)
        source += ", with the tokenizer"
    elif tok is not None:
        print(f"warning: the model's vocabulary ({model.config.vocab_size}) is not the tokenizer's "
              f"({len(tok)}): no tokenizer was saved", file=sys.stderr)
    print(f"exported rank {args.rank} (score {ranked[args.rank - 1].score:.4f}) to {args.out} ({source})")
    return 0


def _fidelity_architectures(args) -> list:
    from . import opnas, proxy_fidelity

    ffn = args.ffn or 4 * args.hidden
    if args.archs:
        return proxy_fidelity.read_architectures(args.archs, args.hidden, ffn, args.heads)
    if args.sample is not None:
        if args.sample < 3:
            raise ConfigError(f"--sample needs at least 3 architectures, got {args.sample}")
        space = opnas.Space(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=ffn,
                            num_heads=args.heads)
        return proxy_fidelity.sample_architectures(space, args.sample, args.seed)
    ranked = opnas.open_result(args.study).top(10 ** 9)
    if len(ranked) < 3:
        raise DataError(f"the study {args.study} has {len(ranked)} evaluated architectures; need at least 3")
    k = min(args.top, len(ranked) // 2)
    return [e.architecture for e in ranked[:k] + ranked[len(ranked) - k:]]


def _fidelity(args) -> int:
    from . import proxy_fidelity

    load_ops(args)
    if args.plot:
        from . import plots
        plots.check_plot_path(args.plot)
    archs = _fidelity_architectures(args)
    evaluators = {spec: load_evaluator(spec) for spec in args.evaluator}
    proxy = {"seq_len": args.seq_len, "batch_size": args.batch_size, "eval_blocks": args.eval_blocks,
             "device": args.device, "seed": args.seed}
    if args.lr is not None:
        proxy["lr"] = args.lr
    if args.vocab is not None:
        from attnc.runtime.demo import demo_tokenizer
        proxy["tokenizer"] = str(demo_tokenizer(args.vocab))
    cfg = proxy_fidelity.FidelityConfig(truth_steps=args.truth_steps, truth_seeds=args.truth_seeds,
                                        shared_steps=args.shared_steps, warmup_children=args.warmup_children,
                                        warmup_steps=args.warmup_steps,
                                        biws=not args.no_biws, scratch=not args.no_scratch,
                                        bootstrap=args.bootstrap, seed=args.seed, proxy=proxy)
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = proxy_fidelity.fidelity(archs, args.out, cfg, evaluators=evaluators, progress=say,
                                     workers=args.workers, ops_modules=args.ops_modules)
    if args.plot:
        proxy_fidelity.plot(result, args.plot)
        result["plot"] = args.plot
    Path(args.out, "fidelity.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(proxy_fidelity.format_result(result)))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
