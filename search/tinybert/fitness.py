"""What a searched architecture is scored by (`attnc search superplm search --fitness ...`).

    mlm               minus the held-out MLM loss read from the SuperPLM (evolve.SuperPLMFitness;
                      an mlm SuperPLM: a kd one never trains its MLM head)
    kd                minus the held-out distillation loss against the SuperPLM's teacher, through
                      its fit layer (evolve.SuperPLMDistillFitness; a kd SuperPLM)
    finetune:TASK     the dev metric of a short fine-tune of the extracted sub-model on TASK
                      (rt-polarity, bbc-topic or glue/NAME with a GLUE-format folder), scored on the
                      task's held-out dev split (FinetuneFitness; either kind of SuperPLM)

The paper ranks its final candidates by downstream scores (SQuAD, MNLI); `finetune:TASK` is that at the
size a CPU allows. Every fitness has identity(): what its scores mean, stored in the study (meta
"fitness") and checked on --resume, as the OP-NAS evaluator's identity is.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from attnc.compiler.errors import ConfigError

KINDS = ("mlm", "kd", "finetune")


def parse_fitness(text: str) -> tuple[str, str | None]:
    """"mlm" | "kd" | "finetune:TASK" -> (kind, task); ConfigError with the choices otherwise."""
    from attnc.runtime.data import TASK_NAMES

    if not isinstance(text, str):
        raise ConfigError(f"a fitness is a string, got {type(text).__name__}")
    kind, sep, task = text.partition(":")
    kind = kind.strip()
    if kind in ("mlm", "kd") and not sep:
        return kind, None
    if kind == "finetune" and sep:
        task = task.strip()
        if task in TASK_NAMES or f"glue/{task}" in TASK_NAMES:
            return "finetune", task if task in TASK_NAMES else f"glue/{task}"
        raise ConfigError(f"unknown fine-tuning task {task!r} in --fitness {text!r}",
                          hint=f"use finetune:TASK with TASK one of {', '.join(TASK_NAMES)}")
    raise ConfigError(f"unknown fitness {text!r}",
                      hint="use mlm, kd or finetune:TASK (e.g. finetune:rt-polarity, finetune:glue/sst2)")


@dataclass(frozen=True)
class FinetuneConfig:
    """How each sub-model is fine-tuned and scored (FinetuneFitness)."""

    task: str                          # rt-polarity | bbc-topic | glue/NAME
    data_dir: str | None = None        # GLUE-format folder for glue/* (offline); None: the hub
    steps: int = 100                   # fine-tuning steps
    lr: float = 5e-4
    batch_size: int = 32
    max_len: int = 64                  # task sequences are truncated to this many tokens
    max_train: int | None = 2000       # training examples used (None: all)
    max_eval: int | None = 500         # dev examples scored (None: all)
    seed: int = 0                      # classifier init, batch order, dropout (the same for every arch)
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"fine-tuning {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"fine-tuning lr must be a positive number, got {self.lr!r}")
        parse_fitness(f"finetune:{self.task}")


class FinetuneFitness:
    """arch -> (the task's dev metric, metrics) after fine-tuning the SuperPLM's sub-model `arch`
    (its encoder weights, a fresh classification head seeded by cfg.seed) for cfg.steps steps with
    the training core; higher is better. The same data, seed and steps for every arch, so scores
    compare and a resumed search re-scores nothing differently."""

    def __init__(self, supernet, cfg: FinetuneConfig, tokenizer=None):
        from attnc.runtime.data import load_task, load_tokenizer
        from attnc.runtime.trainer import ClassificationData, resolve_device

        if not isinstance(cfg, FinetuneConfig):
            raise ConfigError(f"FinetuneFitness takes a FinetuneConfig, got {type(cfg).__name__}")
        resolve_device(cfg.device)
        if cfg.max_len > supernet.space.max_position_embeddings:
            raise ConfigError(f"fine-tuning sequences of {cfg.max_len} tokens exceed the SuperPLM's "
                              f"{supernet.space.max_position_embeddings} positions",
                              hint=f"pass --finetune-max-len {supernet.space.max_position_embeddings} or less")
        self.supernet, self.cfg = supernet, cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
        if len(self.tokenizer) > supernet.space.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens, the SuperPLM's vocabulary "
                              f"{supernet.space.vocab_size}", hint="fine-tune with the SuperPLM's tokenizer")
        task = load_task(cfg.task, cfg.data_dir, seed=cfg.seed)
        self.data = ClassificationData(task, self.tokenizer, cfg.max_len, max_train=cfg.max_train,
                                       max_eval=cfg.max_eval, seed=cfg.seed)
        self.majority = self.data.majority_baseline()

    def __repr__(self) -> str:
        c = self.cfg
        return (f"FinetuneFitness({c.task}: {c.steps} steps, lr {c.lr}, {len(self.data.train_rows)} training "
                f"examples, dev {self.data.primary})")

    def identity(self) -> dict:
        """What the scores mean (stored in the study; the device may change on resume)."""
        return {"kind": "finetune", **{k: v for k, v in asdict(self.cfg).items() if k != "device"},
                "metric": self.data.primary}

    def __call__(self, arch):
        import torch

        from attnc.runtime.modeling import AttncBertForSequenceClassification
        from attnc.runtime.trainer import TrainConfig, train

        cfg, t0 = self.cfg, time.perf_counter()
        sub = self.supernet.extract(arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)   # pooler + classifier init: the same for every arch
            clf = AttncBertForSequenceClassification(
                self.supernet.space.config(arch, **self.supernet.config_overrides,
                                           num_labels=self.data.task.num_labels))
            missing, unexpected = clf.bert.load_state_dict(sub.bert.state_dict(), strict=False)
            if unexpected or any(not k.startswith("pooler.") for k in missing):
                raise RuntimeError(f"sub-model -> classifier weight transfer mismatch: missing {missing}, "
                                   f"unexpected {unexpected}")   # an internal error
            res = train(clf, self.data, TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                                    seed=cfg.seed, device=cfg.device, warmup=0.1,
                                                    checkpoint_every_minutes=None))
        final = res.metrics["final_eval"]
        losses = res.metrics["losses"]
        metrics = {f"dev_{k}": float(v) for k, v in final.items()}
        metrics.update(task=cfg.task, finetune_steps=cfg.steps, train_loss_last=float(losses[-1]),
                       finetune_seconds=time.perf_counter() - t0)
        if not all(math.isfinite(x) for x in losses):
            return float("nan"), metrics          # recorded as failed by the search, never selected
        return float(final[self.data.primary]), metrics


def fitness_identity(fitness) -> dict:
    """The study's record of what a fitness's scores mean."""
    ident = getattr(fitness, "identity", None)
    if ident is not None:
        return ident()
    return {"kind": "function", "name": f"{getattr(fitness, '__module__', '?')}:"
                                        f"{getattr(fitness, '__qualname__', type(fitness).__qualname__)}"}
