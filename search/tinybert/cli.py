"""`attnc search superplm train|search|extract|report` and `attnc search latency` (this module prints).

    attnc search superplm train --out runs/sp --steps 1000
    attnc search latency --samples 300 --max-layers 4 --max-hidden 256 --max-ffn 1024 --max-heads 4 --out runs/lat
    attnc search superplm search --supernet runs/sp --latency-model runs/lat --speedup 10 --out runs/evo
    attnc search superplm report runs/evo --plot runs/evo/search.png
    attnc search superplm extract --study runs/evo --rank 1 --out runs/best --train-steps 200

Only argparse work at import time: the heavy modules load inside the command functions.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SEARCH_FILE = "search.json"
HELDOUT_MAX = 64   # MLMData's default eval_blocks, which `superplm train` uses


def register(sub) -> None:
    """Add the AutoTinyBERT subcommands to `attnc search`'s subparsers."""
    top = sub.add_parser("superplm", help="AutoTinyBERT: train a SuperPLM, search it under a latency "
                                          "target, extract sub-models",
                         description="AutoTinyBERT (ACL 2021): one-shot SuperPLM training, evolutionary "
                                     "search under a latency window, extraction of the found models.")
    ssub = top.add_subparsers(dest="superplm_command", metavar="SUBCOMMAND")
    ssub.required = True

    # train.py imports torch at its top, and every `attnc` command builds this parser: the train
    # options are parsed by _train itself (with add_train_arguments), so this subparser takes
    # everything after `train` as it is ('+' as its only prefix makes argparse leave "--x" alone).
    p = ssub.add_parser("train", help="batch-wise SuperPLM training (Algorithm 1); --help for its options",
                        add_help=False, prefix_chars="+")
    p.add_argument("train_args", nargs="...", help="see `attnc search superplm train --help`")
    p.set_defaults(func=_train)

    p = ssub.add_parser("search", help="evolutionary search (Algorithm 2) or AutoTinyBERT-Fast",
                        description="Search the SuperPLM's sub-models whose predicted latency, with the "
                                    "predictor's safety margin, is at most the target (or lies in a --window); "
                                    "fitness = minus the held-out MLM (mlm SuperPLM) or distillation (kd) loss "
                                    "read from the SuperPLM, or a short fine-tune (--fitness finetune:TASK). "
                                    "The best architectures are then timed side by side with BERT-base: one "
                                    "that misses the target is reported as missing. The study (OUT/study.db) "
                                    "holds every candidate; --resume continues it.")
    p.add_argument("--supernet", required=True, metavar="DIR", help="a `superplm train --out` folder")
    p.add_argument("--latency-model", required=True, metavar="DIR", help="an `attnc search latency --out` folder")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--speedup", type=float, metavar="X",
                   help="target = BERT-base latency (measured here, with the predictor's settings) / X")
    t.add_argument("--latency-ms", type=float, metavar="T", help="target latency in milliseconds")
    p.add_argument("--generations", type=int, default=4, help="T: evolved generations after the random one")
    p.add_argument("--population", type=int, default=25, help="S")
    p.add_argument("--pm", type=float, default=0.5, help="mutation probability per field")
    p.add_argument("--pe", type=float, default=0.5, help="exploration probability per child")
    p.add_argument("--mutation", choices=("local", "uniform"), default="local",
                   help="local (default): each mutated field moves 1-2 grid steps; uniform: redrawn over its range")
    p.add_argument("--margin", default="auto", metavar="auto|F",
                   help="safety margin of the latency limit (predicted x (1 + F) <= target); auto (default): "
                        "the predictor's, from its held-out under-prediction")
    p.add_argument("--window", metavar="LO,HI",
                   help="instead of the limit: predicted latency in [LO, HI] x the target (the paper's "
                        "sampling window is 0.85,1.1)")
    p.add_argument("--verify", type=int, default=3, metavar="K",
                   help="time the K best architectures side by side with BERT-base on the predictor's target "
                        "(default 3; 0: skip)")
    p.add_argument("--fitness", default=None, metavar="mlm|kd|finetune:TASK",
                   help="the score (default: by how the SuperPLM was trained: mlm or kd); finetune:TASK "
                        "fine-tunes each sub-model on rt-polarity, bbc-topic or glue/NAME (--data-dir)")
    f = p.add_argument_group("--fitness finetune:TASK")
    f.add_argument("--data-dir", metavar="DIR", help="GLUE-format folder for glue/* tasks")
    f.add_argument("--finetune-steps", type=int, default=100)
    f.add_argument("--finetune-lr", type=float, default=5e-4)
    f.add_argument("--finetune-batch-size", type=int, default=32)
    f.add_argument("--finetune-max-len", type=int, default=64)
    f.add_argument("--max-train", type=int, default=2000, help="training examples used (0: all)")
    f.add_argument("--max-eval", type=int, default=500, help="dev examples scored (0: all)")
    f.add_argument("--device", default="auto", help="fine-tuning device: auto | cpu | cuda[:N]")
    p.add_argument("--fast", action="store_true",
                   help="AutoTinyBERT-Fast: one rule-built candidate per layer count instead of evolution")
    p.add_argument("--seed", type=int, default=0)
    _data_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the study in OUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="FILE", help="latency-vs-score and per-generation plot (PNG/PDF)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=_search)

    p = ssub.add_parser("extract", help="a sub-model as a Hugging Face folder (optionally trained further)",
                        description="Cut an architecture's weights from the SuperPLM, optionally train it "
                                    "further (MLM, the training core), and save_pretrained it with its "
                                    "config and tokenizer.")
    p.add_argument("--supernet", metavar="DIR", help="SuperPLM folder (default: the study's)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--arch", metavar="L-dm-df-h-dqkv")
    w.add_argument("--rank", type=int, metavar="K", help="the K-th best architecture of --study")
    p.add_argument("--study", metavar="DIR", help="a `superplm search --out` folder (with --rank)")
    p.add_argument("--train-steps", type=int, default=0, metavar="N",
                   help="further training steps (default 0): MLM for an mlm SuperPLM, distillation from its "
                        "teacher for a kd one")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the further training")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="device of the further training: auto | cpu | cuda[:N]")
    p.add_argument("--format", choices=("auto", "bert", "attnc"), default="auto",
                   help="auto (default): a vanilla BERT folder (model_type bert, no `import attnc` needed) when "
                        "the architecture is one (qkv size = hidden size), else attnc_bert; bert: refuse otherwise")
    _data_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", required=True, metavar="MODEL")
    p.set_defaults(func=_extract)

    p = ssub.add_parser("report", help="best architectures, Pareto front and plots of a search study",
                        description="Summarise a `superplm search` study: best architectures, the Pareto "
                                    "front of latency vs score, per-generation scores; optional plot.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE")
    p.set_defaults(func=_report)

    p = sub.add_parser("latency", help="measure architectures' latencies and fit the latency predictor",
                       description="Collect (resumable) measured latencies of random architectures of a "
                                   "space on this machine and fit an MLP latency predictor.")
    add_latency_arguments(p)
    p.set_defaults(func=cli_latency)


def _data_arguments(p) -> None:
    g = p.add_argument_group("held-out data (default: the SuperPLM's training settings)")
    g.add_argument("--corpus", default=None, help="wiki-sample | bbc-news | a local text path")
    g.add_argument("--seq-len", type=int, default=None)
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of the held-out split (default: the SuperPLM's training seed)")
    g.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks scored per architecture")


def _train(args) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="attnc search superplm train",
                                description="Train a SuperPLM with batch-wise sub-model sampling (Algorithm 1; "
                                            "one process or torchrun); writes OUT/supernet.")
    add_train_arguments(p)
    return cli_train(p.parse_args(args.train_args))


# --- train and latency: their options and commands ----------------------------------------------------

def add_train_arguments(p) -> None:
    """Arguments of `attnc search superplm train` (imports the trainer, hence torch)."""
    from attnc.runtime import trainer as T

    from .train import OBJECTIVES

    p.add_argument("--out", required=True, help="output folder: OUT/supernet (weights + space), checkpoints, metrics")
    g = p.add_argument_group("search space (the SuperPLM is its largest architecture)")
    g.add_argument("--max-layers", type=int, default=4)
    g.add_argument("--max-hidden", type=int, default=256)
    g.add_argument("--max-ffn", type=int, default=1024)
    g.add_argument("--max-heads", type=int, default=4, help="kd mode: ignored, the teacher's head count")
    g.add_argument("--min-layers", type=int, default=1)
    g.add_argument("--min-hidden", type=int, default=32, help="smallest hidden size sampled (a multiple of 4)")
    g.add_argument("--min-ffn", type=int, default=32, help="smallest FFN size sampled (a multiple of 4)")
    g.add_argument("--head-dim", type=int, default=None,
                   help="per-head width (default 64; kd mode: max qkv / heads, default the teacher's)")
    g.add_argument("--mode", choices=OBJECTIVES, default="mlm",
                   help="mlm: MLM pre-training (MHA strategy 1); kd: distillation from --teacher (strategy 2)")
    g.add_argument("--teacher", default="minilm-l6",
                   help="kd teacher: minilm-l6 or a Hugging Face encoder folder (BERT, RoBERTa, ELECTRA, ...)")
    g.add_argument("--formula", default=None, help="one attention formula for every layer (default standard)")
    d = p.add_argument_group("data and training")
    d.add_argument("--corpus", default="wiki-sample", help="wiki-sample | bbc-news | a local text path")
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--batch-size", type=int, default=32, help="global batch (all sub-batches, all processes)")
    d.add_argument("--sub-batches", type=int, default=4, help="N of Algorithm 1 (1: one sub-model per batch)")
    d.add_argument("--samples", type=int, default=1, help="M: sub-models per sub-batch")
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--eval-every", type=int, default=None)
    d.add_argument("--checkpoint-every", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--precision", choices=tuple(T.PRECISIONS), default="fp32")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--json", action="store_true", help="print the metrics summary as JSON")


def _space_from_args(args, teacher):
    from .space import Space

    kw = dict(max_layers=args.max_layers, max_hidden=args.max_hidden, max_ffn=args.max_ffn,
              min_layers=args.min_layers, min_hidden=args.min_hidden, min_ffn=args.min_ffn,
              mode=args.mode, formula=args.formula)
    if args.mode == "kd":
        tc = teacher.config
        kw["max_heads"] = tc.num_attention_heads
        kw["head_dim"] = args.head_dim or tc.hidden_size // tc.num_attention_heads
        kw["vocab_size"] = tc.vocab_size
    else:
        kw["max_heads"] = args.max_heads
        if args.head_dim is not None:
            kw["head_dim"] = args.head_dim
    return Space(**kw)


def cli_train(args) -> int:
    """`attnc search superplm train`: returns the exit status; prints the summary (rank 0)."""
    import torch

    from attnc.compiler.errors import ConfigError
    from attnc.runtime import data as D
    from attnc.runtime import trainer as T
    from attnc.runtime.train import load_teacher

    from .supernet import SuperPLM
    from .train import (SUPERNET_DIR, SuperTrainConfig, _dist_env, _mean, new_fit_layer, save_superplm,
                        train_superplm)

    rank, world = _dist_env()
    out = Path(args.out)
    teacher = load_teacher(args.teacher) if args.mode == "kd" else None
    space = _space_from_args(args, teacher)
    tok = D.load_tokenizer()
    if args.mode == "mlm" and len(tok) > space.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens, the space's vocabulary {space.vocab_size}")
    blocks = D.cached_blocks(args.corpus, tok, args.seq_len, progress=not args.no_progress and rank == 0)
    data = T.MLMData(blocks, tok)
    cfg = SuperTrainConfig(steps=args.steps, batch_size=args.batch_size, sub_batches=args.sub_batches,
                           samples=args.samples, lr=args.lr, seed=args.seed, objective=args.mode,
                           eval_every=args.eval_every, checkpoint_dir=str(out / "checkpoints"),
                           checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device,
                           precision=args.precision)
    torch.manual_seed(args.seed)   # the SuperPLM's init (identical on every rank)
    supernet = SuperPLM(space)
    fit = new_fit_layer(space, teacher, args.seed) if teacher is not None else None
    metrics = train_superplm(supernet, data, cfg, teacher=teacher, fit=fit, progress=not args.no_progress)
    recipe = {"objective": cfg.objective, "corpus": args.corpus, "seq_len": args.seq_len, "seed": args.seed,
              "eval_blocks": len(data.eval_idx), "teacher": args.teacher if teacher is not None else None}
    summary = {"out": str(out / SUPERNET_DIR), "space": space.to_json(), "steps": metrics["steps"],
               "world_size": metrics["world_size"], "sub_batches": cfg.sub_batches, "samples": cfg.samples,
               "objective": cfg.objective, "seconds": round(metrics["seconds"], 2),
               "loss_first10": _mean(metrics["losses"][:10]), "loss_last10": _mean(metrics["losses"][-10:]),
               "final_eval": metrics["final_eval"], "resumed_from": metrics["resumed_from"], "recipe": recipe}
    if rank == 0:
        save_superplm(supernet, out, metrics=metrics, recipe=recipe, fit=fit)
        (out / "superplm_train.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            kind = "distillation" if cfg.objective == "kd" else "MLM"
            print(f"trained SuperPLM {space.max_arch} ({cfg.objective}, N={cfg.sub_batches}, M={cfg.samples}, "
                  f"{world} process(es)): {metrics['steps']} steps in {summary['seconds']} s, "
                  f"loss {summary['loss_first10']:.3f} -> {summary['loss_last10']:.3f}, held-out {kind} loss "
                  f"of {space.max_arch}: {metrics['final_eval']['loss']:.3f}")
            print(f"saved to {out / SUPERNET_DIR} (load with attnc.search.tinybert.train.load_superplm)")
    return 0


def add_latency_arguments(p) -> None:
    """The options of `attnc search latency` (plain argparse: no torch at import)."""
    from .latency import TARGETS
    from .space import Space

    p.add_argument("--out", required=True, metavar="DIR",
                   help="dataset + predictor folder (an existing one resumes / extends its dataset)")
    p.add_argument("--samples", type=int, default=300, help="architectures to measure (default 300)")
    d = Space()
    p.add_argument("--max-layers", type=int, default=d.max_layers)
    p.add_argument("--max-hidden", type=int, default=d.max_hidden)
    p.add_argument("--max-ffn", type=int, default=d.max_ffn)
    p.add_argument("--max-heads", type=int, default=d.max_heads)
    p.add_argument("--min-layers", type=int, default=d.min_layers)
    p.add_argument("--min-hidden", type=int, default=None,
                   help="smallest hidden size (default: 128 when --max-hidden >= 768, as the paper; else 32)")
    p.add_argument("--min-ffn", type=int, default=None, help="smallest FFN size (default: as --min-hidden)")
    p.add_argument("--min-qkv", type=int, default=None,
                   help="smallest qkv width (default: kd 180 when --max-hidden >= 768, as the paper; else the smallest)")
    p.add_argument("--mode", choices=("mlm", "kd"), default=d.mode)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--formula", default=None, help="one attention formula for every layer (default: standard)")
    p.add_argument("--device", default="cpu", help="cpu (default, the paper's target), cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per arch (the median is kept)")
    p.add_argument("--interleave", type=int, default=16,
                   help="archs timed together, with a reference arch, so that machine drift hits them alike "
                        "(default 16; they are all in memory at once)")
    p.add_argument("--timing", choices=("back-to-back", "round-robin"), default="back-to-back",
                   help="back-to-back (default): each arch's runs consecutive, in blocks taking turns, as a user "
                        "times one model; round-robin: one run per arch in turn (cold caches: slower small models)")
    p.add_argument("--design", choices=("edges", "uniform"), default="edges",
                   help="which archs are timed: edges (default: the space's corners, then samples biased to "
                        "each field's maximum and minimum, where a search under a limit goes) or uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2000, help="predictor training epochs (full batch)")
    p.add_argument("--target", choices=TARGETS, default="log", help="fit log(ms) (default) or ms")
    p.add_argument("--bert-base", action="store_true",
                   help="also measure (and cache) BERT-base on the same target, for --speedup")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def cli_latency(args) -> int:
    """`attnc search latency`: collect (resuming), fit, save, print held-out errors."""
    from .latency import (BERT_BASE, META, PREDICTOR, LatencyPredictor, bert_base_latency_ms, collect,
                          load_records)
    from .space import Space

    space = Space(max_layers=args.max_layers, max_hidden=args.max_hidden, max_ffn=args.max_ffn,
                  max_heads=args.max_heads, min_layers=args.min_layers, min_hidden=args.min_hidden,
                  min_ffn=args.min_ffn, min_qkv=args.min_qkv, mode=args.mode, head_dim=args.head_dim,
                  vocab_size=args.vocab_size, formula=args.formula)
    before = len(load_records(args.out)) if (Path(args.out) / META).exists() else 0
    records = collect(space, args.samples, args.out, device=args.device, threads=args.threads,
                      batch=args.batch, seq=args.seq, warmup=args.warmup, repeats=args.repeats,
                      seed=args.seed, interleave=args.interleave, timing=args.timing, design=args.design,
                      progress=not args.no_progress)
    pred, m = LatencyPredictor.fit(space, records, epochs=args.epochs, seed=args.seed, target=args.target,
                                   seq=args.seq, settings={"device": args.device, "threads": args.threads,
                                                           "batch": args.batch, "seq": args.seq,
                                                           "warmup": args.warmup, "repeats": args.repeats,
                                                           "timing": args.timing})
    pred.save(args.out)
    out = {"out": str(args.out), "samples": len(records), "measured_now": max(len(records) - before, 0),
           **{k: m[k] for k in ("n_train", "n_heldout", "rmse_ms", "mape_pct", "target", "drift_corrected",
                                "safety_margin")},
           "mean_predictor": m["mean_predictor"], "linear": m["linear"], "raw": m["raw"]}
    if args.bert_base:
        out["bert_base_ms"] = bert_base_latency_ms(args.device, args.threads, args.batch, args.seq,
                                                   warmup=args.warmup, repeats=args.repeats, folder=args.out,
                                                   timing=args.timing)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{len(records)} architectures in {args.out} ({out['measured_now']} measured now; "
          f"{args.device}, {args.threads} thread(s), batch {args.batch}, seq {args.seq})")
    if m["rmse_ms"] is None:
        print("no held-out split (all archs trained)")
    else:
        mp = m["mean_predictor"]
        print(f"held-out ({m['n_heldout']} archs): RMSE {m['rmse_ms']:.3f} ms, MAPE {m['mape_pct']:.2f}%   "
              f"| mean predictor: RMSE {mp['rmse_ms']:.3f} ms, MAPE {mp['mape_pct']:.2f}%")
        if m["drift_corrected"]:
            print(f"(latencies rescaled by the reference arch timed in each group; against the "
                  f"unscaled measurements: MAPE {m['raw']['mape_pct']:.2f}%)")
        if m.get("safety_margin") is not None:
            print(f"safety margin for a latency limit: {100 * m['safety_margin']:.1f}% (the 95th percentile of "
                  f"the held-out under-prediction; `superplm search --margin auto` uses it)")
    if "bert_base_ms" in out:
        print(f"BERT-base ({BERT_BASE}): {out['bert_base_ms']:.2f} ms")
    print(f"predictor saved to {args.out}/{PREDICTOR}")
    return 0


# --- search ------------------------------------------------------------------------------------------


def train_settings(supernet_dir) -> dict:
    """How a SuperPLM was trained (objective, corpus, seq_len, seed, teacher): its recipe.json. A
    SuperPLM saved before recipes existed records only its objective (in train_metrics.json; an
    unreadable file counts as unrecorded)."""
    from .train import METRICS_FILE, _supernet_root, load_recipe

    found = {k: v for k, v in load_recipe(supernet_dir).items() if v is not None}
    metrics = _supernet_root(supernet_dir) / METRICS_FILE
    if "objective" not in found and metrics.is_file():
        try:
            objective = json.loads(metrics.read_text()).get("objective")
        except ValueError:
            objective = None
        if objective is not None:
            found["objective"] = objective
    return found


def heldout_data(supernet_dir, args, tokenizer):
    """Held-out blocks of the SuperPLM's corpus: the eval split the training core's MLMData makes
    with the training seed (so no architecture is scored on text the SuperPLM was trained on)."""
    from attnc.runtime.data import cached_blocks
    from attnc.runtime.trainer import MLMData

    from attnc.compiler.errors import ConfigError

    if not 1 <= args.eval_blocks <= HELDOUT_MAX:
        raise ConfigError(f"--eval-blocks must be in 1..{HELDOUT_MAX}, got {args.eval_blocks}",
                          hint=f"the SuperPLM's training holds out the first {HELDOUT_MAX} blocks of its split; "
                               "more would score architectures on text it trained on")
    rec = train_settings(supernet_dir)
    corpus = args.corpus or rec.get("corpus", "wiki-sample")
    seq_len = args.seq_len or rec.get("seq_len", 128)
    seed = args.data_seed if args.data_seed is not None else rec.get("seed", 0)
    blocks = cached_blocks(corpus, tokenizer, int(seq_len), progress=not args.no_progress)
    data = MLMData(blocks, tokenizer, eval_blocks=args.eval_blocks)
    data.split(int(seed))
    return data, {"corpus": corpus, "seq_len": int(seq_len), "data_seed": int(seed),
                  "eval_blocks": int(len(data.eval_idx))}


def target_latency(args, predictor, latency_dir) -> tuple[float, dict]:
    from attnc.compiler.errors import ConfigError

    if args.latency_ms is not None:
        return float(args.latency_ms), {"latency_ms": float(args.latency_ms)}
    if not args.speedup > 0:
        raise ConfigError(f"--speedup must be positive, got {args.speedup}")
    s = predictor.settings
    if not s:
        raise ConfigError(f"the predictor in {latency_dir} records no measurement settings, so BERT-base "
                          "cannot be timed like it", hint="give the target with --latency-ms")
    from .latency import bert_base_latency_ms
    # the cached `attnc search latency --bert-base` value when its warmup / repeats were recorded
    base = bert_base_latency_ms(s["device"], s["threads"], s["batch"], s["seq"], folder=latency_dir,
                                warmup=s.get("warmup", 3), repeats=s.get("repeats", 10),
                                timing=s.get("timing") or "back-to-back")
    return base / args.speedup, {"speedup": float(args.speedup), "bert_base_ms": base,
                                 "measured_on": dict(s)}


def _search(args) -> int:
    from attnc.compiler.errors import ConfigError

    out = Path(args.out)
    db = out / "study.db"
    if db.exists() and not args.resume:
        raise ConfigError(f"{db} exists", hint="pass --resume to continue it, or choose another --out")
    if args.resume and not db.exists():
        raise ConfigError(f"nothing to resume: no study at {db}")
    if args.plot:
        from ..plots import check_plot_path
        check_plot_path(args.plot)
    if args.verify < 0:
        raise ConfigError(f"--verify must be >= 0, got {args.verify}")

    from attnc.runtime.data import load_tokenizer

    from . import report
    from .evolve import EvolutionConfig, fast_search, search
    from .fitness import fitness_identity
    from .latency import LatencyPredictor
    from .train import load_superplm

    predictor = LatencyPredictor.load(args.latency_model)
    supernet = load_superplm(args.supernet)
    space = supernet.space
    check_predictor_fits(predictor, space, args.latency_model)
    target, target_info = target_latency(args, predictor, Path(args.latency_model))
    cfg = EvolutionConfig(target_ms=target, generations=args.generations, population=args.population,
                          pm=args.pm, pe=args.pe, seed=args.seed, mutation=args.mutation,
                          **constraint_options(args, predictor))
    tok = load_tokenizer()
    data, data_info = heldout_data(args.supernet, args, tok)
    fitness = make_fitness(supernet, args.supernet, data.tensor[data.eval_idx], tok, args)
    meta = {"supernet": str(Path(args.supernet).resolve()), "latency_model": str(Path(args.latency_model).resolve()),
            "heldout": data_info, "fitness": fitness_identity(fitness)}
    run = fast_search if args.fast else search
    fresh = not db.exists()
    try:
        result = run(space, fitness, predictor.predict, cfg, study=db, progress=not args.no_progress, meta=meta)
    except Exception:
        # a search that stopped before its first score (e.g. an empty latency window) leaves nothing
        # to resume: remove its study so that the corrected command can run in the same --out
        if fresh and db.exists() and _nothing_scored(db):
            for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                f.unlink(missing_ok=True)
        raise
    verification = verify_result(result, predictor, target, target_info, args.verify)
    summary = report.summary(result, verification=verification)
    summary["target"] = target_info
    summary["fitness"] = repr(fitness)
    if args.plot:
        report.save_plot(result, args.plot)
        summary["plot"] = str(args.plot)
    (out / SEARCH_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _print(summary, args.json)
    return 0


def constraint_options(args, predictor) -> dict:
    """EvolutionConfig's constraint, margin and window from --window / --margin."""
    from attnc.compiler.errors import ConfigError

    if args.window is not None:
        try:
            lo, hi = (float(x) for x in args.window.split(","))
        except ValueError:
            raise ConfigError(f"bad --window {args.window!r}", hint="write LO,HI, e.g. 0.85,1.1") from None
        if args.margin != "auto":
            raise ConfigError("--margin applies to the latency limit, not to a --window", hint="drop one of them")
        return {"constraint": "window", "window": (lo, hi)}
    if args.margin == "auto":
        margin = predictor.safety_margin
        if margin is None:
            raise ConfigError(f"the latency predictor in {args.latency_model} records no held-out error, so no "
                              "safety margin can be derived from it",
                              hint="refit it with a held-out split (attnc search latency), or give --margin F")
    else:
        try:
            margin = float(args.margin)
        except ValueError:
            raise ConfigError(f"bad --margin {args.margin!r}", hint="auto, or a fraction such as 0.04") from None
    return {"constraint": "limit", "margin": margin}


def verify_result(result, predictor, target: float, target_info: dict, k: int) -> dict:
    """Time the k best scored architectures side by side with BERT-base on the predictor's target,
    built as the predictor's dataset built them (latency.verify_archs); those that miss the target
    are reported as missing. A predictor that records no measurement settings cannot be checked like
    it: the result says so."""
    if k == 0:
        return {"status": "skipped", "reason": "--verify 0"}
    if not predictor.settings:
        return {"status": "skipped", "reason": "the latency predictor records no measurement settings "
                                               "(device, threads, batch, seq), so nothing can be timed like it"}
    from .latency import verify_archs

    top = result.top(k)
    if not top:
        return {"status": "skipped", "reason": "nothing was scored"}
    v = verify_archs(predictor.space, [r.arch for r in top], target_ms=target, speedup=target_info.get("speedup"),
                     settings=predictor.settings, predicted=[r.latency_ms for r in top])
    return {"status": "measured", **v}


def _nothing_scored(db: Path) -> bool:
    from .study import Study

    st = Study(db)
    try:
        return not any(r.status != "pending" for r in st.rows())
    finally:
        st.close()


def check_predictor_fits(predictor, space, latency_dir) -> None:
    """The predictor must cover the SuperPLM's space and time the same attention formula."""
    from attnc.compiler.errors import ConfigError

    if space.max_arch not in predictor.space:
        raise ConfigError(f"the latency predictor's space does not hold the SuperPLM {space.max_arch}: "
                          f"predictor maxima {predictor.space.max_arch}",
                          hint="fit a predictor over a space at least as large (attnc search latency --max-...)")
    if _canonical(predictor.space.formula) != _canonical(space.formula):
        raise ConfigError(f"the latency predictor in {latency_dir} was fitted for the formula "
                          f"{predictor.space.formula or 'standard attention'!r}, the SuperPLM uses "
                          f"{space.formula or 'standard attention'!r}",
                          hint="fit a predictor with the SuperPLM's formula (attnc search latency --formula ...)")


def _canonical(formula):
    if formula is None:
        return None
    from attnc.compiler.api import analyze
    return analyze(formula).canonical


def make_fitness(supernet, supernet_dir, blocks, tok, args=None):
    """The fitness of a SuperPLM's sub-models (fitness.py): --fitness, by default by how the
    SuperPLM was trained: minus the held-out MLM loss (mlm), or minus the held-out distillation loss
    against its teacher through its fit layer (kd, whose MLM head is never trained)."""
    from attnc.compiler.errors import ConfigError

    from .evolve import SuperPLMDistillFitness, SuperPLMFitness
    from .fitness import FinetuneConfig, FinetuneFitness, parse_fitness

    rec = train_settings(supernet_dir)
    objective = rec.get("objective") or ("kd" if supernet.space.mode == "kd" else "mlm")
    spec = getattr(args, "fitness", None) or objective
    kind, task = parse_fitness(spec)
    if kind == "finetune":
        return FinetuneFitness(supernet, FinetuneConfig(
            task=task, data_dir=args.data_dir, steps=args.finetune_steps, lr=args.finetune_lr,
            batch_size=args.finetune_batch_size, max_len=args.finetune_max_len, max_train=args.max_train or None,
            max_eval=args.max_eval or None, seed=args.seed, device=args.device), tok)
    if kind != objective:
        raise ConfigError(f"--fitness {kind} needs a SuperPLM trained with --mode {kind}; this one was trained "
                          f"with {objective}" + (" (its MLM head was never trained)" if objective == "kd" else
                                                 " (it has no teacher or distillation fit layer)"),
                          hint=f"use --fitness {objective} or finetune:TASK")
    if kind == "mlm":
        return SuperPLMFitness(supernet, blocks, tok)
    from attnc.runtime.train import load_teacher

    from .train import load_fit_layer

    teacher = load_teacher(rec.get("teacher") or "minilm-l6")
    return SuperPLMDistillFitness(supernet, blocks, teacher, load_fit_layer(supernet_dir, supernet.space, teacher), tok)


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    lo, hi = summary["window_ms"]
    tgt = summary.get("target") or {}
    how = (f", BERT-base {tgt['bert_base_ms']:.2f} ms / {tgt['speedup']:g}" if "speedup" in tgt else "")
    if summary.get("constraint", "window") == "window":
        rule = f"window {lo:.3f}-{hi:.3f} ms"
    else:
        rule = (f"limit: predicted latency <= {hi:.3f} ms (safety margin {100 * summary['margin']:.1f}%)")
    print(f"{summary['algorithm']} search, study {summary['study']}: target {summary['target_ms']:.3f} ms{how}, "
          f"{rule}; {summary['evaluated']} architectures scored, {summary['failed']} failed")
    for g in summary["generations"]:
        if g["best"] is not None:
            print(f"  generation {g['generation']}: {g['size']} members ({g['new']} new), "
                  f"best {g['best']:.4f}, median {g['median']:.4f}")
    measured = {r["arch"]: r for r in (summary.get("verification") or {}).get("archs", [])}
    for rank, r in enumerate(summary["top"], 1):
        m = measured.get(r["arch"])
        check = "" if m is None else (f"  measured {m['measured_ms']:.3f} ms, {m['measured_speedup']:.2f}x BERT-base"
                                      + ("" if m["meets"] else "  MISSES THE TARGET"))
        print(f"#{rank}  {r['arch']:<22} score {r['score']:.4f}  predicted {r['latency_ms']:.3f} ms  "
              f"(generation {r['generation']}, {r['origin']}){check}")
    v = summary.get("verification") or {}
    if v.get("status") == "measured":
        print(f"timed side by side with BERT-base ({v['bert_base_ms']:.2f} ms): found {len(v['found'])} "
              f"({', '.join(v['found']) or 'none'}), missing {len(v['missing'])} ({', '.join(v['missing']) or 'none'})")
        print(f"best found: {summary['best'] or 'none: every timed architecture missed the target'}")
    elif v:
        print(f"not timed ({v.get('reason')}): the latencies above are predictions")
    if summary.get("plot"):
        print(f"plot: {summary['plot']}")


def _report(args) -> int:
    from . import report
    from .evolve import open_result

    if args.plot:
        from ..plots import check_plot_path
        check_plot_path(args.plot)
    result = open_result(args.dir)
    summary = report.summary(result, top=args.top, verification=_stored_verification(args.dir))
    if args.plot:
        report.save_plot(result, args.plot)
        summary["plot"] = str(args.plot)
    _print(summary, args.json)
    return 0


def _stored_verification(folder) -> dict | None:
    """The verification `superplm search` wrote to its search.json (None when there is none)."""
    f = Path(folder) / SEARCH_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("verification")
    except ValueError:
        return None


# --- extract -----------------------------------------------------------------------------------------


def _extract(args) -> int:
    from attnc.compiler.errors import ConfigError, DataError

    from ..cli import check_model_folder
    from .space import Arch

    check_model_folder(args.out)

    supernet_dir = args.supernet
    if args.rank is not None:
        if not args.study:
            raise ConfigError("--rank needs --study DIR (a `superplm search --out` folder)")
        from .evolve import open_result
        from .study import Study, study_file
        result = open_result(args.study)
        ranked = result.top(len(result.scored))
        if not 1 <= args.rank <= len(ranked):
            raise DataError(f"rank {args.rank} out of range: the study has {len(ranked)} scored architectures")
        arch = Arch.parse(ranked[args.rank - 1].arch)
        if supernet_dir is None:
            st = Study(study_file(args.study))
            try:
                supernet_dir = st.meta().get("supernet")
            finally:
                st.close()
    else:
        arch = Arch.parse(args.arch)
    if supernet_dir is None:
        raise ConfigError("no SuperPLM given", hint="pass --supernet DIR")
    if args.train_steps < 0:
        raise ConfigError(f"--train-steps must be >= 0, got {args.train_steps}")

    from attnc.runtime.data import load_tokenizer

    from .train import load_superplm

    supernet = load_superplm(supernet_dir)
    supernet.space.validate(arch)
    model = supernet.extract(arch)
    if args.format == "bert":   # refuse before any training: nothing done is lost
        from attnc.runtime.modeling import bert_incompatibility
        why = bert_incompatibility(model.config)
        if why is not None:
            raise ConfigError(f"{arch} cannot be exported as a vanilla BERT: {why}",
                              hint="use --format auto (an attnc_bert folder, loads after `import attnc`)")
    supernet_space = supernet.space
    supernet_mode = supernet_space.mode
    del supernet
    tok = load_tokenizer()
    info = {"arch": str(arch), "supernet": str(supernet_dir), "out": str(args.out), "train_steps": args.train_steps}
    if args.train_steps > 0:
        from attnc.runtime.trainer import TrainConfig, train, resolve_device
        resolve_device(args.device)   # an unknown or absent device is a ConfigError before any data work
        data, data_info = heldout_data(supernet_dir, args, tok)
        rec = train_settings(supernet_dir)
        kd = (rec.get("objective") or ("kd" if supernet_mode == "kd" else "mlm")) == "kd"
        teacher = distill = fit = None
        if kd:   # the MLM head of a kd SuperPLM is untrained: train further as it was trained, from
            # its distillation fit layer (the columns of this sub-model's width)
            import torch

            from attnc.runtime.train import load_teacher

            from .train import KD_DEFAULT, load_fit_layer
            teacher = load_teacher(rec.get("teacher") or "minilm-l6")
            distill = KD_DEFAULT
            full = load_fit_layer(supernet_dir, supernet_space, teacher)
            fit = torch.nn.Linear(arch.hidden, full.out_features)
            with torch.no_grad():
                fit.weight.copy_(full.weight[:, :arch.hidden])
                fit.bias.copy_(full.bias)
        # the data seed also makes the split: the held-out blocks stay those the SuperPLM never saw
        res = train(model, data, TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                                             seed=data_info["data_seed"], device=args.device, warmup=0.1,
                                             eval_at_start=not kd, progress=not args.no_progress),
                    teacher=teacher, distill=distill, distill_fit=fit)
        model = res.model.cpu()
        info["heldout"] = data_info
        if kd:
            d = res.metrics["distill_losses"]
            k = max(1, min(10, len(d) // 2))   # mean of the first and of the last k steps
            info.update(objective="kd", distill_loss_first=sum(d[:k]) / k, distill_loss_last=sum(d[-k:]) / k,
                        distill_loss_window=k)
        else:
            info.update(objective="mlm", heldout_loss_before=res.metrics["evals"][0]["loss"],
                        heldout_loss_after=res.metrics["final_eval"]["loss"])
    from .export import save_model
    info["export"] = save_model(model, args.out, tokenizer=tok, format=args.format)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        extra = ""
        if args.train_steps > 0 and info["objective"] == "kd":
            extra = (f", distilled {args.train_steps} more steps from the teacher (distillation loss "
                     f"{info['distill_loss_first']:.3f} -> {info['distill_loss_last']:.3f}, first vs last "
                     f"{info['distill_loss_window']} steps)")
        elif args.train_steps > 0:
            extra = (f", trained {args.train_steps} MLM steps (held-out MLM loss "
                     f"{info['heldout_loss_before']:.3f} -> {info['heldout_loss_after']:.3f})")
        e = info["export"]
        why = f"; not a vanilla BERT: {e['reason']}" if e["format"] != "bert" else ""
        print(f"extracted {arch} from {supernet_dir}{extra}; saved to {args.out} as {e['format']} "
              f"({e['how']}{why})")
    return 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit("use `attnc search superplm ...`")
