"""`attnc pretrain | finetune | analyze | latency` (registered by attnc.cli).

    attnc pretrain --model tiny-hybrid --corpus wiki-sample --steps 300 --out runs/tiny
    attnc finetune runs/tiny --task rt-polarity
    attnc analyze runs/tiny
    attnc latency --arch 5-564-1054-8-512 --seq 128 --batch 1 --threads 1
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain an attnc BERT with MLM (dynamic masking)",
                              description="Pretrain an attnc BERT (MLM with dynamic masking, optional "
                                          "NSP). Writes a folder that loads with AutoModel.")
    p.add_argument("--model", required=True, metavar="CONFIG_OR_ARCH",
                   help="arch string L-dm-df-h-dqkv, JSON config file, or preset "
                        "(tiny-hybrid, bert-tiny, bert-small, bert-base, autotinybert-5l)")
    p.add_argument("--layer", action="append", metavar="SPEC",
                   help="per-layer spec, repeat once per layer (or once for all): std, conv:K, "
                        "attn:FORMULA or a formula")
    p.add_argument("--formula", help="one formula for every layer")
    p.add_argument("--corpus", default="wiki-sample",
                   help="wiki-sample, bbc-news, a text file / folder, or a hub dataset name (online)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps")
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument("--nsp", action="store_true", help="sentence pairs + next-sentence prediction")
    p.add_argument("--tokenizer", metavar="DIR_OR_VOCAB", help="default: the uncased 30,522 vocab")
    p.add_argument("--train-vocab", type=int, metavar="SIZE", help="train a WordPiece vocab on the corpus")
    p.add_argument("--teacher", metavar="NAME_OR_DIR",
                   help="distil from a teacher: minilm-l6 (shipped weights) or a Hugging Face BERT folder")
    p.add_argument("--distill", metavar="W=X,...",
                   help="distillation weights, e.g. hidden_mse=1,logit_kl=0,temperature=1,task_loss=1")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per step")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="also stop after this long")
    _common_training_flags(p)
    p.set_defaults(func=_pretrain)

    p = subparsers.add_parser("finetune", help="fine-tune a saved model on a task -> metrics JSON",
                              description="Fine-tune DIR (attnc or Hugging Face BERT folder) on a task "
                                          "and print the dev metrics as JSON.")
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--task", required=True,
                   help="rt-polarity, bbc-topic, glue/{cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte,wnli}")
    p.add_argument("--data-dir", help="local GLUE-format folder (offline GLUE)")
    p.add_argument("--out", metavar="DIR", help="default: DIR/finetune-TASK")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--steps", type=int, help="overrides --epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", type=int, help="use the first N (shuffled) training examples")
    p.add_argument("--max-eval", type=int)
    _common_training_flags(p)
    p.set_defaults(func=_finetune)

    p = subparsers.add_parser("analyze", help="token-uniformity figures of a saved model",
                              description="Per-layer token uniformity (relative residual norm from "
                                          "rank-1, average pairwise cosine) as in AutoBERT-Zero.")
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--corpus", default="wiki-sample")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--plot", metavar="FILE", help="also draw them (PNG/SVG/PDF; needs matplotlib)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_analyze)

    p = subparsers.add_parser("latency", help="measured inference latency of an architecture",
                              description="Median CPU (or CUDA) forward latency of a randomly "
                                          "initialised encoder, after warm-up.")
    p.add_argument("--arch", required=True, metavar="CONFIG_OR_ARCH")
    p.add_argument("--layer", action="append", metavar="SPEC")
    p.add_argument("--formula")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare-bert", action="store_true",
                   help="also time transformers.BertModel of the same shape (standard attention only)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_latency)


def _common_training_flags(p) -> None:
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                   help="checkpoint every M minutes (default 10; 0 turns it off)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="bf16: autocast (CPU and GPU); fp16: CUDA with a grad scaler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _distill_config(text: str | None, teacher: str | None):
    """--distill "hidden_mse=1,logit_kl=0.5" -> DistillConfig (numbers only; never evaluated)."""
    from attnc.compiler.errors import ConfigError

    from .trainer import DistillConfig

    if text is None:
        return DistillConfig() if teacher else None
    if not teacher:
        raise ConfigError("--distill needs --teacher", hint="add --teacher minilm-l6 or a Hugging Face encoder folder")
    fields = DistillConfig.__dataclass_fields__
    values = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key.strip() not in fields:
            raise ConfigError(f"bad --distill item {item!r}",
                              hint=f"use NAME=NUMBER with NAME in {', '.join(fields)}")
        try:
            values[key.strip()] = float(val)
        except ValueError:
            raise ConfigError(f"--distill {key}: {val!r} is not a number", hint="e.g. hidden_mse=1.0") from None
    return DistillConfig(**values)


def _threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


def _pretrain(args) -> int:
    from .train import pretrain

    _threads(args.threads)
    s = pretrain(args.model, args.out, corpus=args.corpus, steps=args.steps, batch_size=args.batch_size,
                 seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, mlm_prob=args.mlm_prob, nsp=args.nsp,
                 seed=args.seed, resume=args.resume, save_every=args.save_every, tokenizer=args.tokenizer,
                 train_vocab=args.train_vocab, progress=not args.no_progress, layers=args.layer,
                 formula=args.formula, device=args.device, precision=args.precision,
                 checkpoint_minutes=args.checkpoint_minutes or None, time_budget_s=args.time_budget,
                 grad_accum=args.grad_accum, teacher=args.teacher,
                 distill=_distill_config(args.distill, args.teacher))
    if s.get("plan"):
        print(s["plan"])
    print(f"pretrained {s['model']} for {s['steps']} steps on {s['corpus']} in {s['seconds']:.0f}s "
          f"({s['device']}, {s['precision']}): held-out MLM loss {s['eval_loss_before']:.3f} -> "
          f"{s['eval_loss_after']:.3f}; saved to {args.out}")
    if "distill_loss_first10" in s:
        print(f"distillation loss (teacher {s['teacher']}): {s['distill_loss_first10']:.4f} -> "
              f"{s['distill_loss_last10']:.4f} (mean of the first / last 10 steps)")
    return 0


def _finetune(args) -> int:
    from .train import finetune

    _threads(args.threads)
    m = finetune(args.model_dir, args.task, out_dir=args.out, data_dir=args.data_dir, epochs=args.epochs,
                 max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                 max_train=args.max_train, max_eval=args.max_eval, seed=args.seed,
                 progress=not args.no_progress, resume=args.resume, save_every=args.save_every,
                 checkpoint_minutes=args.checkpoint_minutes or None, device=args.device,
                 precision=args.precision)
    if m.get("plan"):
        print(m["plan"], file=sys.stderr)   # stdout stays one JSON document
    print(json.dumps({k: v for k, v in m.items() if k != "plan"}, indent=2))
    return 0


def _analyze(args) -> int:
    from .analyze import format_table, plot, token_uniformity

    _threads(args.threads)
    r = token_uniformity(args.model_dir, corpus=args.corpus, num_sequences=args.sequences,
                         seq_len=args.seq_len, progress=not args.no_progress)
    print(format_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    if args.plot:
        print(f"plot: {plot(r, args.plot)}")
    return 0


def _latency(args) -> int:
    from .config import resolve_config
    from .counters import count_flops, count_parameters
    from .latency import compare_with_bert, measure_latency

    config = resolve_config(args.arch, layers=args.layer, formula=args.formula)
    r = measure_latency(config, args.seq, args.batch, warmup=args.warmup, runs=args.runs,
                        threads=args.threads, device=args.device)
    r["parameters"] = count_parameters(config, pooler=False)
    r["flops"] = count_flops(config, args.seq) * args.batch
    if args.compare_bert:
        r["compare_bert"] = compare_with_bert(config, args.seq, args.batch, warmup=args.warmup,
                                              runs=args.runs, threads=args.threads)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['arch']}: {r['median_ms']:.2f} ms median over {r['runs']} runs (min {r['min_ms']:.2f}) "
              f"at batch {r['batch']}, seq {r['seq']}, {r['threads']} thread(s) on {r['device']}; "
              f"{r['parameters']:,} encoder parameters, {r['flops'] / 1e9:.2f} GFLOPs")
        if args.compare_bert:
            c = r["compare_bert"]
            print(f"transformers.BertModel ({c['bert_attn_impl']}): {c['bert_ms']:.2f} ms, attnc "
                  f"{c['attnc_ms']:.2f} ms, ratio {c['ratio']:.3f}")
    sys.stdout.flush()
    return 0
