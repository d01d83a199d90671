"""AutoTinyBERT's search (ACL 2021, Algorithm 2): evolution under a latency limit, and the Fast rule.

    from attnc.search import tinybert
    from attnc.search.tinybert.evolve import EvolutionConfig, SuperPLMFitness, search
    fitness = SuperPLMFitness(supernet, heldout_blocks, tokenizer)      # arch -> -held-out MLM loss
    predictor = tinybert.LatencyPredictor.load("runs/lat")
    cfg = EvolutionConfig(target_ms=12.0, margin=predictor.safety_margin)   # T=4, S=25, pm=pe=1/2
    result = search(space, fitness, predictor.predict, cfg, study="runs/evo/study.db")
    result.best, result.score, result.latency_ms

The latency constraint (EvolutionConfig.constraint):
- "limit" (the default; the paper's Eq. 4, Lat(a) <= T): a candidate is admitted when its predicted
  latency times (1 + margin) is at most target_ms. The margin is the predictor's documented safety
  margin (LatencyPredictor.safety_margin: the 95th percentile of how much it under-predicted its
  held-out architectures), so that an admitted architecture still meets T when it runs a little
  slower than predicted. Whether it does is measured after the search (the CLI times the best
  architectures side by side with BERT-base; misses are reported as missing).
- "window": predicted latency in [w0, w1] x target_ms (the previous behaviour, default (0.85, 1.1)),
  for those who want "close to T" rather than "at most T"; no margin.
"Inside" below means: satisfying the constraint.

The loop (generations 0..T, each of S members, all scored):
- generation 0: S distinct architectures sampled uniformly from the space and kept only when their
  latency is inside (rejection sampling, capped);
- generation t >= 1: the top k = S/2 of generation t-1 are kept (elitism); every other slot is, with
  probability pe, a fresh sample (exploration) and otherwise a mutation (each field resampled with
  probability pm, space.mutate) of a parent drawn by Russian-roulette selection among the kept ones,
  with weights proportional to their rank (k for the best ... 1 for the k-th: MLM-loss scores are
  negative, so rank weights stand in for fitness-proportional ones). A mutation is local by default
  (each field moved one or two grid steps with probability pm, as the reference implementation;
  `mutation="uniform"` redraws each field over its whole range). Every child is redrawn until its
  latency is inside and it is not already a member of the generation (capped; after the cap an
  inside repeat is accepted). An exploration that finds nothing inside becomes a mutation,
  and a mutation that finds nothing repeats its parent (with a warning): a narrow window slows the
  search down but never stops it.
An architecture already scored (kept members, and children equal to an earlier candidate) is looked up
in the study, never re-scored. Generation t draws its randomness from the stream (seed, t) only, and
is written whole to the study before any of it is scored; each score is committed before the next, so
a search killed at any moment and resumed ends with the result of an uninterrupted one (as long as
the fitness is deterministic: SuperPLMFitness uses fixed masks and eval mode).
"""
from __future__ import annotations

import math
import random
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from attnc.compiler.errors import ConfigError, DataError

from .study import Study, study_file

INIT_DRAWS = 20_000     # uniform samples tried for generation 0 before the constraint is called empty
CHILD_DRAWS = 500       # draws tried for one child before an inside repeat is accepted
CONSTRAINTS = ("limit", "window")


@dataclass(frozen=True)
class EvolutionConfig:
    target_ms: float                      # latency target T (ms)
    generations: int = 4                  # T: evolved generations after the random generation 0
    population: int = 25                  # S
    pm: float = 0.5                       # mutation probability of each field
    pe: float = 0.5                       # probability that a child is a fresh sample (exploration)
    window: tuple[float, float] = (0.85, 1.1)   # constraint "window": [w0, w1] x target_ms
    top_k: int | None = None              # members kept per generation (None: population // 2)
    seed: int = 0
    constraint: str = "limit"             # limit: predicted x (1 + margin) <= T | window (see the module doc)
    margin: float = 0.0                   # limit: the predictor's safety margin (a fraction, e.g. 0.04)
    mutation: str = "local"               # local: 1-2 grid steps per field | uniform: a redraw over the range

    def __post_init__(self):
        if not (isinstance(self.target_ms, (int, float)) and math.isfinite(self.target_ms)
                and self.target_ms > 0):
            raise ConfigError(f"target latency must be a positive number of ms, got {self.target_ms!r}")
        if not isinstance(self.generations, int) or self.generations < 0:
            raise ConfigError(f"generations must be an integer >= 0, got {self.generations!r}")
        if not isinstance(self.population, int) or self.population < 2:
            raise ConfigError(f"population must be an integer >= 2, got {self.population!r}")
        for name in ("pm", "pe"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
        w = tuple(self.window)
        if len(w) != 2 or not (0 < w[0] < w[1]):
            raise ConfigError(f"window must be (low, high) with 0 < low < high, got {self.window!r}",
                              hint="the paper's window is (0.85, 1.1) x the target latency")
        object.__setattr__(self, "window", (float(w[0]), float(w[1])))
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k < self.population):
            raise ConfigError(f"top_k must be in 1..population-1, got {self.top_k!r}")
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(f"unknown latency constraint {self.constraint!r}",
                              hint="use 'limit' (predicted latency x (1 + margin) <= T) or 'window'")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin >= 0):
            raise ConfigError(f"the latency safety margin must be a fraction >= 0, got {self.margin!r}",
                              hint="e.g. 0.04 for 4%; the predictor's own is LatencyPredictor.safety_margin")
        if self.constraint == "window" and self.margin:
            raise ConfigError("a safety margin applies to the latency limit, not to the window",
                              hint="use constraint='limit' with a margin, or the window without one")
        from .space import MUTATIONS
        if self.mutation not in MUTATIONS:
            raise ConfigError(f"unknown mutation {self.mutation!r}", hint=f"use one of {', '.join(MUTATIONS)}")

    @property
    def bounds(self) -> tuple[float, float]:
        """The predicted latencies (ms) a candidate may have: (0, T / (1 + margin)) under the limit,
        the window [w0 T, w1 T] otherwise."""
        return constraint_bounds(self.constraint, self.target_ms, self.window, self.margin)

    @property
    def keep(self) -> int:
        return self.top_k if self.top_k is not None else max(1, self.population // 2)

    def to_json(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        return d


def constraint_bounds(constraint: str, target_ms: float, window, margin: float) -> tuple[float, float]:
    """The predicted-latency interval (ms) of a constraint (see EvolutionConfig.bounds)."""
    if constraint == "window":
        return window[0] * target_ms, window[1] * target_ms
    return 0.0, target_ms / (1.0 + margin)


@dataclass(frozen=True)
class SearchResult:
    best: Any                      # Arch of the best score (None when nothing was scored)
    score: float | None
    latency_ms: float | None
    rows: list                     # study.Row of every candidate, in creation order
    generations: list              # per generation: {"generation", "size", "new", "best", "median"}
    algorithm: str                 # "evolution" | "fast"
    target_ms: float
    bounds: tuple                  # the predicted latencies admitted (ms)
    study: str
    constraint: str = "limit"      # "limit" | "window"
    margin: float = 0.0

    @property
    def scored(self) -> list:
        return [r for r in self.rows if r.status == "done"]

    def top(self, k: int = 5) -> list:
        return sorted(self.scored, key=lambda r: (-r.score, r.seq))[:k]

    def to_json(self, top: int = 5) -> dict:
        return {"algorithm": self.algorithm, "study": self.study, "target_ms": self.target_ms,
                "constraint": self.constraint, "margin": self.margin,
                "window_ms": list(self.bounds), "best": str(self.best) if self.best is not None else None,
                "score": self.score, "latency_ms": self.latency_ms,
                "evaluated": len(self.scored), "failed": sum(r.status == "failed" for r in self.rows),
                "generations": self.generations, "top": [r.to_json() for r in self.top(top)]}


# --- the search --------------------------------------------------------------------------------------


def search(space, fitness: Callable, latency: Callable, cfg: EvolutionConfig, *,
           study: str | Path | None = None, progress: bool = False, meta: dict | None = None) -> SearchResult:
    """Run or resume (same study file) the evolutionary search; see the module docstring.

    fitness: arch -> score (higher is better), or (score, metrics dict); latency: arch -> ms.
    meta: extra settings stored in the study and checked on resume (the CLI stores its inputs).
    `generations` may grow on resume (search further); every other setting must match.
    """
    _check_config(cfg)
    st = _open(study)
    try:
        st.check_meta({"algorithm": "evolution", "space": space.to_json(),
                       **{k: v for k, v in cfg.to_json().items() if k != "generations"}, **(meta or {})})
        st.set_meta("generations", cfg.generations)
        loop = _Loop(space, fitness, latency, cfg, st)
        bar = None
        if progress:
            from attnc._progress import progress_bar
            bar = loop.bar = progress_bar(total=cfg.generations + 1, desc="evolution", unit="gen")
        try:
            loop.run()
        finally:
            if bar is not None:
                bar.close()
        return result_from_study(st, space)
    finally:
        st.close()


def fast_search(space, fitness: Callable, latency: Callable, cfg: EvolutionConfig, *,
                study: str | Path | None = None, progress: bool = False, meta: dict | None = None) -> SearchResult:
    """AutoTinyBERT-Fast: score space.fast_candidates(latency, top) (per layer count the widest
    arch obeying the paper's rule 1.6 dm <= df <= 1.9 dm, 0.7 dm <= dqkv <= 1.0 dm whose predicted
    latency is under the constraint's top: T / (1 + margin) under the limit, w1 x T for a window)
    that satisfy the constraint; the best wins. Only cfg's target, constraint, margin and window are used."""
    _check_config(cfg)
    lo, hi = cfg.bounds
    # per layer count the widest rule-abiding arch under the constraint's top, kept when above its bottom
    cands = list(space.fast_candidates(latency, hi))
    lats = [float(latency(a)) for a in cands]
    inside = [(a, t) for a, t in zip(cands, lats) if lo <= t <= hi]
    if not inside:
        if cands:
            seen = "per layer count: " + ", ".join(f"{a} {t:.3g} ms" for a, t in zip(cands, lats))
        else:
            every = [a for L in range(space.min_layers, space.max_layers + 1)
                     for dm in range(space.min_hidden, space.max_hidden + 1, space.step)
                     for a in [space.fast_arch(L, dm)] if a is not None]
            seen = ("no arch of the space obeys the rule" if not every else
                    "the rule's archs have latencies "
                    f"{min(map(latency, every)):.3g}..{max(map(latency, every)):.3g} ms")
        raise ConfigError(f"no AutoTinyBERT-Fast candidate satisfies {_describe(cfg)}; {seen}",
                          hint="choose a target among these latencies, or run the evolutionary search")
    st = _open(study)
    try:
        st.check_meta({"algorithm": "fast", "space": space.to_json(), "target_ms": cfg.target_ms,
                       "window": list(cfg.window), "constraint": cfg.constraint, "margin": cfg.margin,
                       **(meta or {})})
        if st.last_generation() < 0:
            new = [{"arch": str(a), "origin": "fast", "parents": [], "latency_ms": t} for a, t in inside]
            st.add_generation(0, [{"arch": str(a), "origin": "fast", "parents": []} for a, _ in inside], new)
        loop = _Loop(space, fitness, latency, cfg, st)
        bar = None
        if progress:
            from attnc._progress import progress_bar
            bar = loop.bar = progress_bar(total=1, desc="AutoTinyBERT-Fast", unit="gen")
        try:
            loop.score_pending()
        finally:
            if bar is not None:
                bar.update(1)
                bar.close()
        return result_from_study(st, space)
    finally:
        st.close()


def _check_config(cfg) -> None:
    if not isinstance(cfg, EvolutionConfig):
        raise ConfigError(f"the search takes an EvolutionConfig, got {type(cfg).__name__}")


def _describe(cfg: EvolutionConfig) -> str:
    """The constraint in words, for messages."""
    lo, hi = cfg.bounds
    if cfg.constraint == "window":
        return f"the latency window [{lo:.3g}, {hi:.3g}] ms (target {cfg.target_ms:.3g} ms)"
    return (f"the latency limit {cfg.target_ms:.3g} ms (predicted latency <= {hi:.3g} ms with the safety "
            f"margin {100 * cfg.margin:.1f}%)")


def _open(study) -> Study:
    if study is None:
        import tempfile
        study = Path(tempfile.mkdtemp(prefix="attnc-tinybert-")) / "study.db"
    p = Path(study)
    if p.is_dir() or p.suffix != ".db":
        p = p / "study.db"
    return Study(p)


class _Loop:
    def __init__(self, space, fitness, latency, cfg: EvolutionConfig, st: Study):
        self.space, self.fitness, self.latency, self.cfg, self.st = space, fitness, latency, cfg, st
        self.lo, self.hi = cfg.bounds
        self.bar = None
        self._lat: dict[str, float] = {}

    # --- driving ------------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            self.score_pending()
            last = self.st.last_generation()
            if self.bar is not None:
                self.bar.n = last + 1
                self.bar.refresh()
            if last >= self.cfg.generations:
                return
            self._make_generation(last + 1)

    def score_pending(self) -> None:
        for row in self.st.rows("WHERE status = 'pending'"):
            arch = self.space.validate(_parse(row.arch))
            t0 = time.perf_counter()
            out = self.fitness(arch)   # an exception here is a bug or bad input: it propagates
            metrics = {}
            if isinstance(out, tuple):
                out, metrics = out
                metrics = dict(metrics)
            score = float(out)
            metrics["seconds"] = time.perf_counter() - t0
            if math.isfinite(score):
                self.st.finish(row.arch, "done", score=score, metrics=metrics)
            else:   # e.g. a sub-model whose loss overflows: recorded, never selected
                self.st.finish(row.arch, "failed", metrics=metrics, error=f"score is not finite ({score})")
            if self.bar is not None:
                best = self.st.db.execute("SELECT MAX(score) FROM candidates WHERE status='done'").fetchone()[0]
                done = self.st.db.execute("SELECT COUNT(*) FROM candidates WHERE status!='pending'").fetchone()[0]
                self.bar.set_postfix(scored=done, best=None if best is None else round(best, 4), refresh=True)

    # --- making a generation --------------------------------------------------------------------------

    def _lat_of(self, arch) -> float:
        key = str(arch)
        if key not in self._lat:
            t = float(self.latency(arch))
            if not math.isfinite(t):
                raise DataError(f"the latency function gave {t} for {key}")
            self._lat[key] = t
        return self._lat[key]

    def _inside(self, arch) -> bool:
        return self.lo <= self._lat_of(arch) <= self.hi

    def _make_generation(self, g: int) -> None:
        rng = random.Random(f"attnc-tinybert:{self.cfg.seed}:{g}")   # str seeds are hashed stably
        members: list[dict] = []
        if g == 0:
            for a in self._initial(rng):
                members.append({"arch": str(a), "origin": "random", "parents": []})
        else:
            kept = self._ranked_parents(g - 1)[: self.cfg.keep]
            taken = set()
            for a in kept:
                members.append({"arch": a, "origin": "kept", "parents": [a]})
                taken.add(a)
            weights = [len(kept) - i for i in range(len(kept))]   # rank weights for the roulette
            misses = 0
            while len(members) < self.cfg.population:
                child, origin, parents = None, "exploration", []
                if rng.random() < self.cfg.pe:
                    child = self._draw(rng, lambda: self.space.sample(rng), taken)
                    misses += child is None
                if child is None:   # a mutation (or an exploration that found nothing inside)
                    parent = rng.choices(kept, weights=weights)[0]
                    p_arch = _parse(parent)
                    child = self._draw(rng, lambda: self.space.mutate(p_arch, rng, self.cfg.pm,
                                                                      self.cfg.mutation), taken)
                    origin, parents = "mutation", [parent]
                    if child is None:   # nothing inside near the parent: the parent again
                        child, origin = p_arch, "repeat"
                        misses += 1
                taken.add(str(child))
                members.append({"arch": str(child), "origin": origin, "parents": parents})
            if misses:
                warnings.warn(f"generation {g}: {misses} draw(s) found no architecture satisfying "
                              f"{_describe(self.cfg)} in {CHILD_DRAWS} tries and fell back to a "
                              "mutation or a repeat of a parent (few architectures satisfy the latency "
                              "constraint: widen it or move the target)", stacklevel=4)
        known = {r.arch for r in self.st.rows()}
        new, seen = [], set()
        for m in members:
            if m["arch"] not in known and m["arch"] not in seen:
                seen.add(m["arch"])
                new.append({**m, "latency_ms": self._lat_of(_parse(m["arch"]))})
        self.st.add_generation(g, members, new)

    def _initial(self, rng: random.Random) -> list:
        found, seen_lat = {}, []
        for _ in range(INIT_DRAWS):
            a = self.space.sample(rng)
            t = self._lat_of(a)
            seen_lat.append(t)
            if self.lo <= t <= self.hi:
                found.setdefault(str(a), a)
                if len(found) == self.cfg.population:
                    break
        if not found:
            raise ConfigError(
                f"no architecture of the space satisfies {_describe(self.cfg)}: {INIT_DRAWS} uniform "
                f"samples had predicted latencies {min(seen_lat):.3g}..{max(seen_lat):.3g} ms",
                hint="choose a target inside that range (--latency-ms / --speedup), or change the space's maxima")
        if len(found) < self.cfg.population:
            warnings.warn(f"only {len(found)} distinct architectures of the space satisfy {_describe(self.cfg)}; "
                          f"generation 0 has {len(found)} members, not {self.cfg.population}", stacklevel=4)
        return list(found.values())

    def _draw(self, rng: random.Random, make: Callable, taken: set):
        """A child of make() inside the latency constraint and, if one can be had within CHILD_DRAWS
        draws, new to the generation (else an inside repeat, looked up rather than re-scored); None
        when no draw landed inside."""
        fallback = None
        for _ in range(CHILD_DRAWS):
            a = make()
            if not self._inside(a):
                continue
            if str(a) not in taken:
                return a
            fallback = fallback or a
        return fallback

    def _ranked_parents(self, g: int) -> list[str]:
        scores = {r.arch: r.score for r in self.st.rows("WHERE status = 'done'")}
        seqs = {r.arch: r.seq for r in self.st.rows()}
        archs = {m.arch for m in self.st.members(g) if m.arch in scores}
        if not archs:
            raise DataError(f"every candidate of generation {g} failed (no finite score)",
                            hint="check the fitness function (see the study's error column)")
        return sorted(archs, key=lambda a: (-scores[a], seqs[a]))


def _parse(text: str):
    from .space import Arch
    return Arch.parse(text)


# --- results -----------------------------------------------------------------------------------------


def generation_stats(st: Study) -> list[dict]:
    """Per generation: size, new (first-time) candidates, best and median score of its members."""
    scores = {r.arch: r.score for r in st.rows("WHERE status = 'done'")}
    firsts = {r.arch: r.generation for r in st.rows()}
    out = []
    for g in range(st.last_generation() + 1):
        ms = st.members(g)
        vals = [scores[m.arch] for m in ms if m.arch in scores]
        out.append({"generation": g, "size": len(ms),
                    "new": len({m.arch for m in ms if firsts.get(m.arch) == g}),
                    "best": max(vals) if vals else None,
                    "median": statistics.median(vals) if vals else None})
    return out


def result_from_study(st: Study, space=None) -> SearchResult:
    meta = st.meta()
    rows = st.rows()
    done = [r for r in rows if r.status == "done"]
    best = min(done, key=lambda r: (-r.score, r.seq), default=None)
    target = float(meta.get("target_ms", float("nan")))
    window = tuple(meta.get("window", (0.85, 1.1)))
    constraint = meta.get("constraint", "window")   # studies made before the limit existed used the window
    margin = float(meta.get("margin", 0.0))
    return SearchResult(best=_parse(best.arch) if best else None, score=best.score if best else None,
                        latency_ms=best.latency_ms if best else None, rows=rows,
                        generations=generation_stats(st),
                        algorithm=meta.get("algorithm", "evolution"), target_ms=target,
                        bounds=constraint_bounds(constraint, target, window, margin), study=str(st.path),
                        constraint=constraint, margin=margin)


def open_result(study: str | Path) -> SearchResult:
    """The result of a (finished or not) search from its study folder or file."""
    st = Study(study_file(study))
    try:
        return result_from_study(st)
    finally:
        st.close()


# --- fitness from the SuperPLM -----------------------------------------------------------------------


def heldout_batches(blocks, tokenizer, batch_size: int, who: str) -> list[tuple[int, object, object]]:
    """(first row, input_ids, attention_mask) per batch of held-out `blocks` (LongTensor (N, seq_len),
    N >= 1; padding = the tokenizer's pad id), for the SuperPLM fitness functions."""
    import torch

    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] < 1:
        raise DataError(f"{who} needs held-out blocks as a LongTensor (N, seq_len), N >= 1, got "
                        + (f"shape {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor)
                           else type(blocks).__name__))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    blocks, pad = blocks.long(), tokenizer.pad_token_id
    out = []
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i:i + batch_size]
        out.append((i, ids, (ids != pad).long() if pad is not None else torch.ones_like(ids)))
    return out


class SuperPLMFitness:
    """arch -> minus the held-out MLM loss of the SuperPLM's sub-model `arch` (higher is better).

    The masks are drawn once (seed `mask_seed`), so every architecture is scored on the same masked
    tokens; the supernet runs in eval mode under no_grad, and its previous architecture and mode are
    restored after each call. blocks: LongTensor (N, seq_len) of held-out token blocks (not trained on).
    """

    def __init__(self, supernet, blocks, tokenizer=None, *, batch_size: int = 32, mask_seed: int = 12345,
                 mlm_prob: float = 0.15):
        import torch

        from attnc.runtime.data import MLMMasker, load_tokenizer

        tok = tokenizer if tokenizer is not None else load_tokenizer(None)
        batches = heldout_batches(blocks, tok, batch_size, "SuperPLMFitness")
        self.supernet = supernet
        masker = MLMMasker(tok, mlm_prob)
        self.batches = []
        for i, ids, mask in batches:
            masked, labels = masker(ids, mask, torch.Generator().manual_seed(mask_seed + i))
            self.batches.append((masked, mask, labels))
        self.tokens = int(sum(int((lab != -100).sum()) for _, _, lab in self.batches))

    def __repr__(self) -> str:
        return (f"SuperPLMFitness({sum(b[0].shape[0] for b in self.batches)} held-out blocks, "
                f"{self.tokens} masked tokens)")

    def identity(self) -> dict:
        """What the scores mean (stored in the study, checked on resume)."""
        return {"kind": "mlm", "blocks": sum(b[0].shape[0] for b in self.batches), "masked_tokens": self.tokens}

    def loss(self, arch) -> float:
        from .train import mean_mlm_loss

        return mean_mlm_loss(self.supernet, ({"input_ids": ids, "attention_mask": mask, "labels": labels}
                                             for ids, mask, labels in self.batches), arch)

    def __call__(self, arch) -> float:
        return -self.loss(arch)


class SuperPLMDistillFitness:
    """arch -> minus the held-out distillation loss of the SuperPLM's sub-model `arch` against the
    teacher (higher is better): the fitness of a SuperPLM trained by distillation (`--mode kd`), whose
    MLM head is never trained. The loss is the training objective (last hidden states through the
    saved fit layer, last-layer attention scores; DistillConfig), on held-out blocks; the teacher's
    targets are computed once. blocks: LongTensor (N, seq_len) of held-out token blocks."""

    def __init__(self, supernet, blocks, teacher, fit, tokenizer=None, *, distill=None, batch_size: int = 32):
        from attnc.runtime.data import load_tokenizer

        from .train import KD_DEFAULT, _SuperDistiller

        tok = tokenizer if tokenizer is not None else load_tokenizer(None)
        batches = heldout_batches(blocks, tok, batch_size, "SuperPLMDistillFitness")
        if teacher.config.vocab_size != supernet.space.vocab_size:
            raise ConfigError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                              f"SuperPLM's ({supernet.space.vocab_size})", hint="use the SuperPLM's teacher")
        self.supernet = supernet
        device = next(supernet.parameters()).device
        teacher = teacher.to(device).eval()
        self.distiller = _SuperDistiller(teacher, supernet.space, distill or KD_DEFAULT, fit).to(device)
        self.batches = [{"input_ids": ids, "attention_mask": mask} for _, ids, mask in batches]
        self.targets = [self.distiller.teacher_targets({k: v.to(device) for k, v in b.items()})
                        for b in self.batches]
        self.tokens = int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    def __repr__(self) -> str:
        return (f"SuperPLMDistillFitness({sum(b['input_ids'].shape[0] for b in self.batches)} held-out blocks, "
                f"{self.tokens} tokens, teacher {type(self.distiller.teacher).__name__})")

    def identity(self) -> dict:
        """What the scores mean (stored in the study, checked on resume)."""
        return {"kind": "kd", "blocks": sum(b["input_ids"].shape[0] for b in self.batches), "tokens": self.tokens,
                "teacher": type(self.distiller.teacher).__name__,
                "distill": {k: v for k, v in vars(self.distiller.cfg).items()}}

    def loss(self, arch) -> float:
        from .train import mean_distill_loss

        return mean_distill_loss(self.supernet, self.distiller, self.batches, arch, targets=self.targets)

    def __call__(self, arch) -> float:
        return -self.loss(arch)

