"""Batch-wise SuperPLM training (AutoTinyBERT's Algorithm 1), in one process or on torch.distributed.

    from attnc.search import tinybert
    from attnc.search.tinybert.train import SuperTrainConfig, train_superplm
    space = tinybert.Space(max_layers=4, max_hidden=128, max_ffn=512, max_heads=2, head_dim=64)
    supernet = tinybert.SuperPLM(space)
    metrics = train_superplm(supernet, MLMData(blocks, tok), SuperTrainConfig(steps=200, sub_batches=4))

Every optimizer step takes one global batch (`batch_size` sequences, masked with a seed of the step
as the training core's MLMData does) and splits it into N = `sub_batches` sub-batches. Sub-batch g is
trained with M = `samples` sub-models, each drawn by `space.sample` from a `random.Random` seeded by
(seed, step, g, sample). The losses of the passes that ran are averaged (a pass with nothing to learn,
an MLM sub-batch without a masked token, is skipped and not counted), and the supernet takes ONE
optimizer step. N = 1, M = 1 is the paper's "one sub-model per batch" ablation. Distillation (kd)
reads the text unmasked, teacher and student alike (task-agnostic distillation); the teacher is any
Hugging Face encoder, its last self-attention found by structure (runtime.trainer._last_self_attention).

Under `torchrun --nproc-per-node W` (RANK / WORLD_SIZE in the environment) the N sub-batches are
shared out over the W ranks (rank r takes g = r*N/W .. (r+1)*N/W - 1): since g enters the sampling
seed, every rank trains a different sub-model (the public AutoTinyBERT code samples the same one on
every GPU). At the start every rank takes rank 0's weights (and fit layer), broadcast, so ranks seeded
differently still train one model. Gradients and pass counts are all-reduced (summed), divided by the
passes that ran on all ranks, and every rank makes the same update, so W processes give the
parameters of one process with the same N and M.

Determinism: the batch, its masks, the sampled architectures and the dropout RNG of every pass are
functions of (seed, step, g, sample) only, so a run killed at any moment and resumed from its last
checkpoint reproduces the uninterrupted run step for step (same thread count).

A parameter that no pass of a step touched (e.g. a layer beyond every sampled depth) keeps a None
gradient: the optimizer leaves it alone (no weight decay, no momentum drift) on every rank alike.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from attnc.compiler.errors import ConfigError, DataError
from attnc.runtime import trainer as T
from attnc.runtime.trainer import DistillConfig

log = logging.getLogger(__name__)

OBJECTIVES = ("mlm", "kd")
SUPERNET_DIR = "supernet"
WEIGHTS_FILE = "supernet.pt"
SPACE_FILE = "space.json"
METRICS_FILE = "train_metrics.json"
RECIPE_FILE = "recipe.json"    # how it was trained: objective, corpus, seq_len, seed, teacher
FIT_FILE = "fit.pt"            # kd: the distillation fit layer (the KD fitness reads through it)
# task-agnostic distillation as AutoTinyBERT: last hidden states + last attention scores, no MLM term
KD_DEFAULT = DistillConfig(hidden_mse=1.0, attn_mse=1.0, logit_kl=0.0, task_loss=0.0)


@dataclass(frozen=True)
class SuperTrainConfig:
    """Everything that decides how a SuperPLM is trained (supernet and data are passed separately)."""

    steps: int = 1000                      # optimizer steps (the LR schedule spans exactly this many)
    batch_size: int = 32                   # sequences per GLOBAL batch (all sub-batches, all ranks)
    sub_batches: int = 4                   # N: sub-batches per batch, each with its own sub-model(s)
    samples: int = 1                       # M: sub-models sampled per sub-batch
    lr: float = 5e-4                       # peak learning rate (AdamW)
    warmup: float = 0.06                   # linear warm-up fraction of `steps`, then linear decay
    weight_decay: float = 0.01             # decoupled weight decay (not on biases / LayerNorm)
    max_grad_norm: float | None = 1.0      # clipping of the averaged gradient; None: none
    seed: int = 0                          # batch order, masks, sampled archs, dropout (not the init)
    objective: str = "mlm"                 # mlm: masked-LM pre-training | kd: distillation from a teacher
    eval_every: int | None = None          # held-out MLM loss of the largest sub-model every N steps (and at the end)
    checkpoint_dir: str | None = None      # atomic checkpoints step-NNNNNN/ go here; None: none
    checkpoint_every: int | None = None    # checkpoint every N steps (needs checkpoint_dir)
    keep_checkpoints: int = 2              # how many of the latest checkpoints to keep
    resume: bool = False                   # continue from the latest checkpoint in checkpoint_dir
    device: str = "auto"                   # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    precision: str = "fp32"                # fp32 | bf16 (autocast) | fp16 (CUDA, grad scaler)
    optimizer: str = "adamw"               # the training core's optimizers: adamw | adam | sgd

    def __post_init__(self):
        for name in ("steps", "batch_size", "sub_batches", "samples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.sub_batches:
            raise ConfigError(f"batch_size {self.batch_size} does not split into {self.sub_batches} "
                              f"equal sub-batches", hint="make batch_size a multiple of sub_batches")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}", hint=f"use one of {', '.join(OBJECTIVES)}")
        if self.precision not in T.PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", hint=f"use one of {', '.join(T.PRECISIONS)}")
        if self.optimizer not in T.OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", hint=f"use one of {', '.join(T.OPTIMIZERS)}")
        if not 0 <= self.warmup <= 1:
            raise ConfigError(f"warmup is a fraction of the steps, got {self.warmup}", hint="use 0..1")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ConfigError(f"eval_every must be positive, got {self.eval_every}")


# ================================================================================================
# sampling and distribution
# ================================================================================================


def sample_arch(space, seed: int, step: int, sub_batch: int, sample: int):
    """The sub-model of pass (step, global sub-batch, sample): a pure function of its arguments, so
    ranks, resumed runs and single-process runs agree on it."""
    return space.sample(random.Random(f"attnc-superplm/{seed}/{step}/{sub_batch}/{sample}"))


def _pass_seed(seed: int, step: int, sub_batch: int, sample: int) -> int:
    """Dropout seed of one pass (integer mix of the same four numbers)."""
    return (((seed * 1_000_003 + step) * 10_007 + sub_batch) * 101 + sample) % (2**63 - 1)


def _dist_env() -> tuple[int, int]:
    """(rank, world size): of the running process group, else from torchrun's environment, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _resolve_device(spec: str, world: int) -> torch.device:
    if world > 1 and spec in ("auto", "cuda") and torch.cuda.is_available():
        # one GPU per process: torchrun's LOCAL_RANK picks it
        return T.check_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}", "fp32")
    return T.resolve_device(spec)


def _init_distributed(device: torch.device, world: int) -> bool:
    """Start the process group when torchrun asked for one; True when this call created it."""
    import torch.distributed as dist

    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed",
                          hint="run in one process, or install a torch build with distributed support")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


# ================================================================================================
# objectives
# ================================================================================================


class _SuperDistiller(torch.nn.Module):
    """Task-agnostic KD losses of a SuperPLM sub-model against a frozen teacher: last hidden states
    through a learned fit layer (SuperPLM max width -> teacher width, columns sliced to the active
    width) and last-layer attention scores Q K^T / sqrt(dh) over real token pairs."""

    def __init__(self, teacher, space, cfg: DistillConfig, fit: torch.nn.Linear | None = None):
        super().__init__()
        self.teacher, self.cfg = teacher, cfg
        fit = fit if fit is not None else new_fit_layer(space, teacher, 0)
        want = (teacher.config.hidden_size, space.max_hidden)
        if tuple(fit.weight.shape) != want:
            raise ConfigError(f"the fit layer maps {fit.weight.shape[1]} -> {fit.weight.shape[0]} features; "
                              f"this SuperPLM and teacher need {want[1]} -> {want[0]}",
                              hint="make it with new_fit_layer(space, teacher, seed)")
        self.fit = fit
        self.t_att = T._last_self_attention(teacher)     # found by structure: BERT, RoBERTa, ELECTRA, ...
        if cfg.attn_mse:
            if self.t_att is None:
                raise ConfigError(f"attn_mse needs a teacher with self-attention (query, key and value "
                                  f"projections of its hidden size); found none in {type(teacher).__name__}",
                                  hint="use an encoder teacher (BERT, RoBERTa, ELECTRA, ...), or attn_mse=0")
            th = self.t_att.heads
            if space.mode != "kd" or space.max_heads != th:
                raise ConfigError(f"attention-score distillation compares heads one to one: the space "
                                  f"has mode {space.mode!r} with {space.max_heads} heads, the teacher "
                                  f"{th} heads",
                                  hint=f"use a kd-mode space with max_heads={th}, or attn_mse=0")
        if cfg.logit_kl:
            raise ConfigError("logit_kl is not supported in SuperPLM distillation (the AutoTinyBERT "
                              "recipe distils hidden states and attention scores)",
                              hint="use hidden_mse / attn_mse (logit_kl=0)")

    def teacher_targets(self, b: dict) -> dict:
        """The teacher's last hidden states and last-layer attention scores on b's input_ids (the
        training loop passes the text unmasked: task-agnostic distillation)."""
        seen = {}

        def grab(module, args, kwargs):   # the last self-attention's input, whatever the architecture
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        hook = self.t_att.module.register_forward_pre_hook(grab, with_kwargs=True) if self.cfg.attn_mse else None
        try:
            with torch.no_grad():
                kw = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
                out = self.teacher(**kw, output_hidden_states=True)
                t = {"hidden": out.hidden_states[-1].float()}
                if self.cfg.attn_mse:
                    t["scores"] = T._attention_scores(self.t_att, seen["x"])
        finally:
            if hook is not None:
                hook.remove()
        return t

    def forward(self, b: dict, out, targets: dict) -> torch.Tensor:
        real = b["attention_mask"].bool()
        loss = torch.zeros((), dtype=torch.float32, device=real.device)
        if self.cfg.hidden_mse:
            hs = out.hidden_states[-1].float()
            dm = hs.shape[-1]
            fitted = F.linear(hs, self.fit.weight[:, :dm].float(), self.fit.bias.float())
            loss = loss + self.cfg.hidden_mse * F.mse_loss(fitted[real], targets["hidden"][real])
        if self.cfg.attn_mse:
            ss = out.last_scores.float()
            keep = (real[:, None, :, None] & real[:, None, None, :]).expand_as(ss)
            loss = loss + self.cfg.attn_mse * F.mse_loss(ss[keep], targets["scores"][keep])
        return loss


def new_fit_layer(space, teacher, seed: int) -> torch.nn.Linear:
    """The distillation fit layer (SuperPLM max width -> teacher width; a sub-model of width dm uses
    its first dm columns), initialised from `seed` alone: identical on every rank and independent of
    the SuperPLM's init. train_superplm trains it beside the SuperPLM; save_superplm keeps it, since
    the KD fitness of a search (evolve.SuperPLMDistillFitness) reads hidden states through it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 77)
        return torch.nn.Linear(space.max_hidden, teacher.config.hidden_size)


def _pass_loss(supernet, b: dict, objective: str, distiller, distill, targets):
    """Loss of one sub-model pass (the active arch is already set). None when the pass has nothing
    to learn from (an MLM sub-batch without a masked token). kd: the distillation terms are computed
    on the text unmasked (T.unmasked(b); `targets` are the teacher's on the same text), as
    task-agnostic distillation does; an optional MLM term (task_loss) on the masked batch."""
    has_labels = bool((b["labels"] != -100).any())
    if objective == "mlm":
        if not has_labels:
            return None
        return supernet.mlm_loss(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"))
    u = T.unmasked(b)
    out = supernet(u["input_ids"], attention_mask=u["attention_mask"], token_type_ids=u.get("token_type_ids"),
                   output_hidden_states=True, output_last_scores=bool(distill.attn_mse))
    loss = distiller(u, out, targets)
    if distill.task_loss and has_labels:
        mlm = supernet.mlm_loss(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"))
        loss = loss + distill.task_loss * mlm.float()
    return loss


def heldout_mlm_loss(supernet, data, arch=None, *, batch_size: int = 32, device=None) -> float:
    """Held-out MLM loss of one sub-model (default: the active one) on data's eval split, with the
    training core's fixed eval masks (call data.split(seed) first). Restores the active arch."""
    if not hasattr(data, "eval_idx"):
        raise DataError("the data has no held-out split yet", hint="call data.split(seed) first")
    batches = (data.batch(data.eval_idx[i:i + batch_size], 12345 + i)
               for i in range(0, len(data.eval_idx), batch_size))
    return mean_mlm_loss(supernet, batches, arch, device=device)


def heldout_distill_loss(supernet, distiller, data, arch=None, *, batch_size: int = 32) -> float:
    """Held-out distillation loss (the training objective of a kd SuperPLM) of sub-model `arch` on
    data's eval split: the real-token-weighted mean over batches, eval mode, no_grad."""
    if not hasattr(data, "eval_idx"):
        raise DataError("the data has no held-out split yet", hint="call data.split(seed) first")
    batches = [data.batch(data.eval_idx[i:i + batch_size], 12345 + i)
               for i in range(0, len(data.eval_idx), batch_size)]
    return mean_distill_loss(supernet, distiller, batches, arch)


@contextlib.contextmanager
def _evaluating(supernet, arch):
    """Sub-model `arch` (None: the active one) in eval mode under no_grad; the SuperPLM's arch and
    mode are restored on exit."""
    before, was_training = supernet.arch, supernet.training
    try:
        if arch is not None:
            supernet.set_arch(arch)
        supernet.eval()
        with torch.no_grad():
            yield
    finally:
        supernet.set_arch(before)
        supernet.train(was_training)


def mean_distill_loss(supernet, distiller, batches, arch=None, targets=None) -> float:
    """Mean distillation loss of sub-model `arch` over `batches` (dicts with input_ids and
    attention_mask; an MLM batch is read unmasked, as training does), each weighted by its real
    tokens; `targets` (one per batch) are the teacher's, computed here when not given. Restores the
    SuperPLM's arch and mode."""
    device = next(supernet.parameters()).device
    total, count = 0.0, 0
    with _evaluating(supernet, arch):
        for i, b in enumerate(batches):
            b = T._to({k: v for k, v in T.unmasked(b).items()
                       if k in ("input_ids", "attention_mask", "token_type_ids")}, device)
            t = targets[i] if targets is not None else distiller.teacher_targets(b)
            out = supernet(b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b.get("token_type_ids"), output_hidden_states=True,
                           output_last_scores=bool(distiller.cfg.attn_mse))
            n = int(b["attention_mask"].sum())
            total += float(distiller(b, out, t)) * n
            count += n
    return total / max(count, 1)


def mean_mlm_loss(supernet, batches, arch=None, *, device=None) -> float:
    """Token-weighted mean MLM loss of sub-model `arch` (default: the active one) over `batches`
    (dicts with input_ids, attention_mask, labels and optionally token_type_ids), in eval mode under
    no_grad; batches without a masked token are skipped. The SuperPLM's arch and mode are restored.
    One loop for heldout_mlm_loss (training core batches) and evolve.SuperPLMFitness (fixed masks)."""
    device = device or next(supernet.parameters()).device
    total, count = 0.0, 0
    with _evaluating(supernet, arch):
        for b in batches:
            b = T._to(b, device)
            n = int((b["labels"] != -100).sum())
            if n == 0:
                continue
            loss = supernet.mlm_loss(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"))
            total += float(loss) * n
            count += n
    return total / max(count, 1)


# ================================================================================================
# gradients across passes and ranks
# ================================================================================================


def _reduce_gradients(params: list, world: int, extra: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of all ranks (one flat all-reduce) and `extra` (a small float64 vector of
    per-step statistics). A parameter that no pass on any rank touched keeps grad None everywhere."""
    import torch.distributed as dist

    dev = params[0].device
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=dev)
    head = torch.cat([flags, extra.to(dev, torch.float64)])
    dist.all_reduce(head)
    flags, extra = head[:len(params)], head[len(params):]
    used = [p for p, f in zip(params, flags.tolist()) if f > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if used:
        flat = torch.cat([p.grad.reshape(-1) for p in used])
        dist.all_reduce(flat)
        offset = 0
        for p in used:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
    return extra


def _broadcast_from_rank0(tensors: list) -> None:
    """Overwrite `tensors` (in place) with rank 0's values: one broadcast per dtype of the flattened
    tensors."""
    import torch.distributed as dist

    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, 0)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n


def _any_rank(flag: bool, world: int, device) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# ================================================================================================
# the loop
# ================================================================================================


def train_superplm(supernet, data, cfg: SuperTrainConfig = SuperTrainConfig(), *, teacher=None,
                   distill: DistillConfig | None = None, fit: torch.nn.Linear | None = None,
                   progress: bool = False, callbacks=()) -> dict:
    """Train `supernet` (a SuperPLM) on `data` (the training core's MLMData) with Algorithm 1; see
    the module doc. Returns metrics: losses (per step, the mean over the N*M passes), distill_losses
    (kd), archs (per step, the N*M sampled architectures, global sub-batch order), evals
    ([{step, loss}] held-out MLM loss of the largest sub-model), final_eval, steps, seconds,
    stopped, resumed_from, world_size, device, precision. In kd mode the held-out evaluations are the
    largest sub-model's distillation loss against the teacher (the MLM head is not trained there);
    `fit` is the distillation fit layer to train (default: new_fit_layer(space, teacher, cfg.seed));
    pass your own to keep it (save_superplm(..., fit=fit)).

    Callbacks: objects with optional on_step(step, loss, state) / on_eval(step, metrics, state);
    returning "stop" ends training (on every rank). Only rank 0 writes checkpoints and shows a bar."""
    rank, world = _dist_env()
    device = _resolve_device(cfg.device, world)
    T._check_precision(cfg.precision, device)
    space = supernet.space
    if cfg.sub_batches % world:
        raise ConfigError(f"{cfg.sub_batches} sub-batches cannot be shared out over {world} processes",
                          hint="make --sub-batches a multiple of --nproc-per-node")
    if cfg.objective == "kd":
        if teacher is None:
            raise ConfigError("objective 'kd' needs a teacher", hint="pass teacher= (e.g. --teacher minilm-l6)")
        distill = distill or KD_DEFAULT
        if teacher.config.vocab_size != space.vocab_size:
            raise ConfigError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                              f"SuperPLM's ({space.vocab_size})", hint="use the teacher's vocabulary size")
    elif teacher is not None or distill is not None:
        raise ConfigError("a teacher / distill config was given but the objective is 'mlm'",
                          hint="use objective='kd' to distil")
    if len(data.tokenizer) > space.vocab_size:
        raise ConfigError(f"the tokenizer has {len(data.tokenizer)} tokens, the SuperPLM's vocabulary "
                          f"{space.vocab_size}", hint="build the space with the tokenizer's vocabulary size")
    if data.seq_len > space.max_position_embeddings:
        raise ConfigError(f"sequences of {data.seq_len} tokens exceed max_position_embeddings "
                          f"{space.max_position_embeddings}", hint="use shorter sequences")
    created_group = _init_distributed(device, world)
    try:
        return _train(supernet, data, cfg, teacher, distill, fit, progress, callbacks, rank, world, device)
    finally:
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(supernet, data, cfg, teacher, distill, fit, progress, callbacks, rank, world, device) -> dict:
    space = supernet.space
    N, M = cfg.sub_batches, cfg.samples
    per_rank = N // world
    my_groups = range(rank * per_rank, (rank + 1) * per_rank)
    sub_size = cfg.batch_size // N
    was_training, start_arch = supernet.training, supernet.arch
    supernet.to(device)
    distiller = None
    if cfg.objective == "kd":
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        fit = fit if fit is not None else new_fit_layer(space, teacher, cfg.seed)
        distiller = _SuperDistiller(teacher, space, distill, fit).to(device)
    data.split(cfg.seed)
    extra = list(distiller.fit.parameters()) if distiller is not None else []
    opt = T._make_optimizer(supernet, extra, cfg, device)   # reads lr, weight_decay, optimizer
    sched = T._schedule(opt, cfg)                            # reads steps, warmup
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = T._autocast_factory(cfg.precision, device)
    params = [p for p in supernet.parameters() if p.requires_grad] + extra

    metrics = {"losses": [], "archs": [], "evals": [], "final_eval": None, "steps": 0, "seconds": 0.0,
               "stopped": "steps", "resumed_from": None, "world_size": world, "sub_batches": N,
               "samples": M, "objective": cfg.objective, "device": str(device), "precision": cfg.precision}
    if distiller is not None:
        metrics["distill_losses"] = []
    start = 0
    ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    ck = T.latest_checkpoint(ckpt_root) if (cfg.resume and ckpt_root is not None) else None
    if ck is not None:
        state = torch.load(ck / T.STATE_FILE, map_location="cpu", weights_only=False)
        same = {k: state["config"].get(k) for k in ("seed", "steps", "batch_size", "sub_batches", "samples",
                                                    "objective")}
        want = {k: getattr(cfg, k) for k in same}
        if same != want:
            raise ConfigError(f"the checkpoint {ck} was written with {same}, this run has {want}",
                              hint="resume with the same settings, or use a new checkpoint folder")
        if state["space"] != space.to_json():
            raise ConfigError(f"the checkpoint {ck} belongs to another search space",
                              hint="resume with the same space, or use a new checkpoint folder")
        metrics, start = T.restore_training_state(state, supernet, distiller, opt, sched, scaler)
    if world > 1:   # every rank starts from rank 0's weights, whatever each caller seeded
        _broadcast_from_rank0([*supernet.state_dict().values(),
                               *(distiller.fit.state_dict().values() if distiller is not None else ())])

    def checkpoint(step: int) -> None:
        if ckpt_root is None or rank != 0:
            return
        T._save_checkpoint(ckpt_root, {
            "model": supernet.state_dict(), "fit": distiller.fit.state_dict() if distiller else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "metrics": metrics, "config": asdict(cfg), "space": space.to_json()},
            step, cfg.keep_checkpoints)

    cb_state = {"model": supernet, "optimizer": opt, "scheduler": sched, "metrics": metrics, "config": cfg}

    def evaluate(step: int) -> bool:
        if distiller is None:
            loss = heldout_mlm_loss(supernet, data, space.max_arch, batch_size=max(sub_size, 8), device=device)
        else:
            loss = heldout_distill_loss(supernet, distiller, data, space.max_arch, batch_size=max(sub_size, 8))
        m = {"loss": loss, "kind": "distill" if distiller is not None else "mlm", "arch": str(space.max_arch)}
        metrics["evals"].append({"step": step, **m})
        return T._call(callbacks, "on_eval", step, m, cb_state)

    bar = None
    if progress and rank == 0:
        from attnc._progress import progress_bar
        bar = progress_bar(total=cfg.steps, initial=start, desc=f"superplm {cfg.objective} N={N} M={M}", unit="step")
    t0 = time.perf_counter()
    step, stop = start, None
    supernet.train()
    # every pass seeds its own dropout; the caller's global RNG is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        while stop is None and step < cfg.steps:
            batch = data.train_batch(step, cfg.batch_size, cfg.seed)
            archs = [[sample_arch(space, cfg.seed, step, g, j) for j in range(M)] for g in range(N)]
            loss_sum, dloss_sum, passes = 0.0, 0.0, 0
            for g in my_groups:
                b = T._to({k: v[g * sub_size:(g + 1) * sub_size] for k, v in batch.items()}, device)
                targets = distiller.teacher_targets(T.unmasked(b)) if distiller is not None else None
                for j in range(M):
                    supernet.set_arch(archs[g][j])
                    torch.manual_seed(_pass_seed(cfg.seed, step, g, j))
                    with autocast():
                        loss = _pass_loss(supernet, b, cfg.objective, distiller, distill, targets)
                    if loss is None:
                        continue
                    scaler.scale(loss).backward()   # summed; divided below by the passes that ran
                    loss_sum += float(loss.detach())
                    passes += 1
                    if distiller is not None:
                        dloss_sum += float(loss.detach())
            stats = torch.tensor([loss_sum, dloss_sum, passes], dtype=torch.float64)
            if world > 1:
                stats = _reduce_gradients(params, world, stats)
            loss_sum, dloss_sum, passes = stats.tolist()
            if passes == 0:
                raise DataError(f"step {step}: no sub-batch held a masked token",
                                hint="use longer sequences or larger sub-batches")
            for p in params:   # the mean over the passes that ran (on every rank): skipped ones don't count
                if p.grad is not None:
                    p.grad.div_(passes)
            if cfg.max_grad_norm is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss_sum / passes
            metrics["losses"].append(loss_value)
            metrics["archs"].append([str(a) for row in archs for a in row])
            if distiller is not None:
                metrics["distill_losses"].append(dloss_sum / passes)
            metrics["steps"] = step
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{sum(metrics['losses'][-10:]) / len(metrics['losses'][-10:]):.3f}")
            want_stop = T._call(callbacks, "on_step", step, loss_value, cb_state)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                want_stop = evaluate(step) or want_stop
            if _any_rank(want_stop, world, device):
                stop = "callback"
            if stop is None and step < cfg.steps and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(step)
    T.finish_run(metrics, stop, step, t0, evaluate, bar)
    supernet.set_arch(start_arch)
    supernet.train(was_training)
    return metrics


# ================================================================================================
# saving and loading a trained SuperPLM
# ================================================================================================


def save_superplm(supernet, out_dir, *, metrics: dict | None = None, recipe: dict | None = None,
                  fit: torch.nn.Linear | None = None) -> Path:
    """OUT/supernet/ = supernet.pt (state dict at the largest arch) + space.json (+ train_metrics.json,
    recipe.json: how it was trained, read back by `superplm search` / `extract` for the held-out data
    and the fitness; fit.pt: a kd SuperPLM's distillation fit layer), written in a temp folder and
    renamed (atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-supernet-"))
    torch.save({k: v.detach().cpu() for k, v in supernet.state_dict().items()}, tmp / WEIGHTS_FILE)
    (tmp / SPACE_FILE).write_text(json.dumps(supernet.space.to_json(), indent=2) + "\n")
    if metrics is not None:
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    if recipe is not None:
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    if fit is not None:
        torch.save({k: v.detach().cpu() for k, v in fit.state_dict().items()}, tmp / FIT_FILE)
    final = out / SUPERNET_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _supernet_root(folder) -> Path:
    root = Path(folder)
    return root / SUPERNET_DIR if (root / SUPERNET_DIR / WEIGHTS_FILE).is_file() else root


def load_recipe(folder) -> dict:
    """How a saved SuperPLM was trained ({} when its folder records nothing: an older save)."""
    f = _supernet_root(folder) / RECIPE_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise DataError(f"{f} is not valid JSON ({e})", hint="train the SuperPLM again") from None


def load_fit_layer(folder, space, teacher) -> torch.nn.Linear:
    """The distillation fit layer saved beside a kd SuperPLM."""
    f = _supernet_root(folder) / FIT_FILE
    if not f.is_file():
        raise DataError(f"no distillation fit layer in {_supernet_root(folder)} (looked for {FIT_FILE})",
                        hint="train the kd SuperPLM again with `attnc search superplm train --mode kd`")
    fit = new_fit_layer(space, teacher, 0)
    try:
        fit.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise DataError(f"{f} does not fit this SuperPLM and teacher: {e}") from None
    return fit


def load_superplm(folder):
    """A SuperPLM saved by save_superplm / `attnc search superplm train --out DIR`: pass DIR or
    DIR/supernet."""
    from .space import Space
    from .supernet import SuperPLM

    root = _supernet_root(folder)
    if not (root / WEIGHTS_FILE).is_file() or not (root / SPACE_FILE).is_file():
        raise DataError(f"no trained SuperPLM in {folder} (looked for {WEIGHTS_FILE} and {SPACE_FILE})",
                        hint="train one with `attnc search superplm train --out DIR`")
    space = Space.from_json(json.loads((root / SPACE_FILE).read_text()))
    net = SuperPLM(space)
    net.load_state_dict(torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


__all__ = ["SuperTrainConfig", "train_superplm", "sample_arch", "heldout_mlm_loss", "heldout_distill_loss",
           "new_fit_layer", "save_superplm", "load_superplm", "load_recipe", "load_fit_layer", "KD_DEFAULT"]
