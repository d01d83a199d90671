"""Pretraining (MLM with dynamic masking, optional NSP) and fine-tuning loops.

Plain PyTorch loops (AdamW, linear warm-up / decay, grad clipping), deterministic from the seed:
the batch order and the masking of step s depend only on (seed, s), so --resume continues exactly
where a checkpoint left off. Checkpoints go to OUT/checkpoints/step-NNNNNN, written to a temp
folder and renamed (atomic); the final model is saved into OUT file by file with os.replace, and
loads with transformers.AutoModel* after `import attnc.runtime`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from attnc.compiler.errors import ConfigError, DataError
from tqdm.auto import tqdm

from . import data as D
from .config import AttncBertConfig, resolve_config
from .modeling import AttncBertForMaskedLM, AttncBertForPreTraining, AttncBertForSequenceClassification

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"


# ================================================================================================
# pretraining
# ================================================================================================


def pretrain(model: str | dict | AttncBertConfig, out_dir: str | os.PathLike, *, corpus: str = "wiki-sample",
             steps: int = 1000, batch_size: int = 32, seq_len: int = 128, lr: float = 5e-4,
             warmup: float = 0.06, weight_decay: float = 0.01, mlm_prob: float = 0.15, nsp: bool = False,
             seed: int = 0, resume: bool = False, save_every: int | None = None, keep: int = 2,
             tokenizer: str | None = None, train_vocab: int | None = None, eval_blocks: int = 64,
             max_grad_norm: float = 1.0, progress: bool = True, layers: list[str] | None = None,
             formula: str | None = None) -> dict:
    """Pretrain an attnc BERT with MLM (dynamic masking; + NSP on sentence pairs if nsp).

    model: CONFIG_OR_ARCH (preset, arch string, JSON file, dict, config). Returns a summary with the
    held-out MLM loss before and after training. Writes the model, tokenizer and
    attnc_pretrain.json into out_dir."""
    if steps <= 0 or batch_size <= 0:
        raise ConfigError("--steps and --batch-size must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise DataError(f"--resume: no checkpoint under {out / CKPT_DIR}",
                        hint="run without --resume first (with --save-every N to write checkpoints)")
    if ckpt is None:   # a bad model spec fails now, before any data work
        resolve_config(model, layers=layers, formula=formula)
    with _quiet_datasets(progress), _quiet_transformers(progress):
        # tokenizer: the checkpoint's, a given one, a trained one or the default vocab
        corpus_ds = D.load_corpus(corpus)
        if ckpt is not None:
            tok = D.load_tokenizer(ckpt)
        elif train_vocab:
            tok = D.train_wordpiece(corpus_ds["text"], vocab_size=train_vocab)
        else:
            tok = D.load_tokenizer(tokenizer)
        if nsp:
            blocks = D.make_sentence_pairs(corpus_ds, tok, seq_len, seed=seed)
        else:
            blocks = D.make_blocks(corpus_ds, tok, seq_len)
    if len(blocks) < 2:
        raise DataError(f"corpus {corpus!r} gives {len(blocks)} training sequences of {seq_len} tokens",
                        hint="use a larger corpus or a shorter --seq-len")

    if ckpt is not None:
        config = AttncBertConfig.from_pretrained(ckpt)
    else:
        config = resolve_config(model, layers=layers, formula=formula, vocab_size=len(tok),
                                pad_token_id=tok.pad_token_id)
    if seq_len > config.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} exceeds max_position_embeddings "
                          f"{config.max_position_embeddings}", hint="shorten --seq-len")
    if config.vocab_size < len(tok):
        raise ConfigError(f"config vocab_size {config.vocab_size} < tokenizer size {len(tok)}")

    # held-out blocks for the before/after loss; the rest is training data
    n_eval = min(eval_blocks, max(1, len(blocks) // 10))
    order = np.random.RandomState(seed).permutation(len(blocks))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    cls = AttncBertForPreTraining if nsp else AttncBertForMaskedLM
    torch.manual_seed(seed)
    if ckpt is not None:
        with _quiet_transformers(progress):
            net = cls.from_pretrained(ckpt)
    else:
        net = cls(config)
    masker = D.MLMMasker(tok, mlm_prob)
    opt = _adamw(net, lr, weight_decay)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    start, log = 0, []
    if ckpt is not None:
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, log = state["step"], state["log"]
        torch.set_rng_state(state["torch_rng"])
        if state["extra"].get("seed", seed) != seed:
            raise ConfigError("--seed differs from the checkpoint's", hint="resume with the same --seed")

    columns = {k: list(blocks[k]) for k in blocks.column_names}   # python lists: fast row access

    def batch_of(idx, step_seed):
        rows = [{k: v[int(i)] for k, v in columns.items()} for i in idx]
        b = D.pad_batch(rows, tok.pad_token_id)
        g = torch.Generator().manual_seed(step_seed)
        b["input_ids"], b["labels"] = masker(b["input_ids"], b["attention_mask"], g)
        if nsp:
            b["next_sentence_label"] = torch.tensor([r["next_sentence_label"] for r in rows])
        return b

    def eval_loss() -> float:
        net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(eval_idx), batch_size):
                b = batch_of(eval_idx[i:i + batch_size], 12345 + i)
                n = int((b["labels"] != -100).sum())
                total += float(_mlm_loss(net, b, nsp=False)) * n
                count += n
        net.train()
        return total / max(count, 1)

    before = eval_loss() if start == 0 else _summary_value(out, "eval_loss_before")
    net.train()
    per_epoch = max(1, len(train_idx) // batch_size)
    t0 = time.time()
    bar = tqdm(total=steps, initial=start, desc="pretrain", disable=not progress, unit="step")
    for step in range(start, steps):
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.RandomState(seed * 1000 + epoch).permutation(len(train_idx))
        idx = train_idx[perm[pos * batch_size:(pos + 1) * batch_size]]
        b = batch_of(idx, seed * 1_000_003 + step)
        loss = _mlm_loss(net, b, nsp=nsp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(log[-10:]) / len(log[-10:]):.3f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_checkpoint(out, net, tok, opt, sched, step + 1, log,
                            {"seed": seed, "eval_loss_before": before}, keep=keep)
    bar.close()
    after = eval_loss()
    summary = {"model": config.arch, "layers": config.layers, "corpus": corpus, "steps": steps,
               "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "nsp": nsp, "seed": seed,
               "train_sequences": len(train_idx), "eval_sequences": len(eval_idx),
               "eval_loss_before": before, "eval_loss_after": after,
               "train_loss_first10": float(np.mean(log[:10])) if log else None,
               "train_loss_last10": float(np.mean(log[-10:])) if log else None,
               "seconds": time.time() - t0, "resumed_from": start or None}
    save_final(out, net, tok, {"attnc_pretrain.json": summary, "attnc_pretrain_log.json": log})
    return summary


def _mlm_loss(net, b, nsp: bool):
    if isinstance(net, AttncBertForPreTraining):
        return net.mlm_loss(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"),
                            b.get("next_sentence_label") if nsp else None)
    return net.mlm_loss(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"))


def _summary_value(out: Path, key: str):
    ck = latest_checkpoint(out)
    try:
        return torch.load(ck / STATE_FILE, weights_only=False).get("extra", {}).get(key)
    except Exception:
        return None


def _adamw(net, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:   # the fused kernel is several times faster on CPU for the embedding-dominated models
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


# ================================================================================================
# checkpoints
# ================================================================================================


def latest_checkpoint(out: Path) -> Path | None:
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def save_checkpoint(out: Path, net, tok, opt, sched, step: int, log: list, extra: dict, keep: int = 2) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically (temp folder + rename); keep the last `keep`."""
    root = Path(out) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    with _quiet_transformers():
        net.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "log": log,
                "torch_rng": torch.get_rng_state(), "extra": extra}, tmp / STATE_FILE)
    _publish_mode(tmp)
    final = root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
             seed: int = 0, progress: bool = True, save: bool = True) -> dict:
    """Fine-tune a saved model (attnc or standard BERT folder) on a task; evaluate on its dev
    split(s) with the task's GLUE metric. Writes the model and metrics.json into out_dir
    (default MODEL_DIR/finetune-TASK) and returns the metrics."""
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
        train = t.train.shuffle(seed=seed)
        if max_train:
            train = train.select(range(min(max_train, len(train))))
        devs = {k: (v.select(range(min(max_eval, len(v)))) if max_eval else v) for k, v in t.dev.items()}

        def encode(b):
            args = (b["text_a"], b["text_b"]) if t.pair else (b["text_a"],)
            return tok(*args, truncation=True, max_length=max_length)

        cols = ["input_ids", "token_type_ids", "label"]
        train = train.map(encode, batched=True).select_columns(cols)
        devs = {k: v.map(encode, batched=True).select_columns(cols) for k, v in devs.items()}
    torch.manual_seed(seed)
    with _quiet_transformers(progress):
        net = AttncBertForSequenceClassification.from_pretrained(
            model_dir, num_labels=t.num_labels,
            problem_type="regression" if t.is_regression else "single_label_classification")
    config = net.config
    if max_length > config.max_position_embeddings:
        raise ConfigError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}", hint="lower --max-length")
    per_epoch = math.ceil(len(train) / batch_size)
    total = max_steps or max(1, int(round(epochs * per_epoch)))
    opt = _adamw(net, lr, weight_decay)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    net.train()
    t0 = time.time()
    losses = []
    rows_all = train[:]
    rows_all = [dict(zip(rows_all, vals)) for vals in zip(*rows_all.values())]
    bar = tqdm(total=total, desc=f"finetune {t.name}", disable=not progress, unit="step")
    for step in range(total):
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.RandomState(seed * 1000 + epoch).permutation(len(rows_all))
        rows = [rows_all[i] for i in perm[pos * batch_size:(pos + 1) * batch_size]]
        b = D.pad_batch(rows, tok.pad_token_id)
        labels = torch.tensor([r["label"] for r in rows],
                              dtype=torch.float if t.is_regression else torch.long)
        loss = net(**b, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()
    results = {}
    for split, ds in devs.items():
        preds, labels = predict(net, ds, tok.pad_token_id, batch_size * 2, t.is_regression)
        results[split] = D.compute_metrics(t.metric, preds, labels)
    metrics = {"task": t.name, "metric": t.metric, "dev": results,
               "train_examples": len(train), "steps": total, "epochs": total / per_epoch,
               "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed,
               "train_loss_last10": float(np.mean(losses[-10:])), "seconds": time.time() - t0,
               "model_dir": str(model_dir)}
    if not t.is_regression:
        train_labels = np.asarray([r["label"] for r in rows_all])
        major = int(np.bincount(train_labels).argmax())
        metrics["majority_baseline"] = {k: float(np.mean(np.asarray(v["label"]) == major))
                                        for k, v in devs.items()}
    if save:
        dest = Path(out_dir) if out_dir is not None else model_dir / f"finetune-{t.name.replace('/', '-')}"
        save_final(dest, net, tok, {"metrics.json": metrics})
        metrics["out_dir"] = str(dest)
    return metrics


def predict(net, ds, pad_id: int, batch_size: int = 64, regression: bool = False):
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
