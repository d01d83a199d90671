"""The proxy evaluator of the search: short MLM pretraining, then fine-tuning on a task.

    from attnc.search.proxy import ProxyConfig, ProxyEvaluator
    ev = ProxyEvaluator(ProxyConfig(task="rt-polarity", pretrain_steps=200, shared_pretrain_steps=40))

Score = the task's dev metric (accuracy for rt-polarity / bbc-topic), or minus the held-out MLM loss
when task is None; higher is better either way.

With weight sharing (BIWS, search/biws.py) the driver owns a Supernet: prepare(arch) cuts the
child's initial weights from it (the payload travels with the task, e.g. to a Ray worker), the
runner pretrains the child for the shorter weight-shared budget and returns its trained MLM
weights in EvalResult.weights, and commit(arch, result) writes them back into the supernet in
completion order. Without weight sharing each child starts from a fresh random init (seeded) and
pretrains for the longer from-scratch budget. Fine-tuning always trains a copy; only MLM weights
are shared (the task head is not part of the supernet).

The held-out MLM loss is measured on the same held-out blocks for every candidate of a search:
the split is chosen by ProxyConfig.seed, not by the candidate's seed (which still seeds the init,
the batch order, the masks and dropout). So scores of different candidates are comparable, and
under weight sharing no child ever trains on the blocks another child is scored on (with a
per-candidate split the supernet would have seen later children's held-out blocks).

Per process (a Ray worker fills its own on its first task) the tokenizer, the tokenised corpus
(the trainer's cached_blocks, on disk), the tokenised task, and the MLM data with its split and
its masked held-out batches are cached, so an evaluation after the first starts training at once
and its final evaluation only runs the model.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from attnc.compiler.errors import ConfigError

from .biws import Supernet, SupernetDims, attach_kernel_transform, trained_payload
from .evaluator import EvalResult, Evaluator

TASKS = ("rt-polarity", "bbc-topic")


def _glue_names() -> tuple[str, ...]:
    from attnc.runtime.data import GLUE_TASKS
    return tuple(f"glue/{t}" for t in GLUE_TASKS)


class TrainingDiverged(RuntimeError):
    """A candidate's training produced a NaN/inf loss (the search records the candidate as failed)."""


@dataclass(frozen=True)
class ProxyConfig:
    corpus: str = "wiki-sample"             # MLM corpus (attnc.runtime.data.load_corpus names / paths)
    task: str | None = "rt-polarity"        # fine-tuning task; None: score = -held-out MLM loss
    pretrain_steps: int = 200               # MLM steps of a from-scratch child
    shared_pretrain_steps: int = 40         # MLM steps of a weight-shared child (starts from the supernet)
    finetune_steps: int = 100               # task steps (both modes)
    batch_size: int = 32
    seq_len: int = 64                       # MLM block length
    finetune_max_len: int = 64              # task sequences are truncated to this many tokens
    max_train: int | None = 2000            # task training examples used (None: all)
    max_eval: int | None = 500              # task dev examples used (None: all); standard error of a dev
                                            # accuracy near 0.5: sqrt(0.25 / 500) = 0.022 (metrics["score_se"])
    lr: float = 1e-3                        # MLM peak learning rate
    shared_warmup: float = 0.0              # LR warm-up fraction of a weight-shared child (it starts from the
                                            # supernet's optimizer state, so it needs none)
    warmup_children: int = 0                # supernet warm-up before a search scores anything: this many
                                            # random children of the space, trained one after another
    warmup_steps: int | None = None         # MLM steps of each warm-up child (None: shared_pretrain_steps)
    divergence_margin: float | None = 1.0   # a weight-shared child whose held-out loss ends this many nats above
                                            # its first training loss is scored but not written back
    finetune_lr: float = 5e-4
    eval_blocks: int = 64                   # held-out MLM blocks; metrics["mlm_loss_se"] is the loss's standard
                                            # error with blocks as clusters (about 0.076 nats for 256 blocks of 32
                                            # tokens: the truth rows of runs made by benchmarks/fidelity/run_cpu.sh;
                                            # candidates share
                                            # the blocks, so their differences are less noisy than that)
    target_se: float | None = None          # choose the held-out size for this standard error of one score:
                                            # it replaces eval_blocks (MLM) / max_eval (task), see size_for_target_se
    weight_sharing: bool = True
    tokenizer: str | None = None            # tokenizer folder / vocab.txt; None: the default uncased vocab
    device: str = "auto"                    # trainer device (auto = CUDA when present | cpu | cuda:N)
    data_dir: str | None = None             # GLUE-format folder for glue/* tasks (offline); None: the hub
    seed: int = 0                           # supernet init, task subset, held-out MLM blocks; each evaluation
                                            # gets a seed (init, batch order, masks, dropout): a search gives
                                            # all of a generation one (opnas._generation_seed)

    def __post_init__(self):
        for name in ("pretrain_steps", "shared_pretrain_steps", "finetune_steps", "batch_size", "seq_len",
                     "finetune_max_len", "eval_blocks") + (("warmup_steps",) if self.warmup_steps is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"proxy {name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_children, int) or self.warmup_children < 0:
            raise ConfigError(f"proxy warmup_children must be a non-negative integer, got {self.warmup_children!r}")
        if not 0.0 <= self.shared_warmup <= 1.0:
            raise ConfigError(f"proxy shared_warmup is a fraction of the steps, got {self.shared_warmup!r}")
        if self.target_se is not None and (isinstance(self.target_se, bool) or not (
                isinstance(self.target_se, (int, float)) and self.target_se > 0)):
            raise ConfigError(f"proxy target_se must be a positive standard error (or None), got {self.target_se!r}")
        if self.divergence_margin is not None and not self.divergence_margin > 0:
            raise ConfigError(f"proxy divergence_margin must be positive (or None), got {self.divergence_margin!r}")
        if self.task is not None and self.task not in TASKS and self.task not in _glue_names():
            raise ConfigError(f"unknown proxy task {self.task!r}",
                              hint=f"use one of {', '.join(TASKS + _glue_names())}, or None (`--task mlm` on the command line) for the held-out MLM loss")

    @property
    def child_pretrain_steps(self) -> int:
        return self.shared_pretrain_steps if self.weight_sharing else self.pretrain_steps


# ------------------------------------------------------------------------------------------------
# per-process caches (a Ray worker fills its own on its first task)
# ------------------------------------------------------------------------------------------------

_TOKENIZERS: dict = {}
_BLOCKS: dict = {}
_TASKS: dict = {}
_MLM_DATA: dict = {}


def _tokenizer(spec: str | None):
    if spec not in _TOKENIZERS:
        from attnc.runtime.data import load_tokenizer

        _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec]


def _blocks(cfg: ProxyConfig) -> torch.Tensor:
    key = (cfg.corpus, cfg.tokenizer, cfg.seq_len)
    if key not in _BLOCKS:
        from attnc.runtime.data import cached_blocks

        _BLOCKS[key] = cached_blocks(cfg.corpus, _tokenizer(cfg.tokenizer), cfg.seq_len)
    return _BLOCKS[key]


def _mlm_data(cfg: ProxyConfig):
    """The proxy's MLM data (cached per process): held-out split by cfg.seed, see the module doc."""
    key = (cfg.corpus, cfg.tokenizer, cfg.seq_len, cfg.eval_blocks, cfg.seed)
    if key not in _MLM_DATA:
        _MLM_DATA[key] = _proxy_mlm_data_class()(_blocks(cfg), _tokenizer(cfg.tokenizer), cfg.eval_blocks, cfg.seed)
    return _MLM_DATA[key]


@functools.cache
def _proxy_mlm_data_class():
    """Defined on first use: the trainer module is imported lazily, as everywhere in this module."""
    from attnc.runtime.trainer import MLMData, epoch_order

    class ProxyMLMData(MLMData):
        """The trainer's MLMData with a held-out split fixed at construction (train()'s split(seed)
        keeps it), the held-out batches masked once (the masks MLMData.evaluate draws), and a run's
        batch order computed once per epoch instead of once per step. Batches, masks and the
        held-out loss are bit-identical to MLMData's on the same split."""

        def __init__(self, blocks, tokenizer, eval_blocks: int, split_seed: int):
            super().__init__(blocks, tokenizer, eval_blocks=eval_blocks)
            super().split(split_seed)
            self.split_seed = split_seed
            self._order: tuple | None = None      # ((seed, epoch), permutation) of the latest run
            self._eval: dict = {}                 # batch_size -> [(masked batch, labelled tokens)]

        def split(self, seed: int):
            pass   # fixed at construction: every candidate is scored on the same held-out blocks

        def train_batch(self, m: int, batch_size: int, seed: int) -> dict:
            # MLMData.train_batch draws the epoch's permutation of all training blocks at every step
            # (milliseconds for a large corpus, as much as a tiny model's step); the same one, kept
            epoch, pos = divmod(m, self.per_epoch(batch_size))
            if self._order is None or self._order[0] != (seed, epoch):
                self._order = ((seed, epoch), epoch_order(seed, epoch, len(self.train_idx)))
            perm = self._order[1]
            return self.batch(self.train_idx[perm[pos * batch_size:(pos + 1) * batch_size]],
                              seed * 1_000_003 + m)

        def eval_batches(self, batch_size: int) -> list:
            if batch_size not in self._eval:
                out = []
                for i in range(0, len(self.eval_idx), batch_size):
                    b = self.batch(self.eval_idx[i:i + batch_size], 12345 + i)   # MLMData.evaluate's masks
                    out.append((b, int((b["labels"] != -100).sum())))
                self._eval[batch_size] = out
            return self._eval[batch_size]

        def evaluate(self, model, batch_size: int, device, autocast) -> dict:
            """{"loss": held-out MLM loss per masked token, "loss_se": its standard error, with the
            held-out blocks as clusters (tokens of one block are not independent)}."""
            from attnc.runtime.trainer import _mlm_objective

            total, count, sums, counts = 0.0, 0, [], []
            with torch.no_grad():
                for b, n in self.eval_batches(batch_size):
                    b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                    with autocast():
                        loss, _, logits = _mlm_objective(model, b, nsp=False)
                    total += float(loss) * n
                    count += n
                    sel = b["labels"] != -100
                    tok = torch.nn.functional.cross_entropy(logits.float(), b["labels"][sel], reduction="none")
                    block = sel.nonzero()[:, 0]
                    sums.append(torch.zeros(sel.shape[0], dtype=torch.float64).index_add_(0, block.cpu(), tok.double().cpu()))
                    counts.append(sel.sum(1).double().cpu())
            mean = total / max(count, 1)
            return {"loss": mean, "loss_se": cluster_se(torch.cat(sums), torch.cat(counts), mean)}

    return ProxyMLMData


def cluster_se(sums: torch.Tensor, counts: torch.Tensor, mean: float) -> float:
    """Standard error of a mean of per-token values grouped in clusters (held-out blocks): sums and
    counts per cluster, the ratio estimator's sqrt(sum_b (S_b - n_b * mean)^2) / N, times
    sqrt(B / (B - 1))."""
    b, n = len(sums), float(counts.sum())
    if b < 2 or n == 0:
        return float("nan")
    r = sums - counts * mean
    return float((r.pow(2).sum() * b / (b - 1)).sqrt() / n)


def _task_data(cfg: ProxyConfig):
    key = (cfg.task, cfg.data_dir, cfg.tokenizer, cfg.finetune_max_len, cfg.max_train, cfg.max_eval, cfg.seed)
    if key not in _TASKS:
        from attnc.runtime.data import load_task
        from attnc.runtime.trainer import ClassificationData

        task = load_task(cfg.task, cfg.data_dir, seed=cfg.seed)
        _TASKS[key] = ClassificationData(task, _tokenizer(cfg.tokenizer), cfg.finetune_max_len,
                                         max_train=cfg.max_train, max_eval=cfg.max_eval, seed=cfg.seed)
    return _TASKS[key]


def size_for_target_se(cfg: ProxyConfig) -> tuple[ProxyConfig, str]:
    """cfg with its held-out size chosen so that one score's standard error is about cfg.target_se,
    and a line that says how (the report prints it).

    A task's dev accuracy: max_eval = ceil(0.25 / se^2), the binomial bound at accuracy 0.5 (the
    largest variance). The held-out MLM loss (its standard error has the held-out blocks as clusters,
    cluster_se): the pilot measures cluster_se on the largest held-out split (P blocks) under a unigram
    model of the training blocks (no network), and eval_blocks = P (pilot se / se)^2, as a standard
    error shrinks with 1/sqrt(blocks). A network past the unigram stage spreads its losses about as much
    (tests/test_search_noise.py: within 30% of the target after 150 steps); one
    barely trained, close to uniform, spreads them less, so its standard error is smaller than asked. The held-out split is at most a tenth
    of the corpus; when the target needs more, a warning says so and the split is that tenth."""
    import warnings

    t = float(cfg.target_se)
    if cfg.task is not None:
        need = math.ceil(0.25 / t ** 2)
        data = _task_data(replace(cfg, max_eval=need))
        have = min(len(v) for v in data.dev_rows.values())
        if have < need:
            warnings.warn(f"the {cfg.task} dev split has {have} examples; a standard error of {t:g} needs {need}: "
                          f"scores will be noisier (about {math.sqrt(0.25 / have):.3f})", stacklevel=3)
        n = min(need, have)
        return replace(cfg, max_eval=n), (f"dev split: {n} {cfg.task} examples, chosen for a standard error of "
                                          f"{t:g} (binomial bound at accuracy 0.5: {math.sqrt(0.25 / n):.4f})")
    blocks = _blocks(cfg)
    cap = max(1, len(blocks) // 10)                         # MLMData.split's largest held-out split
    data = _proxy_mlm_data_class()(blocks, _tokenizer(cfg.tokenizer), cap, cfg.seed)
    train = torch.as_tensor(np.asarray(data.train_idx, dtype=np.int64))
    counts = torch.bincount(blocks[train].reshape(-1), minlength=int(blocks.max()) + 1).double() + 1.0
    nll = -(counts / counts.sum()).log()
    sums, ns = [], []
    for b, _ in data.eval_batches(64):
        sel = b["labels"] != -100
        tok = torch.where(sel, nll[b["labels"].clamp(min=0)], torch.zeros((), dtype=torch.float64))
        sums.append(tok.sum(1))
        ns.append(sel.sum(1).double())
    sums, ns = torch.cat(sums), torch.cat(ns)
    pilot = len(sums)
    se = cluster_se(sums, ns, float(sums.sum() / ns.sum()))   # the proxy's own estimator, on the pilot's blocks

    def at(k: int) -> float:                                    # the standard error at k blocks: 1/sqrt(k)
        return se * math.sqrt(pilot / k)

    need = max(2, math.ceil(pilot * (se / t) ** 2))
    if need > cap:
        warnings.warn(f"the corpus holds {len(blocks)} blocks; a held-out standard error of {t:g} nats needs "
                      f"{need} held-out blocks but the split takes at most a tenth ({cap}): scores will be "
                      f"noisier (about {at(cap):.3f})", stacklevel=3)
    n = min(need, cap)
    return replace(cfg, eval_blocks=n), (f"held-out MLM: {n} blocks, chosen for a standard error of {t:g} nats "
                                         f"(unigram pilot: {at(n):.4f})")


def vocab_size(cfg: ProxyConfig) -> int:
    return len(_tokenizer(cfg.tokenizer))


def _check_finite(losses, what: str) -> None:
    bad = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
    if bad is not None:
        raise TrainingDiverged(f"{what} loss is {losses[bad]} at step {bad + 1}")


# ------------------------------------------------------------------------------------------------
# the runner (picklable: a frozen config only)
# ------------------------------------------------------------------------------------------------


class ProxyRunner:
    """(arch, payload, seed) -> EvalResult. payload: Supernet.child_payload(arch), or None for a
    from-scratch child."""

    def __init__(self, config: ProxyConfig):
        self.config = config

    def __call__(self, arch, payload: Any, seed: int, steps_override: int | None = None) -> EvalResult:
        from attnc.runtime.modeling import AttncBertForMaskedLM, AttncBertForSequenceClassification
        from attnc.runtime.trainer import TrainConfig, train

        cfg = self.config
        t0 = time.perf_counter()
        tok = _tokenizer(cfg.tokenizer)
        overrides = dict(vocab_size=len(tok), max_position_embeddings=max(cfg.seq_len, cfg.finetune_max_len))
        torch.manual_seed(seed)   # the from-scratch init; also seeds dropout and the data order
        steps = cfg.pretrain_steps if steps_override is None else steps_override
        if payload is None:
            model = AttncBertForMaskedLM(arch.to_config(**overrides))
        else:
            # every persistent weight comes from the payload, so the random init would be thrown
            # away: build without it (HF's no_init_weights) and let the strict load fill every
            # tensor (it raises on a missing key, so no weight is left uninitialised)
            from transformers.initialization import no_init_weights

            with no_init_weights():
                model = AttncBertForMaskedLM(arch.to_config(**overrides))
            model.tie_weights()   # HF ties the MLM decoder to the word embeddings in init_weights, skipped above
            model.load_state_dict(payload["state"], strict=True)
            for i, parts in payload["conv"].items():
                attach_kernel_transform(model, int(i), parts["crop"], parts["transform"])
            steps = cfg.shared_pretrain_steps if steps_override is None else steps_override
        shared = payload is not None
        res = train(model, _mlm_data(cfg),
                    TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                device=cfg.device, warmup=cfg.shared_warmup if shared else 0.1),
                    optimizer_state=payload.get("optim", {}) if shared else None)
        _check_finite(res.metrics["losses"] + [res.metrics["final_eval"]["loss"]], "MLM")
        mlm_loss = float(res.metrics["final_eval"]["loss"])
        weights = None
        if shared:
            # no copy on the way: the child is not trained again (fine-tuning trains a separate model
            # initialised from it) and .cpu() is a no-op on CPU, a device -> host copy otherwise
            optim = {n: {k: v.detach().cpu() for k, v in st.items()} for n, st in res.optimizer_state.items()}
            weights = trained_payload(res.model, copy=False)   # also makes the kernels plain again
            weights = {"state": {k: v.cpu() for k, v in weights["state"].items()},
                       "conv": {i: {k: v.cpu() for k, v in p.items()} for i, p in weights["conv"].items()},
                       "optim": optim}
        metrics = {"mlm_loss": mlm_loss, "mlm_loss_se": float(res.metrics["final_eval"]["loss_se"]),
                   "pretrain_steps": steps,
                   "weight_sharing": shared, "start_loss": float(res.metrics["losses"][0])}
        total_steps = steps
        if cfg.task is None:
            score = -mlm_loss
            metrics["score_se"] = metrics["mlm_loss_se"]
        else:
            data = _task_data(cfg)
            mlm = res.model.cpu()   # plain kernels by now (trained_payload removed the parametrisations)
            ccfg = arch.to_config(**overrides, num_labels=data.task.num_labels)
            torch.manual_seed(seed + 1)   # pooler + classifier init
            clf = AttncBertForSequenceClassification(ccfg)
            missing, unexpected = clf.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
            if unexpected or any(not k.startswith("pooler.") for k in missing):
                raise RuntimeError(f"MLM -> classifier weight transfer mismatch: missing {missing}, "
                                   f"unexpected {unexpected}")
            fin = train(clf, data, TrainConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size,
                                               lr=cfg.finetune_lr, seed=seed, device=cfg.device, warmup=0.1))
            _check_finite(fin.metrics["losses"], "fine-tuning")
            final = fin.metrics["final_eval"]
            score = float(final[data.primary])
            metrics.update({"task": cfg.task, **{f"dev_{k}": float(v) for k, v in final.items()},
                            "finetune_steps": cfg.finetune_steps})
            n_dev = len(next(iter(data.dev_rows.values())))
            metrics["dev_examples"] = n_dev
            if data.primary == "accuracy":   # binomial standard error of the dev accuracy
                metrics["score_se"] = math.sqrt(max(score * (1 - score), 0.0) / max(n_dev, 1))
            total_steps += cfg.finetune_steps
        if not math.isfinite(score):
            raise TrainingDiverged(f"the proxy score is {score}")
        seconds = time.perf_counter() - t0
        metrics["seconds"] = seconds
        return EvalResult(score=score, metrics=metrics, seconds=seconds, steps=total_steps, weights=weights)


class ProxyEvaluator(Evaluator):
    """Proxy training as the search's evaluator; with weight sharing it owns the BIWS supernet."""

    def __init__(self, config: ProxyConfig = ProxyConfig(), supernet: Supernet | None = None):
        if not isinstance(config, ProxyConfig):
            raise ConfigError(f"ProxyEvaluator takes a ProxyConfig, got {type(config).__name__}")
        self.noise_plan = None      # how the held-out size was chosen, when config.target_se asks
        if config.target_se is not None:
            config, self.noise_plan = size_for_target_se(config)
        self.config = config
        self.weight_sharing = config.weight_sharing
        self.supernet = supernet

    def __repr__(self) -> str:
        c = self.config
        mode = (f"weight-shared, {c.shared_pretrain_steps} MLM steps" if c.weight_sharing
                else f"from scratch, {c.pretrain_steps} MLM steps")
        return (f"ProxyEvaluator({mode} on {c.corpus}, then "
                + (f"{c.finetune_steps} steps on {c.task})" if c.task else "held-out MLM loss)"))

    def _supernet_for(self, arch) -> Supernet:
        if self.supernet is None:   # built on first use from the architectures' widths
            self.supernet = Supernet(SupernetDims(
                num_layers=len(arch.layers), hidden_size=arch.hidden_size,
                intermediate_size=arch.intermediate_size, num_heads=arch.num_heads,
                vocab_size=vocab_size(self.config),
                max_position_embeddings=max(self.config.seq_len, self.config.finetune_max_len),
                seed=self.config.seed))
            if getattr(self, "_in_generation", False):
                self.supernet.begin_merge()
        return self.supernet

    def prepare(self, arch) -> Any:
        if not self.weight_sharing:
            return None
        return self._supernet_for(arch).child_payload(arch)

    def runner(self) -> Callable[[Any, Any, int], EvalResult]:
        return ProxyRunner(self.config)

    @property
    def device(self) -> str:
        return self.config.device

    @property
    def warmup_children(self) -> int:
        return self.config.warmup_children if self.weight_sharing else 0

    def warmup_runner(self) -> Callable[[Any, Any, int], EvalResult]:
        steps = self.config.warmup_steps
        return ProxyRunner(self.config if steps is None else replace(self.config, shared_pretrain_steps=steps))

    def diverged(self, result: EvalResult) -> bool:
        """The write-back policy's test: the child's held-out loss ended more than divergence_margin
        nats above its first training loss (where it started from the supernet)."""
        m, margin = result.metrics, self.config.divergence_margin
        return margin is not None and "start_loss" in m and m["mlm_loss"] > m["start_loss"] + margin

    def commit(self, arch, result: EvalResult) -> None:
        """Write a weight-shared child back (in a merge: accumulate its update), unless it diverged:
        then the supernet keeps its weights and metrics["written_back"] says so. A child that failed
        (raised, or a NaN/inf loss) never reaches commit."""
        if self.weight_sharing and result.weights is not None:
            ok = not self.diverged(result)
            result.metrics["written_back"] = ok
            if ok:
                self._supernet_for(arch).write_back(arch, result.weights)
        result.weights = None   # not kept in memory once written back

    def begin_generation(self) -> None:
        """Children from now on start from the current supernet and their updates are merged by
        end_generation (Supernet.begin_merge / end_merge)."""
        self._in_generation = True
        if self.weight_sharing and self.supernet is not None:
            self.supernet.begin_merge()

    def end_generation(self) -> None:
        self._in_generation = False
        if self.weight_sharing and self.supernet is not None:
            self.supernet.end_merge()

    def state_dict(self) -> dict:
        """Config + supernet weights. The weights are the live tensors (no copy): the search saves
        this at once after each write-back, so a deep copy first would only double the work."""
        return {"config": asdict(self.config),
                "supernet": None if self.supernet is None else self.supernet.state_refs()}

    def identity(self) -> dict:
        """The proxy's settings, except the device (a study may resume on another one) and target_se
        when unset (studies made before it existed resume)."""
        return {"kind": "proxy", "config": {k: v for k, v in asdict(self.config).items()
                                            if k != "device" and not (k == "target_se" and v is None)}}

    def load_state_dict(self, d: dict) -> None:
        blob = d.get("supernet") if d else None
        self.supernet = None if blob is None else Supernet.from_state_copy(blob)
        self._in_generation = bool(self.supernet is not None and self.supernet.merging)

    def save_supernet(self, path) -> None:
        """Write the supernet (for `attnc search export`); nothing without weight sharing."""
        if self.supernet is not None:
            self.supernet.save(path)
