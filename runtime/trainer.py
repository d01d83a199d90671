"""One training loop for every attnc model: MLM pretraining, sequence classification, distillation.

    from attnc.runtime.trainer import TrainConfig, train, MLMData, ClassificationData
    data = MLMData(cached_blocks("wiki-sample", tok, 128), tok)
    result = train(model, data, TrainConfig(steps=300, lr=1e-3))
    result.model; result.metrics["final_eval"]      # {"loss": held-out MLM loss}

The objective follows the model and the data: a model with an MLM head (AttncBertForMaskedLM,
AttncBertForPreTraining, or any Hugging Face masked LM) on MLMData trains masked-language
modelling (+ NSP when the data has next_sentence_label); AttncBertForSequenceClassification on
ClassificationData trains cross-entropy (or MSE for regression tasks).

Determinism: the batch order and the masking of micro-batch m depend only on (seed, m), never on
global state, and every RNG the model consumes (dropout) is saved in checkpoints with the model,
optimizer, schedule and grad scaler. So a run killed at any moment and resumed from its last
checkpoint gives bit-identical losses on the CPU (same thread count).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from attnc.compiler.errors import ConfigError, DataError

from . import data as D


STATE_FILE = "trainer_state.pt"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "adam", "sgd")


# ================================================================================================
# configuration and result
# ================================================================================================


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a model is trained (model and data are passed separately)."""

    steps: int = 1000                       # optimizer steps; the LR schedule spans exactly this many
    time_budget_s: float | None = None      # also stop after this many seconds (whichever comes first)
    batch_size: int = 32                    # sequences per micro-batch
    grad_accum: int = 1                     # micro-batches per optimizer step
    lr: float = 5e-4                        # peak learning rate
    weight_decay: float = 0.01              # decoupled weight decay (not on biases / LayerNorm)
    warmup: float = 0.06                    # linear warm-up over this fraction of `steps`, then linear decay
    optimizer: str = "adamw"                # adamw | adam | sgd (momentum 0.9)
    max_grad_norm: float | None = 1.0       # gradient clipping; None: no clipping
    eval_every: int | None = None           # evaluate every N steps (and always at the end)
    eval_at_start: bool = False             # also evaluate before the first step (a "before" figure)
    early_stopping_patience: int | None = None   # stop after N evaluations without improvement
    seed: int = 0                           # model init is the caller's; this seeds order, masks, dropout
    device: str = "auto"                    # auto (cuda when present) | cpu | cuda | cuda:N
    precision: str = "fp32"                 # fp32 | bf16 (autocast, CPU and GPU) | fp16 (CUDA, grad scaler)
    checkpoint_dir: str | None = None       # where checkpoints go; None: no checkpoints
    checkpoint_every_steps: int | None = None     # checkpoint every N steps (needs checkpoint_dir)
    checkpoint_every_minutes: float | None = 10.0  # and every N minutes (needs checkpoint_dir)
    keep_checkpoints: int = 2               # how many of the latest checkpoints to keep
    resume: bool = False                    # continue from the latest checkpoint in checkpoint_dir, if any
    progress: bool = False                  # show a progress bar (attnc._progress: whole lines when not on a terminal)

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps, batch_size and grad_accum must be positive",
                              hint=f"got steps={self.steps}, batch_size={self.batch_size}, "
                                   f"grad_accum={self.grad_accum}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}",
                              hint=f"use one of {', '.join(PRECISIONS)}")
        if not 0 <= self.warmup <= 1:
            raise ConfigError(f"warmup is a fraction of the steps, got {self.warmup}", hint="use 0..1")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge-distillation loss weights (task-agnostic KD as in AutoTinyBERT / TinyBERT)."""

    hidden_mse: float = 1.0     # MSE between the last hidden states (through a learned fit layer when widths differ)
    attn_mse: float = 0.0       # MSE of last-layer attention scores Q K^T / sqrt(dh) over real token pairs
                                # (student: standard attention with the teacher's head count)
    logit_kl: float = 0.0       # KL(teacher || student) of the MLM logits at the masked positions
    temperature: float = 1.0    # softmax temperature of logit_kl
    task_loss: float = 1.0      # weight of the student's own objective (MLM / task loss)


@dataclass
class TrainResult:
    """model: the trained model (on the training device). metrics: a dict with
    losses (per step), evals (list of {"step": s, ...}), best_eval, final_eval, steps, seconds,
    tokens (real tokens trained on), stopped ("steps" | "time_budget" | "early_stopping" |
    "callback"), resumed_from (step or None), device, precision, and distill_losses (per step)
    when a teacher is used. optimizer_state: when train() was given one, the optimizer's final
    per-parameter state by parameter name (the optimizer's own tensors, not copies)."""

    model: torch.nn.Module
    metrics: dict = field(default_factory=dict)
    optimizer_state: dict | None = None


# ================================================================================================
# data sources
# ================================================================================================


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n training items in `epoch` of a run seeded `seed` (any integer: NumPy's legacy
    seeding takes 0..2**32-1, so the key is reduced modulo 2**32; smaller keys are unchanged)."""
    return np.random.RandomState((seed * 1000 + epoch) % 2 ** 32).permutation(n)


class MLMData:
    """Masked-LM data: fixed-length blocks (LongTensor (N, seq_len)) or a datasets.Dataset with
    input_ids [, token_type_ids, next_sentence_label] (sentence pairs). Dynamic masking; a held-out
    part (min(eval_blocks, N/10) sequences, chosen by the seed) gives the eval MLM loss."""

    kind = "mlm"

    def __init__(self, blocks, tokenizer, mlm_prob: float = 0.15, eval_blocks: int = 64):
        if isinstance(blocks, torch.Tensor):
            if blocks.dim() != 2:
                raise DataError(f"blocks must be (N, seq_len), got shape {tuple(blocks.shape)}")
            self.tensor, self.columns = blocks.long(), None
            n = blocks.shape[0]
        else:
            if "input_ids" not in blocks.column_names:
                raise DataError("MLM data needs an input_ids column", hint="build it with make_blocks")
            self.tensor = None
            self.columns = {k: list(blocks[k]) for k in blocks.column_names}
            n = len(self.columns["input_ids"])
        if n < 2:
            raise DataError(f"only {n} training sequences", hint="use a larger corpus or shorter blocks")
        self.n = n
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.masker = D.MLMMasker(tokenizer, mlm_prob)
        self.eval_blocks = eval_blocks
        self.has_nsp = self.columns is not None and "next_sentence_label" in self.columns
        self.seq_len = int(blocks.shape[1]) if self.tensor is not None else \
            max(len(r) for r in self.columns["input_ids"])

    def split(self, seed: int):
        n_eval = min(self.eval_blocks, max(1, self.n // 10))
        order = np.random.RandomState(seed % 2 ** 32).permutation(self.n)
        self.eval_idx, self.train_idx = order[:n_eval], order[n_eval:]

    def per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train_idx) // batch_size)

    def batch(self, idx, mask_seed: int) -> dict:
        if self.tensor is not None:
            ids = self.tensor[torch.as_tensor(np.asarray(idx, dtype=np.int64))]
            b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            rows = [{k: v[int(i)] for k, v in self.columns.items()} for i in idx]
            b = D.pad_batch(rows, self.pad_id)
            if self.has_nsp:
                b["next_sentence_label"] = torch.tensor([r["next_sentence_label"] for r in rows])
        g = torch.Generator().manual_seed(mask_seed)
        b["input_ids"], b["labels"] = self.masker(b["input_ids"], b["attention_mask"], g)
        return b

    def train_batch(self, m: int, batch_size: int, seed: int) -> dict:
        """Micro-batch m of the run: a function of (seed, m) only."""
        per = self.per_epoch(batch_size)
        epoch, pos = divmod(m, per)
        perm = epoch_order(seed, epoch, len(self.train_idx))
        return self.batch(self.train_idx[perm[pos * batch_size:(pos + 1) * batch_size]],
                          seed * 1_000_003 + m)

    def evaluate(self, model, batch_size: int, device, autocast) -> dict:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.eval_idx), batch_size):
                b = _to(self.batch(self.eval_idx[i:i + batch_size], 12345 + i), device)
                n = int((b["labels"] != -100).sum())
                with autocast():
                    loss = _mlm_objective(model, b, nsp=False)[0]
                total += float(loss) * n
                count += n
        return {"loss": total / max(count, 1)}

    primary, higher_is_better = "loss", False


class ClassificationData:
    """A fine-tuning task (attnc.runtime.data.load_task) tokenised once: train rows (shuffled by
    `seed`, the first max_train kept) and the dev split(s), evaluated with the task's metric."""

    kind = "classification"

    def __init__(self, task, tokenizer, max_len: int = 128, *, max_train: int | None = None,
                 max_eval: int | None = None, seed: int = 0):
        self.task = task
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.max_len = max_len
        train = task.train.shuffle(seed=seed)
        if max_train:
            train = train.select(range(min(max_train, len(train))))
        devs = {k: (v.select(range(min(max_eval, len(v)))) if max_eval else v) for k, v in task.dev.items()}
        self.train_rows = self._encode(train)
        self.dev_rows = {k: self._encode(v) for k, v in devs.items()}
        self.label_dtype = torch.float if task.is_regression else torch.long
        self.primary = {"accuracy": "accuracy", "f1": "f1", "matthews": "matthews",
                        "pearson_spearman": "combined"}[task.metric]
        self.higher_is_better = True

    def _encode(self, ds) -> list[dict]:
        a = ds["text_a"]
        args = (a, ds["text_b"]) if self.task.pair else (a,)
        enc = self.tokenizer(*[list(x) for x in args], truncation=True, max_length=self.max_len)
        labels = list(ds["label"])
        return [{"input_ids": i, "token_type_ids": t, "label": y}
                for i, t, y in zip(enc["input_ids"], enc["token_type_ids"], labels)]

    def split(self, seed: int):
        self.train_idx = np.arange(len(self.train_rows))

    def per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train_rows) / batch_size)

    def majority_baseline(self) -> dict | None:
        if self.task.is_regression:
            return None
        major = int(np.bincount([r["label"] for r in self.train_rows]).argmax())
        return {k: float(np.mean([r["label"] == major for r in rows])) for k, rows in self.dev_rows.items()}

    def _batch(self, rows) -> dict:
        b = D.pad_batch(rows, self.pad_id)
        b["labels"] = torch.tensor([r["label"] for r in rows], dtype=self.label_dtype)
        return b

    def train_batch(self, m: int, batch_size: int, seed: int) -> dict:
        epoch, pos = divmod(m, self.per_epoch(batch_size))
        perm = epoch_order(seed, epoch, len(self.train_rows))
        return self._batch([self.train_rows[i] for i in perm[pos * batch_size:(pos + 1) * batch_size]])

    def predict(self, model, rows, batch_size: int, device, autocast):
        preds = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                b = _to(self._batch(rows[i:i + batch_size]), device)
                b.pop("labels")
                with autocast():
                    logits = model(**b).logits.float()
                preds.extend(logits.squeeze(-1).tolist() if self.task.is_regression
                             else logits.argmax(-1).tolist())
        return preds

    def evaluate(self, model, batch_size: int, device, autocast) -> dict:
        """The task metric(s) of the first dev split; further splits as "SPLIT/metric"."""
        out = {}
        for n, (split, rows) in enumerate(self.dev_rows.items()):
            m = D.compute_metrics(self.task.metric, self.predict(model, rows, batch_size * 2, device, autocast),
                                  [r["label"] for r in rows])
            out.update(m if n == 0 else {f"{split}/{k}": v for k, v in m.items()})
        return out

    def evaluate_splits(self, model, batch_size: int, device, autocast) -> dict:
        return {split: D.compute_metrics(self.task.metric,
                                         self.predict(model, rows, batch_size * 2, device, autocast),
                                         [r["label"] for r in rows])
                for split, rows in self.dev_rows.items()}


# ================================================================================================
# device and precision
# ================================================================================================


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda when present, else cpu; unknown or absent devices -> ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but CUDA is not available here",
                              hint="use --device cpu (or auto), or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)",
                              hint="pick an index below the device count")
    elif dev.type != "cpu":
        raise ConfigError(f"device type {dev.type!r} is not supported by the trainer", hint="use cpu or cuda")
    return dev


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 training needs a CUDA device (the grad scaler and fp16 kernels are GPU-only)",
                          hint="use --precision bf16 on the CPU, or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16", hint="use --precision fp16 or fp32")


def check_device(device: str, precision: str) -> torch.device:
    """Resolve the device and check the precision on it (ConfigError with a fix when unusable)."""
    dev = resolve_device(device)
    _check_precision(precision, dev)
    return dev


def _autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = PRECISIONS[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


# ================================================================================================
# objectives
# ================================================================================================


def finish_run(metrics: dict, stop: str | None, step: int, t0: float, evaluate, bar) -> None:
    """The end of a training loop (train() here and search/tinybert/train.py's train_superplm):
    close the progress bar, record why the run stopped and its seconds, evaluate the last step
    unless it just was, and keep that evaluation (without its step) as metrics["final_eval"]."""
    if bar is not None:
        bar.close()
    metrics["stopped"] = stop or "steps"
    metrics["seconds"] = metrics.get("seconds", 0.0) + time.perf_counter() - t0
    if not metrics["evals"] or metrics["evals"][-1]["step"] != step:
        evaluate(step)
    metrics["final_eval"] = {k: v for k, v in metrics["evals"][-1].items() if k != "step"}


def restore_training_state(state: dict, model, distiller, opt, sched, scaler) -> tuple[dict, int]:
    """Load a checkpoint's model, distillation fit layer (when both have one), optimizer, scheduler
    and grad-scaler states (train() here and search/tinybert/train.py's train_superplm); return its
    metrics, marked with the step they resume from, and that step."""
    model.load_state_dict(state["model"])
    if distiller is not None and state.get("fit") is not None:
        distiller.fit.load_state_dict(state["fit"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    metrics = state["metrics"]
    metrics["resumed_from"] = state["step"]
    return metrics, state["step"]


def _to(b: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def _mlm_objective(model, b: dict, nsp: bool):
    """-> (loss, student last hidden state or None, MLM logits at the labelled positions or None).
    attnc models compute vocabulary logits only at the labelled positions (training fast path)."""
    sel = b["labels"] != -100
    heads = getattr(model, "cls", None)
    if hasattr(model, "bert") and heads is not None and hasattr(heads, "predictions") and \
            type(model).__module__.startswith("attnc"):
        out = model.bert(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        h = out.last_hidden_state
        logits = heads.predictions(h[sel]).float()
        loss = F.cross_entropy(logits, b["labels"][sel])
        if nsp and "next_sentence_label" in b:
            loss = loss + F.cross_entropy(heads.seq_relationship(out.pooler_output).float(),
                                          b["next_sentence_label"])
        return loss, h, logits
    # any other masked LM (e.g. transformers.BertForMaskedLM): its own forward and loss
    kw = {k: v for k, v in b.items() if k != "next_sentence_label"}
    out = model(**kw, output_hidden_states=True)
    return out.loss, out.hidden_states[-1], out.logits[sel].float()


def _objective(model, data, b: dict):
    if data.kind == "mlm":
        return _mlm_objective(model, b, nsp=data.has_nsp)
    out = model(**b, output_hidden_states=True)
    return out.loss, out.hidden_states[-1] if out.hidden_states else None, None


@dataclass(frozen=True)
class SelfAttention:
    """A self-attention module found by structure: its query and key projections and head count."""

    module: torch.nn.Module      # its first input is the layer's hidden states (hooked for attn_mse)
    query: torch.nn.Linear
    key: torch.nn.Linear
    heads: int


def _last_self_attention(model) -> SelfAttention | None:
    """The last self-attention of an encoder (attnc, BERT, RoBERTa, ELECTRA, ... with or without a
    head), found by structure rather than attribute names: the last module, in registration order,
    with at least three direct nn.Linear children of one shape hidden_size -> A (A a multiple of the
    head count): the query, key and value projections, in that order. The head count is the
    module's num_attention_heads, else the config's. None when the model has no such module."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    found = None
    for mod in model.modules():
        lins = [c for c in mod.children() if isinstance(c, torch.nn.Linear)]
        heads = getattr(mod, "num_attention_heads", None) or getattr(cfg, "num_attention_heads", None)
        if len(lins) < 3 or not heads:
            continue
        shape = (lins[0].in_features, lins[0].out_features)
        same = [lin for lin in lins if (lin.in_features, lin.out_features) == shape]
        if len(same) >= 3 and shape[0] == hidden and shape[1] % heads == 0:
            found = SelfAttention(mod, same[0], same[1], int(heads))
    return found


def _attention_scores(att: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores Q K^T / sqrt(dh) of a self-attention on its input x (B, n, dm)."""
    B, n, _ = x.shape
    q = att.query(x).view(B, n, att.heads, -1).transpose(1, 2).float()          # (B, h, n, dh)
    k = att.key(x).view(B, n, att.heads, -1).transpose(1, 2).float()
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                    # (B, h, n, n)


def unmasked(b: dict) -> dict:
    """An MLM batch with its masked positions given back their tokens (labels hold the original
    token wherever they are not -100): the text task-agnostic distillation reads."""
    if "labels" not in b:
        return b
    sel = b["labels"] != -100
    return {**b, "input_ids": torch.where(sel, b["labels"], b["input_ids"])}


def _student_hidden(model, b: dict) -> torch.Tensor:
    """The student's last hidden states on a batch (no MLM logits computed for attnc models)."""
    kw = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
    if hasattr(model, "bert") and type(model).__module__.startswith("attnc"):
        return model.bert(**kw).last_hidden_state
    return model(**kw, output_hidden_states=True).hidden_states[-1]


class _Distiller(torch.nn.Module):
    """Distillation losses against a frozen teacher; owns the learned fit layer (student width ->
    teacher width) when the hidden sizes differ."""

    def __init__(self, teacher, student, cfg: DistillConfig, fit: torch.nn.Module | None = None):
        super().__init__()
        self.teacher, self.cfg = teacher, cfg
        self.student_ref = lambda: student    # not a submodule: the student's parameters are the model's
        ts, ss = teacher.config.hidden_size, student.config.hidden_size
        if fit is None:
            fit = torch.nn.Linear(ss, ts) if ts != ss else torch.nn.Identity()
        elif not isinstance(fit, torch.nn.Linear) or tuple(fit.weight.shape) != (ts, ss):
            raise ConfigError(f"the fit layer must be a Linear({ss}, {ts}) (student width -> teacher width), "
                              f"got {fit}", hint="pass distill_fit=None for a fresh one")
        self.fit = fit
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        if cfg.attn_mse:
            s_att, t_att = _last_self_attention(student), _last_self_attention(teacher)
            if s_att is None or not getattr(s_att.module, "is_standard", True):
                raise ConfigError("attn_mse needs a student whose last layer is standard attention "
                                  "(softmax(Q @ K^T / sqrt(d)) @ V): other formulas have no comparable "
                                  "attention scores",
                                  hint="make the last layer `std`, or use hidden_mse / logit_kl (attn_mse=0)")
            if t_att is None:
                raise ConfigError(f"attn_mse needs a teacher with self-attention (query, key and value "
                                  f"projections of its hidden size); found none in {type(teacher).__name__}",
                                  hint="use an encoder teacher (BERT, RoBERTa, ELECTRA, ...), or attn_mse=0")
            if s_att.heads != t_att.heads:
                raise ConfigError(f"attn_mse compares heads one to one: the student's last layer has "
                                  f"{s_att.heads} heads, the teacher's {t_att.heads}",
                                  hint=f"give the student {t_att.heads} heads, or attn_mse=0")
            self.s_att, self.t_att = s_att, t_att
            # keep the input of both last self-attention modules; the scores are recomputed from them
            self._hooks = [att.module.register_forward_pre_hook(self._capture(name), with_kwargs=True)
                           for name, att in (("student", s_att), ("teacher", t_att))]
        if cfg.logit_kl and teacher.get_output_embeddings() is None:
            raise ConfigError("logit_kl needs a teacher with an MLM head",
                              hint="use hidden_mse only, or a teacher folder with MLM weights")

    def close(self) -> None:
        """Remove the hooks from the student and the teacher (they outlive this training run)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._captured = [], {}

    def _capture(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._captured[name] = x
        return hook

    def forward(self, b: dict, h_student, logits_student):
        with torch.no_grad():
            kw = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            out = self.teacher(**kw, output_hidden_states=True)
        real = b["attention_mask"].bool()
        loss = h_student.new_zeros((), dtype=torch.float32)
        if self.cfg.hidden_mse:
            ht = out.hidden_states[-1].float()
            hs = self.fit(h_student.float())
            loss = loss + self.cfg.hidden_mse * F.mse_loss(hs[real], ht[real])
        if self.cfg.attn_mse:
            with torch.no_grad():
                st = _attention_scores(self.t_att, self._captured["teacher"])
            ss = _attention_scores(self.s_att, self._captured["student"])
            keep = real[:, None, :, None] & real[:, None, None, :]              # (B, 1, n, n) real pairs
            keep = keep.expand_as(ss)
            loss = loss + self.cfg.attn_mse * F.mse_loss(ss[keep], st[keep])
        if self.cfg.logit_kl and logits_student is not None:
            sel = b["labels"] != -100
            t = self.cfg.temperature
            lt = out.logits[sel].float() / t
            loss = loss + self.cfg.logit_kl * t * t * F.kl_div(
                F.log_softmax(logits_student / t, -1), F.log_softmax(lt, -1), log_target=True,
                reduction="batchmean")
        return loss


# ================================================================================================
# checkpoints
# ================================================================================================


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _save_checkpoint(root: Path, state: dict, step: int, keep: int) -> Path:
    """root/step-NNNNNN/trainer_state.pt, written in a temp folder and renamed (atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    torch.save(state, tmp / STATE_FILE)
    final = root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ================================================================================================
# the loop
# ================================================================================================


def _make_optimizer(model, extra: Sequence[torch.nn.Parameter], cfg: TrainConfig, device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "LayerNorm" in name else decay).append(p)
    decay += [p for p in extra if p.dim() >= 2]
    no_decay += [p for p in extra if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel is several times faster on CPU for the embedding-dominated models
    return cls(groups, lr=cfg.lr, fused=True)


def _load_parameter_states(opt, model, states: dict) -> None:
    """Per-parameter optimizer states by parameter name, loaded through the optimizer's own
    load_state_dict (it casts each value as the optimizer needs, e.g. a fused AdamW's step)."""
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    names = dict(model.named_parameters())
    unknown = [n for n in states if n not in names]
    if unknown:
        raise ConfigError(f"optimizer state for {len(unknown)} parameter(s) the model does not have, "
                          f"e.g. {unknown[0]}", hint="key the states by model.named_parameters() names")
    state = {index[id(p)]: dict(states[n]) for n, p in names.items() if n in states and id(p) in index}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _schedule(opt, cfg: TrainConfig):
    total, warm = cfg.steps, max(1, int(cfg.warmup * cfg.steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))


def _rng_state(device) -> dict:
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict, device) -> None:
    torch.set_rng_state(s["cpu"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def _call(callbacks, hook: str, *args) -> bool:
    """Run one hook on every callback; True when one asks to stop."""
    stop = False
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None and fn(*args) == "stop":
            stop = True
    return stop


def train(model, data, config: TrainConfig = TrainConfig(), *, teacher=None,
          distill: DistillConfig | None = None, distill_fit: torch.nn.Linear | None = None,
          callbacks=(), optimizer_state: dict | None = None) -> TrainResult:
    """Train `model` on `data` (MLMData or ClassificationData) under `config`; see the module doc.
    distill_fit: the initial distillation fit layer (student width -> teacher width), e.g. a SuperPLM's
    sliced to a sub-model (default: a fresh one; trained either way).
    optimizer_state: {parameter name: that parameter's optimizer state} (e.g. AdamW's exp_avg,
    exp_avg_sq and step) to start from instead of a fresh state, for parameters it names (a
    weight-sharing supernet carries its moments from child to child); the final states are returned
    in TrainResult.optimizer_state. The tensors given may be updated in place.

    Callbacks are objects with optional on_step(step, loss, state) and on_eval(step, metrics, state)
    (state: a dict with model, optimizer, scheduler, metrics); returning "stop" ends training."""
    cfg = config
    device = check_device(cfg.device, cfg.precision)
    if data.kind == "classification" and not hasattr(model, "classifier"):
        raise ConfigError(f"{type(model).__name__} has no classification head for ClassificationData",
                          hint="use AttncBertForSequenceClassification")
    if data.kind == "mlm" and getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ConfigError(f"{type(model).__name__} has no MLM head for MLMData",
                          hint="use AttncBertForMaskedLM or AttncBertForPreTraining")
    if distill is not None and teacher is None:
        raise ConfigError("distill= given without a teacher", hint="pass teacher=MODEL")
    if teacher is not None:
        distill = distill or DistillConfig()
        tv = teacher.config.vocab_size
        if tv != model.config.vocab_size or tv < len(data.tokenizer):
            raise ConfigError(f"the teacher's vocabulary ({tv}) differs from the student's "
                              f"({model.config.vocab_size}) / the tokenizer's ({len(data.tokenizer)})",
                              hint="train the student with the teacher's tokenizer (no --train-vocab)")
    seq_len = getattr(data, "seq_len", None) or getattr(data, "max_len", 0)
    if seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"sequences of {seq_len} tokens exceed max_position_embeddings "
                          f"{model.config.max_position_embeddings}", hint="use shorter sequences")

    was_training = model.training
    model.to(device)
    distiller = None
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed + 77)   # fit-layer init, independent of the model's
        distiller = _Distiller(teacher, model, distill, distill_fit).to(device)
    data.split(cfg.seed)
    extra = list(distiller.fit.parameters()) if distiller is not None else []
    opt = _make_optimizer(model, extra, cfg, device)
    if optimizer_state is not None:
        _load_parameter_states(opt, model, optimizer_state)
    sched = _schedule(opt, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = _autocast_factory(cfg.precision, device)
    torch.manual_seed(cfg.seed)   # dropout RNG of the run

    metrics = {"losses": [], "evals": [], "best_eval": None, "final_eval": None, "steps": 0,
               "seconds": 0.0, "tokens": 0, "stopped": "steps", "resumed_from": None,
               "device": str(device), "precision": cfg.precision}
    if distiller is not None:
        metrics["distill_losses"] = []
    start = 0
    ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    ck = latest_checkpoint(ckpt_root) if (cfg.resume and ckpt_root is not None) else None
    if ck is not None:
        state = torch.load(ck / STATE_FILE, map_location="cpu", weights_only=False)
        if state["seed"] != cfg.seed or state["total_steps"] != cfg.steps:
            raise ConfigError(f"the checkpoint {ck} was written with seed {state['seed']} and "
                              f"{state['total_steps']} steps, this run has seed {cfg.seed} and "
                              f"{cfg.steps} steps", hint="resume with the same seed and steps")
        metrics, start = restore_training_state(state, model, distiller, opt, sched, scaler)
        _set_rng_state(state["rng"], device)

    def checkpoint(step: int):
        if ckpt_root is None:
            return
        _save_checkpoint(ckpt_root, {
            "model": model.state_dict(), "fit": distiller.fit.state_dict() if distiller else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "seed": cfg.seed, "total_steps": cfg.steps, "metrics": metrics,
            "rng": _rng_state(device), "config": asdict(cfg)}, step, cfg.keep_checkpoints)

    def evaluate(step: int) -> bool:
        model.eval()
        m = data.evaluate(model, cfg.batch_size, device, autocast)
        model.train()
        metrics["evals"].append({"step": step, **m})
        best = metrics["best_eval"]
        better = best is None or (m[data.primary] > best[data.primary] if data.higher_is_better
                                  else m[data.primary] < best[data.primary])
        if better:
            metrics["best_eval"] = {"step": step, **m}
        return _call(callbacks, "on_eval", step, m, cb_state)

    cb_state = {"model": model, "optimizer": opt, "scheduler": sched, "metrics": metrics, "config": cfg}
    # distillation alone (no MLM term, no logit KL at masked positions) on MLM data is task-agnostic KD
    pure_kd = distiller is not None and data.kind == "mlm" and not distill.task_loss and not distill.logit_kl
    t0 = time.perf_counter()
    last_ckpt = time.monotonic()
    stop = None
    if start == 0 and cfg.eval_at_start:
        if evaluate(0):
            stop = "callback"
    model.train()
    bar = None
    if cfg.progress:
        from attnc._progress import progress_bar
        bar = progress_bar(total=cfg.steps, initial=start, desc=f"train {data.kind}", unit="step")
    step = start
    while stop is None and step < cfg.steps:
        total, dtotal = 0.0, 0.0
        for k in range(cfg.grad_accum):
            b = _to(data.train_batch(step * cfg.grad_accum + k, cfg.batch_size, cfg.seed), device)
            with autocast():
                if pure_kd:   # task-agnostic distillation: teacher and student read the text unmasked
                    b = unmasked(b)
                    loss, h, logits = torch.zeros((), device=device), _student_hidden(model, b), None
                else:
                    loss, h, logits = _objective(model, data, b)
                if distiller is not None:
                    dl = distiller(b, h, logits)
                    dtotal += float(dl.detach())
                    loss = distill.task_loss * loss + dl
            scaler.scale(loss / cfg.grad_accum).backward()
            total += float(loss.detach())
            metrics["tokens"] += int(b["attention_mask"].sum())
        if cfg.max_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_value = total / cfg.grad_accum
        metrics["losses"].append(loss_value)
        if distiller is not None:
            metrics["distill_losses"].append(dtotal / cfg.grad_accum)
        metrics["steps"] = step
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(metrics['losses'][-10:]):.3f}")
        if _call(callbacks, "on_step", step, loss_value, cb_state):
            stop = "callback"
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            if evaluate(step):
                stop = "callback"
            p = cfg.early_stopping_patience
            best_step = metrics["best_eval"]["step"]
            if p is not None and stop is None and \
                    sum(1 for e in metrics["evals"] if e["step"] > best_step) >= p:
                stop = "early_stopping"
        if stop is None and cfg.time_budget_s is not None and time.perf_counter() - t0 >= cfg.time_budget_s:
            stop = "time_budget"
        if step < cfg.steps and stop is None and ckpt_root is not None:
            due_steps = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
            due_time = cfg.checkpoint_every_minutes is not None and \
                time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_every_minutes
            if due_steps or due_time:
                checkpoint(step)
                last_ckpt = time.monotonic()
    finish_run(metrics, stop, step, t0, evaluate, bar)
    model.train(was_training)
    if distiller is not None:
        distiller.close()
    states = None
    if optimizer_state is not None:
        states = {name: opt.state[p] for name, p in model.named_parameters() if p in opt.state}
    return TrainResult(model, metrics, states)


__all__ = ["TrainConfig", "DistillConfig", "TrainResult", "MLMData", "ClassificationData", "train",
           "resolve_device", "check_device", "latest_checkpoint"]
