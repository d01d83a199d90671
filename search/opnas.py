"""OP-NAS (AutoBERT-Zero, AAAI 2022): evolution of per-layer attention formulas and convolutions,
guided by operation priorities (Equation 3), with random search and plain EA as baselines.

    from attnc.search import opnas
    space = opnas.Space(num_layers=4)
    result = opnas.search(space, evaluate=my_fn, budget=100, study="runs/x/study.db")
    result.best_architecture, result.best_score, result.evaluations

Everything the loop needs is derived from the study rows (see study.py); candidate number t draws
its randomness from the stream (seed, t), so a killed and resumed search makes exactly the same
candidates as an uninterrupted one. Generations are made whole before any is evaluated, which is
why in-process and Ray evaluation give the same study.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from attnc.compiler.errors import AttncError, ConfigError, DataError, EvaluationError

from .evaluator import CallableEvaluator, EvalResult, Evaluator
from .paths import (BINARY, INPUTS, NODE, TABLE1, UNARY, Path as FPath, check_shapes, insert_op, operand_category,
                    remove_op, to_text)
from .space import KERNEL_SIZES, Architecture, LayerChoice, elementwise_primitives, unknown_primitives
from .study import Study

ALGORITHMS = ("opnas", "ea", "random")
MAX_TRIES = 500          # illegal candidates tolerated while making one layer before giving up


@dataclass(frozen=True)
class Space:
    num_layers: int = 4
    hidden_size: int = 128
    intermediate_size: int = 512
    num_heads: int = 4
    primitives: tuple[str, ...] = TABLE1    # the paper's Table 1; any elementwise function may be added
    min_inputs: int = 2
    max_inputs: int = 4
    kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    min_path: int = 2
    max_path: int = 10
    conv_prob: float = 0.25       # chance a sampled layer is a convolution (0: attention only)
    branch_prob: float = 0.2      # chance an op reads an earlier node instead of the previous one (0: a chain)
    node_operands: bool = True    # a binary op's operand may be an earlier node, not only an input

    def __post_init__(self):
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be positive, got {self.num_layers}")
        bad = unknown_primitives(self.primitives, UNARY + BINARY)   # elementwise: the ops table
        if bad:
            raise ConfigError(f"unknown primitive(s) {bad}",
                              hint=f"choose from {TABLE1 + tuple(elementwise_primitives())}")
        if not any(p in BINARY for p in self.primitives):
            raise ConfigError("the primitives need a binary op (add, matmul, cos, dist) to use 2+ inputs")
        if not 1 <= self.min_inputs <= self.max_inputs <= 4:
            raise ConfigError(f"need 1 <= min_inputs <= max_inputs <= 4, got {self.min_inputs}, {self.max_inputs}")
        if not set(self.kernel_sizes) <= set(KERNEL_SIZES) or not self.kernel_sizes:
            raise ConfigError(f"kernel sizes must be a non-empty subset of {KERNEL_SIZES}")
        if not 1 <= self.min_path <= self.max_path:
            raise ConfigError(f"need 1 <= min_path <= max_path, got {self.min_path}, {self.max_path}")
        for name in ("conv_prob", "branch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        object.__setattr__(self, "primitives", tuple(self.primitives))
        object.__setattr__(self, "kernel_sizes", tuple(self.kernel_sizes))

    def checks(self):
        from attnc.compiler.check import CheckOptions
        return CheckOptions(min_inputs=self.min_inputs, max_inputs=self.max_inputs)

    @property
    def operand_options(self) -> tuple[str, ...]:
        """What a binary op's operand may be: an input, or (NODE) an earlier node of the path."""
        return INPUTS + ((NODE,) if self.node_operands else ())

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# --- candidates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    arch: Architecture
    genes: tuple              # per layer: Path (attention) or None (conv)
    illegal: int = 0          # illegal graphs rejected on the way


class Stats:
    """Counters of the generator, kept by the caller."""

    def __init__(self):
        self.illegal = 0


@dataclass(frozen=True)
class Priorities:
    """What the OP-NAS generator samples from (Equation 3): per path position a distribution over
    the primitives (`ops`) and over a binary op's operand (`operands`: Q, K, V, P or NODE), one over
    the start input (`start`), and per layer one over the kernel sizes (`kernels`). Missing entries
    (positions beyond the longest path evaluated) are uniform."""

    ops: tuple = ()
    operands: tuple = ()
    start: dict | None = None
    kernels: tuple = ()

    @staticmethod
    def of(value) -> "Priorities":
        """A Priorities from what callers pass: None, a Priorities, or a list of op distributions."""
        if value is None:
            return Priorities()
        if isinstance(value, Priorities):
            return value
        return Priorities(ops=tuple(value))

    def op(self, p: int) -> dict | None:
        return self.ops[p] if p < len(self.ops) else None

    def operand(self, p: int) -> dict | None:
        return self.operands[p] if p < len(self.operands) else None


def check_path(path: FPath, space: Space) -> LayerChoice | None:
    """The layer a path compiles to, or None when it is illegal (shape pre-check, then compiler)."""
    if not check_shapes(path):
        return None
    if not space.min_inputs <= len(path.inputs) <= space.max_inputs:
        return None
    from attnc.compiler.api import analyze
    try:
        a = analyze(to_text(path), checks=space.checks())
    except AttncError:
        return None
    if not space.min_inputs <= len(a.inputs) <= space.max_inputs:
        return None
    return LayerChoice("attention", formula=a.canonical)


def _pick(rng: random.Random, dist: dict | None, options: Sequence, exclude=()):
    options = [o for o in options if o not in exclude]
    if not dist:
        return rng.choice(list(options))
    keys = [o for o in options if o in dist] or list(options)
    weights = [dist.get(o, 0.0) for o in keys]
    if sum(weights) <= 0:
        return rng.choice(keys)
    return rng.choices(keys, weights=weights)[0]


def _operand(rng, space: Space, p: int, dist=None, exclude=()):
    """A binary op's operand at position p: an input, or an earlier node (0 .. p) drawn uniformly."""
    cat = _pick(rng, dist, space.operand_options, exclude=exclude)
    return rng.randint(0, p) if cat == NODE else cat


def _random_op(rng, space: Space, p: int, pri: Priorities, branch: bool = True):
    """An op for position p: the primitive by priority, a binary op's operand by priority, and with
    probability branch_prob (when `branch`) an earlier node than the previous one as its input."""
    op = _pick(rng, pri.op(p), space.primitives)
    out = (op, _operand(rng, space, p, pri.operand(p)) if op in BINARY else None)
    if branch and p >= 1 and rng.random() < space.branch_prob:
        out = out + (rng.randrange(p),)
    return out


def sample_path(rng: random.Random, space: Space, priorities: list | Priorities | None = None,
                stats: Stats | None = None) -> tuple[FPath, LayerChoice]:
    """A random legal path (ops, operands and the start input drawn from the priorities when given)."""
    pri = Priorities.of(priorities)
    for _ in range(MAX_TRIES):
        k = rng.randint(space.min_path, space.max_path)
        ops = tuple(_random_op(rng, space, p, pri) for p in range(k))
        path = FPath(_pick(rng, pri.start, INPUTS), ops)
        layer = check_path(path, space)
        if layer is not None:
            return path, layer
        if stats:
            stats.illegal += 1
    raise ConfigError(f"no legal formula in {MAX_TRIES} samples of this space",
                      hint="allow more primitives, longer paths or fewer required inputs")


MUTATIONS = ("replace", "input", "insert", "remove", "rewire")


def mutate_path(rng: random.Random, path: FPath, space: Space, priorities: list | Priorities | None = None,
                stats: Stats | None = None) -> tuple[FPath, LayerChoice]:
    """One intra-layer mutation: insert, remove or replace an op, change an input (the start input or
    a binary op's operand, by priority), or rewire an op to read another earlier node. A parent of
    length k mutates with the first k position distributions (k + 1 for an insert at the end)."""
    pri = Priorities.of(priorities)
    k = len(path.ops)
    for _ in range(MAX_TRIES):
        kinds = ["replace", "input"] + (["insert"] if k < space.max_path else []) + (
            ["remove"] if k > space.min_path else []) + (["rewire"] if space.branch_prob > 0 and k > 1 else [])
        kind = rng.choice(kinds)
        child = _mutation(rng, path, space, pri, kind)
        layer = check_path(child, space) if child is not None else None
        if layer is not None and child != path:
            return child, layer
        if stats and layer is None and child is not None:
            stats.illegal += 1
    raise ConfigError(f"no legal mutation of {to_text(path)} in {MAX_TRIES} tries")


def _mutation(rng, path: FPath, space: Space, pri: Priorities, kind: str) -> FPath | None:
    k = len(path.ops)
    ops = list(path.ops)
    if kind == "insert":
        p = rng.randint(0, k)
        return insert_op(path, p, _random_op(rng, space, p, pri, branch=False))
    if kind == "remove":
        return remove_op(path, rng.randrange(k))
    if kind == "replace":
        p = rng.randrange(k)
        new = _random_op(rng, space, p, pri, branch=False)
        ops[p] = new + ops[p][2:]           # keeps the op's input (src)
        return FPath(path.start, tuple(ops))
    if kind == "rewire":                    # another input node for op p: the previous one or an earlier one
        p = rng.randrange(1, k)
        now = path.src(p)
        choices = [j for j in range(p + 1) if j != now]
        j = rng.choice(choices)
        ops[p] = ops[p][:2] + ((j,) if j != p else ())
        return FPath(path.start, tuple(ops))
    # change an input: the start or a binary op's operand
    slots = [-1] + [i for i, o in enumerate(ops) if o[0] in BINARY]
    s = rng.choice(slots)
    if s < 0:
        return FPath(_pick(rng, pri.start, INPUTS, exclude=(path.start,)), tuple(ops))
    now = ops[s][1]
    cat = operand_category(now)
    x = _operand(rng, space, s, pri.operand(s), exclude=(cat,) if cat != NODE else ())
    if x == now:
        return None
    ops[s] = (ops[s][0], x) + ops[s][2:]
    return FPath(path.start, tuple(ops))


def sample_arch(rng: random.Random, space: Space, stats: Stats | None = None,
                priorities: Priorities | None = None) -> Candidate:
    layers, genes = [], []
    pri = Priorities.of(priorities)
    for i in range(space.num_layers):
        if rng.random() < space.conv_prob:
            layers.append(LayerChoice.conv(_pick(rng, pri.kernels[i] if i < len(pri.kernels) else None,
                                                 space.kernel_sizes)))
            genes.append(None)
        else:
            path, layer = sample_path(rng, space, pri, stats=stats)
            layers.append(layer)
            genes.append(path)
    return Candidate(_arch(space, layers), tuple(genes))


def mutate_arch(rng: random.Random, parent: Candidate, space: Space, priorities: list | Priorities | None = None,
                kernel_dists: list | None = None, stats: Stats | None = None) -> Candidate:
    """Inter-layer mutation (random, as vanilla EA: attention <-> conv, kernel size), then one
    intra-layer mutation of an attention layer guided by the priorities."""
    pri = Priorities.of(priorities)
    if kernel_dists is None and pri.kernels:
        kernel_dists = list(pri.kernels)
    layers, genes = list(parent.arch.layers), list(parent.genes)
    L = len(layers)
    for i in range(L):
        if rng.random() >= 1.0 / L:
            continue
        kd = kernel_dists[i] if kernel_dists else None
        if layers[i].kind == "attention" or rng.random() < 0.5:
            if layers[i].kind == "attention" and space.conv_prob > 0:
                layers[i], genes[i] = LayerChoice.conv(_pick(rng, kd, space.kernel_sizes)), None
            elif layers[i].kind == "conv":
                genes[i], layers[i] = sample_path(rng, space, pri, stats)
        else:   # another kernel size
            others = [k for k in space.kernel_sizes if k != layers[i].kernel_size]
            if others:
                layers[i] = LayerChoice.conv(_pick(rng, kd, others))
    attn = [i for i in range(L) if genes[i] is not None]
    if attn:
        i = rng.choice(attn)
        genes[i], layers[i] = mutate_path(rng, genes[i], space, pri, stats)
    return Candidate(_arch(space, layers), tuple(genes))


def _arch(space: Space, layers) -> Architecture:
    return Architecture(tuple(layers), hidden_size=space.hidden_size,
                        intermediate_size=space.intermediate_size, num_heads=space.num_heads)


# --- operation priorities (Equation 3) ---------------------------------------------------------------


def ucb(samples: list[tuple[Any, float]], options: Sequence, alpha: float, temperature: float = 1.0) -> dict:
    """u_i = mu_i + alpha * sqrt(2 ln N / N_i) for each option i, from (option, score) samples;
    returns softmax(u / temperature) as {option: probability}. mu_i = mean score of the samples of
    i, N_i their count, N all samples. An option never sampled gets mu = the mean of all samples and
    N_i = 1 (the largest bonus any option can have), so it is tried; with no samples the result is
    uniform. The search passes scores normalised within their generation (normalised_scores)."""
    if not samples:
        return {o: 1.0 / len(options) for o in options}
    N = len(samples)
    mean_all = sum(s for _, s in samples) / N
    u = {}
    for o in options:
        got = [s for x, s in samples if x == o]
        n_i = len(got) or 1
        mu = sum(got) / len(got) if got else mean_all
        u[o] = (mu + alpha * math.sqrt(2.0 * math.log(N) / n_i)) / temperature
    top = max(u.values())
    ex = {o: math.exp(v - top) for o, v in u.items()}
    z = sum(ex.values())
    return {o: v / z for o, v in ex.items()}


def op_priorities(evaluated: list[tuple[Candidate, float]], space: Space, alpha: float,
                  temperature: float = 1.0) -> list[dict]:
    """One distribution per path position, up to the longest path evaluated."""
    longest = max((len(g.ops) for c, _ in evaluated for g in c.genes if g is not None), default=0)
    out = []
    for p in range(longest):
        samples = [(g.ops[p][0], s) for c, s in evaluated for g in c.genes if g is not None and len(g.ops) > p]
        out.append(ucb(samples, space.primitives, alpha, temperature))
    return out


def operand_priorities(evaluated: list[tuple[Candidate, float]], space: Space, alpha: float,
                       temperature: float = 1.0) -> list[dict]:
    """Per path position, the distribution of a binary op's operand (Q, K, V, P, NODE), from the
    binary ops evaluated at that position."""
    longest = max((len(g.ops) for c, _ in evaluated for g in c.genes if g is not None), default=0)
    out = []
    for p in range(longest):
        samples = [(operand_category(g.ops[p][1]), s) for c, s in evaluated for g in c.genes
                   if g is not None and len(g.ops) > p and g.ops[p][1] is not None]
        out.append(ucb(samples, space.operand_options, alpha, temperature))
    return out


def start_priorities(evaluated: list[tuple[Candidate, float]], space: Space, alpha: float,
                     temperature: float = 1.0) -> dict:
    return ucb([(g.start, s) for c, s in evaluated for g in c.genes if g is not None], INPUTS, alpha, temperature)


def kernel_priorities(evaluated: list[tuple[Candidate, float]], space: Space, alpha: float,
                      temperature: float = 1.0) -> list[dict]:
    """Per layer, the kernel sizes' own distribution (same Equation 3 over kernel sizes)."""
    out = []
    for i in range(space.num_layers):
        samples = [(c.arch.layers[i].kernel_size, s) for c, s in evaluated
                   if i < len(c.arch.layers) and c.arch.layers[i].kind == "conv"]
        out.append(ucb(samples, space.kernel_sizes, alpha, temperature))
    return out


def priorities(evaluated: list[tuple[Candidate, float]], space: Space, alpha: float,
               temperature: float = 1.0) -> Priorities:
    return Priorities(tuple(op_priorities(evaluated, space, alpha, temperature)),
                      tuple(operand_priorities(evaluated, space, alpha, temperature)),
                      start_priorities(evaluated, space, alpha, temperature),
                      tuple(kernel_priorities(evaluated, space, alpha, temperature)))


Z_CLIP = 3.0


def normalised_scores(rows) -> dict[int, float]:
    """{candidate id: z-score of its score within its generation} for the evaluated rows: (score -
    the generation's mean) / its standard deviation, clipped to +-3; 0 in a generation of one score
    or no spread. What Equation 3 averages, so that priorities do not depend on the scale of the
    scores (losses of 6.2-6.6 nats, accuracies of 0.5-0.6) and a weight-shared supernet's drift
    between generations does not enter them."""
    by_gen: dict[int, list] = {}
    for r in rows:
        if r.status == "done" and r.score is not None:
            by_gen.setdefault(r.generation, []).append(r)
    out = {}
    for rs in by_gen.values():
        scores = [r.score for r in rs]
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
        for r in rs:
            out[r.id] = 0.0 if sd <= 0 else max(-Z_CLIP, min(Z_CLIP, (r.score - mean) / sd))
    return out


def guide(rows, space: Space, alpha: float, temperature: float) -> Priorities:
    """The OP-NAS generator's priorities from a study's rows (normalised scores, Equation 3)."""
    z = normalised_scores(rows)
    evaluated = [(_candidate_of(r), z[r.id]) for r in rows if r.id in z]
    return priorities(evaluated, space, alpha, temperature)


# --- the search loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    id: int
    architecture: Architecture
    score: float
    generation: int
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0


@dataclass(frozen=True)
class Rescored:
    """A candidate scored again after the search, from the final shared state, with `n` seeds:
    `score` is their mean and `se` its standard error (NaN for one seed)."""
    id: int
    architecture: Architecture
    score: float
    se: float
    n: int
    search_score: float        # its score when it was evaluated during the search


@dataclass(frozen=True)
class SearchResult:
    best_architecture: Architecture | None
    best_score: float | None   # the best re-scored mean when the search re-scored its top (see rescored)
    evaluations: list          # Evaluation of every successful evaluation, in completion order
    failed: int                # evaluations that raised or gave NaN/inf (count toward the budget)
    duplicates: int            # candidates not evaluated: equal to an evaluated one
    illegal: int               # illegal graphs rejected while making the recorded candidates
    study: str
    rescored: list = field(default_factory=list)   # Rescored, best first (weight sharing: the final top)
    warmup: int = 0            # supernet warm-up children trained before any candidate was scored

    def top(self, k: int = 5) -> list:
        return sorted(self.evaluations, key=lambda e: (-e.score, e.id))[:k]


def search(space: Space, evaluate: Callable | Evaluator | None = None, algorithm: str = "opnas",
           weight_sharing: bool = True, budget: int = 100, seed: int = 0, population: int = 100,
           top_k: int = 5, children: int = 5, alpha: float = 0.5, temperature: float = 1.0,
           study: str | Path | None = None, ray: int | None = None, ray_address: str | None = None,
           ray_in_flight: int | None = None, ray_gpus_per_task: float | None = None,
           rescore_top: int | None = None, rescore_seeds: int = 3, checkpoint_every: int = 10,
           progress: bool = False, callbacks: Sequence[Callable[[Evaluation], None]] = ()) -> SearchResult:
    """Run (or resume: reopen the same study) a search until `budget` evaluations finished.

    evaluate: None -> the BIWS proxy evaluator (attnc.search.proxy); a callable arch -> score
    (higher is better); or an Evaluator. ray: start a local Ray with that many CPUs;
    ray_address: join a cluster. ray_in_flight: the most evaluations running at once on Ray
    (default: the cluster's CPUs). ray_gpus_per_task: GPUs each Ray task asks for (default 1 when
    the evaluator trains on CUDA, or on "auto" in a cluster with GPUs; else 0). study: the SQLite
    file (None: a new temporary folder). temperature: of Equation 3's softmax over z-scored means
    (normalised_scores).

    Under weight sharing: the evaluator's warm-up children train the supernet before anything is
    scored; the children of one generation (and its parents, re-scored as elites) all start from
    one supernet snapshot and their updates are merged at the generation's end, so parents are
    chosen among scores of one snapshot; after the budget the `rescore_top` best of the last
    generation (default top_k) are scored again with `rescore_seeds` seeds from the final supernet,
    and the best mean of those is the result's best. The supernet is checkpointed every
    `checkpoint_every` evaluations and at the end of each generation; a resumed search reruns what
    finished after the latest checkpoint.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}", hint=f"choose one of {', '.join(ALGORITHMS)}")
    for name, v in (("budget", budget), ("population", population), ("top_k", top_k), ("children", children),
                    ("rescore_seeds", rescore_seeds), ("checkpoint_every", checkpoint_every)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if rescore_top is not None and (not isinstance(rescore_top, int) or rescore_top < 0):
        raise ConfigError(f"rescore_top must be a non-negative integer, got {rescore_top!r}")
    if ray is not None and (isinstance(ray, bool) or not isinstance(ray, int) or ray < 1):
        raise ConfigError(f"ray must be a positive number of workers, got {ray!r}")
    if ray is not None and ray_address is not None:
        raise ConfigError("ray= starts a local Ray and ray_address= joins a cluster: give one of them")
    if ray_address is not None:
        _check_ray_address(ray_address)
    if ray_in_flight is not None and (not isinstance(ray_in_flight, int) or ray_in_flight < 1):
        raise ConfigError(f"ray_in_flight must be a positive integer, got {ray_in_flight!r}")
    if ray_gpus_per_task is not None and not (isinstance(ray_gpus_per_task, (int, float))
                                              and ray_gpus_per_task >= 0):
        raise ConfigError(f"ray_gpus_per_task must be >= 0, got {ray_gpus_per_task!r}")
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    evaluator = _resolve_evaluator(evaluate, weight_sharing)
    if rescore_top is None:
        rescore_top = top_k if evaluator.weight_sharing else 0
    if study is None:
        import tempfile
        study = Path(tempfile.mkdtemp(prefix="attnc-search-")) / "study.db"
    st = Study(study)
    started_ray, bar = None, None
    try:
        st.lock()
        # budget may grow on resume (search further); everything that shapes candidates, and what
        # the scores mean (the evaluator), must match
        before = st.meta()
        st.check_meta({"space": space.to_json(), "algorithm": algorithm, "seed": seed, "population": population,
                       "top_k": top_k, "children": children, "alpha": alpha, "temperature": temperature,
                       "weight_sharing": bool(evaluator.weight_sharing), "evaluator": evaluator.identity(),
                       "seeding": "generation"})
        if before and "seeding" not in before:
            warnings.warn(f"the study {study} was made when each candidate trained with its own seed; its new "
                          f"generations train with one seed per generation (_generation_seed)", stacklevel=2)
        if evaluator.weight_sharing:   # the latest checkpoint's state; what finished after it runs again
            ck = st.latest_checkpoint()
            if ck is not None:
                evaluator.load_state_dict(st.load_state(ck.file))
            st.reset_after(ck)
        loop = _Loop(space, evaluator, algorithm, budget, seed, population, top_k, children, alpha, st, callbacks)
        loop.temperature, loop.rescore_top, loop.rescore_seeds = temperature, rescore_top, rescore_seeds
        loop.checkpoint_every = checkpoint_every
        loop.in_flight, loop.gpus = ray_in_flight, ray_gpus_per_task
        started_ray = _start_ray(ray, ray_address)
        if progress:
            from attnc._progress import progress_bar
            c = counts(st)   # a resumed search starts its bar (and its ETA) at what is already done
            bar = progress_bar(total=budget, initial=min(budget, c["evaluated"] + c["failed"]),
                       desc=f"search {algorithm}", unit="eval")
            loop.bar = bar
        loop.run(use_ray=started_ray is not None)
        return result_from_study(st)
    finally:
        if bar is not None:
            bar.close()
        if started_ray == "started":
            import ray as _ray
            _ray.shutdown()
        st.close()


def _resolve_evaluator(evaluate, weight_sharing: bool) -> Evaluator:
    if evaluate is None:
        from attnc.search.proxy import ProxyConfig, ProxyEvaluator   # heavy (trainer, data): lazy
        return ProxyEvaluator(ProxyConfig(weight_sharing=weight_sharing))
    if isinstance(evaluate, Evaluator):
        return evaluate
    if callable(evaluate):
        return CallableEvaluator(evaluate)
    raise ConfigError(f"evaluate must be None, a callable or an Evaluator, got {type(evaluate).__name__}")


def _check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (ConfigError) when a host:port Ray address does not answer, rather than hang in
    ray.init. Other forms ("auto", "ray://...") are left to Ray."""
    import re
    import socket

    m = re.fullmatch(r"\[?([\w.\-:]+?)\]?:(\d+)", address) if isinstance(address, str) else None
    if not isinstance(address, str) or not address:
        raise ConfigError(f"bad Ray address {address!r}", hint="give host:port of the cluster's head")
    if m is None:
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e})",
                          hint="start one with `ray start --head --port PORT`, or check the address") from None


def _start_ray(ray_cpus, address):
    if ray_cpus is None and address is None:
        return None
    try:
        import ray as _ray
    except ImportError:
        raise ConfigError("Ray is not installed", hint='pip install "attnc[distributed]"') from None
    if _ray.is_initialized():
        return "joined"
    import os
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        try:
            _ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {e}",
                              hint="check the address (`ray status` on the head node) and that this "
                                   "machine reaches it") from None
    else:
        # address="local": always a new local Ray (never a cluster some other run left behind)
        _ray.init(address="local", num_cpus=int(ray_cpus), include_dashboard=False, log_to_driver=False)
    return "started"


def _generation_seed(seed: int, gen: int) -> int:
    """The seed of every evaluation of generation `gen` (its children and its re-scored parents):
    common random numbers -- the same batches, masks and draws for all of them, so the scores that
    choose parents and drive the priorities differ by architecture, not by data (against 2,000-step
    training on 16 architectures the weight-shared proxy's Kendall tau was higher at each of four
    warm-ups, mean +0.56 against +0.38: benchmarks/results/fidelity_crn16_cpu.txt). Under weight
    sharing the generation's updates are averaged, so the supernet moves one child's worth per
    generation as before, but that step has seen one child's batches rather than a population's;
    each generation gets new data."""
    return (seed * 1_000_003 + 500_009 * (gen + 1)) % (2 ** 31)


def _candidate_of(row) -> Candidate:
    genes = tuple(FPath.from_json(g) if g is not None else None for g in row.genes)
    return Candidate(row.arch, genes, row.illegal)


_FP_CACHE: dict[str, str] = {}


def fingerprint_key(arch: Architecture, space: Space) -> str:
    """Key of the architecture up to numerically equivalent formulas (float64 fingerprints)."""
    import hashlib

    from attnc.compiler.api import analyze
    from attnc.compiler.equiv import fingerprint
    parts = [f"{arch.hidden_size}-{arch.intermediate_size}-{arch.num_heads}"]
    for c in arch.layers:
        if c.kind == "conv":
            parts.append(f"conv{c.kernel_size}")
            continue
        fp = _FP_CACHE.get(c.formula)
        if fp is None:
            fp = _FP_CACHE[c.formula] = fingerprint(analyze(c.formula, checks=space.checks()).simplified)
        parts.append(f"fp:{fp}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Job:
    """One training run: a candidate ("candidate", its row), a warm-up child ("warmup", its number)
    or a re-score ("rescore", its row). `done(result, error, seconds)` records it."""
    kind: str
    arch: Architecture
    seed: int
    runner: Any
    done: Callable
    start: Callable = lambda: None


class _Loop:
    def __init__(self, space, evaluator, algorithm, budget, seed, population, top_k, children, alpha, st,
                 callbacks):
        self.space, self.ev, self.algorithm, self.budget, self.seed = space, evaluator, algorithm, budget, seed
        self.population, self.top_k, self.children, self.alpha = population, top_k, children, alpha
        self.st, self.callbacks, self.bar = st, callbacks, None
        self.runner = evaluator.runner()
        self.temperature, self.rescore_top, self.rescore_seeds, self.checkpoint_every = 1.0, 0, 1, 10
        self.in_flight = None     # Ray: the most tasks running at once (None: the cluster's CPUs)
        self.gpus = None          # Ray: GPUs per task (None: from the evaluator's device)
        self.use_ray = False
        self._since_checkpoint = 0
        self.failed_here = self.done_here = 0   # this process's finished candidates (_check_not_all_failed)

    @property
    def shared(self) -> bool:
        return bool(self.ev.weight_sharing)

    def run(self, use_ray: bool) -> None:
        self.use_ray = use_ray
        if self.shared:
            self._warmup()
        stalls = 0
        while True:
            rows = self.st.rows()
            finished = sum(r.status in ("done", "failed") for r in rows)
            self._update_bar(rows)
            if finished >= self.budget:
                if self.shared and self.rescore_top > 0:
                    self._final_rescores(rows)
                return
            self._check_not_all_failed(rows)
            todo = [r for r in rows if r.status in ("pending", "running")]   # running: interrupted
            if todo:
                stalls = 0
                self._run_generation(todo)
                continue
            made, elites = self._generation(rows, self.budget - finished)
            self.st.insert_many(made)
            if elites:
                self.st.add_rescores(elites)
            if not any(m["status"] == "pending" for m in made):
                stalls += 1
                if stalls >= 20:
                    warnings.warn(f"search stopped early: 20 generations in a row held only duplicates "
                                  f"({finished} of {self.budget} evaluations done); the space is "
                                  f"exhausted for these settings", stacklevel=3)
                    return

    def _check_not_all_failed(self, rows) -> None:
        """Stop a search whose evaluator failed on every candidate it was given in this process, at
        least a generation's worth (population) and none succeeded in the study: it is broken for
        every candidate, and the rest of the budget would only record the same error again. (A
        resumed study whose old failures had another cause goes on.)"""
        if self.failed_here < min(self.population, self.budget) or self.done_here or \
                any(r.status == "done" for r in rows):
            return
        failed = [r for r in rows if r.status == "failed"]
        if failed:
            first = min(failed, key=lambda r: r.id)
            raise self._all_failed(f"{len(failed)} evaluations", f"candidate {first.id}", first.error)

    def _all_failed(self, what: str, first: str, error) -> EvaluationError:
        return EvaluationError(f"the first {what} of the study {self.st.path} all failed; the first one ({first}): "
                               f"{error}", hint="fix the evaluator (run it on one architecture to see the "
                                                "traceback), then start a new study")

    # --- making candidates ----------------------------------------------------------------------------

    def _pool(self, rows) -> list[tuple[Any, float]]:
        """(row, score) the parents are chosen from. Under weight sharing: the last generation's
        children and the elites re-scored with it (one supernet snapshot: comparable scores);
        otherwise every evaluated candidate."""
        done = [r for r in rows if r.status == "done"]
        if not self.shared or not done:
            return [(r, r.score) for r in done]
        gen = max(r.generation for r in done)
        by_id = {r.id: r for r in rows}
        best: dict[int, float] = {r.id: r.score for r in done if r.generation == gen}
        for e in self.st.rescores("WHERE kind='elite' AND status='done' AND generation=?", (gen,)):
            best[e.candidate] = max(best.get(e.candidate, -math.inf), e.score)
        return [(by_id[i], s) for i, s in best.items()]

    def _generation(self, rows, remaining: int) -> tuple[list[dict], list[dict]]:
        gen = max((r.generation for r in rows), default=-1) + 1
        next_id = max((r.id for r in rows), default=0) + 1
        done = [r for r in rows if r.status == "done"]
        seen = {}
        for r in rows:                                # keys of everything evaluated or to be evaluated
            if r.status in ("done", "failed", "pending", "running"):
                seen.setdefault(r.arch_key, r)
                seen.setdefault(r.fp_key, r)
        parents = []
        if gen == 0 or self.algorithm == "random" or not done:
            plan = [None] * self.population
        else:
            pool = sorted(self._pool(rows), key=lambda rs: (-rs[1], rs[0].id))
            parents = [r for r, _ in pool[: self.top_k]]
            plan = [p for p in parents for _ in range(self.children)]
        pri = None
        if self.algorithm == "opnas" and done:
            pri = guide(rows, self.space, self.alpha, self.temperature)
        out, pending = [], 0
        for parent in plan:
            if pending >= remaining:
                break
            cid = next_id + len(out)
            rng = random.Random(f"attnc-opnas:{self.seed}:{cid}")   # str seeds are hashed stably
            stats = Stats()
            if parent is None:
                cand = sample_arch(rng, self.space, stats)
            else:
                cand = mutate_arch(rng, _candidate_of(parent), self.space, pri, stats=stats)
            ak, fk = cand.arch.key(), fingerprint_key(cand.arch, self.space)
            item = {"id": cid, "generation": gen, "arch": cand.arch, "arch_key": ak, "fp_key": fk,
                    "genes": [g.to_json() if g is not None else None for g in cand.genes],
                    "parents": [parent.id] if parent is not None else [], "illegal": stats.illegal,
                    "seed": _generation_seed(self.seed, gen)}
            twin = seen.get(ak) or seen.get(fk)
            if twin is not None:
                item.update(status="duplicate", duplicate_of=twin.id,
                            score=twin.score if twin.status == "done" else None)
            else:
                item["status"] = "pending"
                pending += 1
                marker = _Pending(cid)
                seen[ak] = seen[fk] = marker
            out.append(item)
        # under weight sharing the parents are scored again from this generation's snapshot
        elites = [{"candidate": p.id, "generation": gen, "kind": "elite", "seed": _generation_seed(self.seed, gen)}
                  for p in parents] if self.shared and pending else []
        return out, elites

    # --- warm-up, generations, re-scores --------------------------------------------------------------

    def _warmup(self) -> None:
        """The supernet warm-up: random children of the space trained one after another (on Ray:
        rounds of `in_flight` children from one snapshot, merged) before anything is scored."""
        n = int(self.ev.warmup_children or 0)
        have = {w["i"] for w in self.st.warmup_rows()}
        todo = [i for i in range(n) if i not in have]
        if not todo:
            return
        runner = self.ev.warmup_runner()
        width = self._width() if self.use_ray else 1
        for k in range(0, len(todo), width):
            batch = todo[k:k + width]
            jobs = []
            for i in batch:
                arch = sample_arch(random.Random(f"attnc-warmup:{self.seed}:{i}"), self.space).arch
                seed = (self.seed * 1_000_003 + 900_001 + i) % (2 ** 31)
                jobs.append(_Job("warmup", arch, seed, runner, self._warmup_done(i, arch, seed)))
            if width > 1:
                self.ev.begin_generation()
            self._execute(jobs)
            if width > 1:
                self.ev.end_generation()
            self._check_warmup_not_all_failed(k + len(batch), n)
            last = batch[-1]
            if last == n - 1 or (last + 1) % self.checkpoint_every == 0:
                name = self._save()
                self.st.add_checkpoint(name, warmup_done=last + 1, open_generation=False)
                self.st.prune_states(keep=name)

    def _check_warmup_not_all_failed(self, ran: int, n: int) -> None:
        """Stop a warm-up whose first children in this process all failed (a population's worth, or
        all of them) while none in the study succeeded: the evaluator is broken for every child, and
        going on would only train nothing for the rest of the warm-up and then fail the candidates."""
        if ran < min(self.population, n) or self.st.warmup_count(("done",)):
            return
        failed = self.st.warmup_rows()   # none done: every row failed
        raise self._all_failed(f"{len(failed)} supernet warm-up children", f"child {failed[0]['i']}",
                               failed[0]["error"])

    def _warmup_done(self, i, arch, seed):
        def done(res, err, seconds):
            row = {"i": i, "arch": arch, "seed": seed, "seconds": seconds}
            if err is None:
                self.ev.commit(arch, res)
                row.update(status="done", score=float(res.score), metrics=res.metrics, steps=res.steps)
            else:
                row.update(status="failed", error=err)
            self.st.finish_warmup(**row)
        return done

    def _run_generation(self, todo) -> None:
        gen = todo[0].generation
        jobs = [_Job("candidate", r.arch, r.seed, self.runner, self._candidate_done(r),
                     start=lambda r=r: self.st.mark_running(r.id)) for r in todo]
        if self.shared:
            by_id = {r.id: r for r in self.st.rows()}
            for e in self.st.rescores("WHERE kind='elite' AND status!='done' AND status!='failed' "
                                      "AND generation=?", (gen,)):
                jobs.append(_Job("rescore", by_id[e.candidate].arch, e.seed, self.runner, self._rescore_done(e.id)))
        self.ev.begin_generation()
        self._execute(jobs)
        self.ev.end_generation()
        if self.shared:
            name = self._save()
            self.st.add_checkpoint(name, warmup_done=self.st.warmup_count(), open_generation=False)
            self.st.prune_states(keep=name)

    def _final_rescores(self, rows) -> None:
        """The top of the last generation scored again from the final supernet, rescore_seeds seeds
        each (seed j the same for every candidate: paired, as a generation's scores are). Their `generation` is the number of finished evaluations they were made after: a search
        resumed with a larger budget re-scores again from its new final state."""
        finished = sum(r.status in ("done", "failed") for r in rows)
        have = self.st.rescores("WHERE kind='final'")
        if have and have[0].generation != finished:
            self.st.delete_rescores("final")
            have = []
        if not have:
            pool = sorted(self._pool(rows), key=lambda rs: (-rs[1], rs[0].id))[: self.rescore_top]
            gen = finished
            self.st.add_rescores([{"candidate": r.id, "generation": gen, "kind": "final",
                                   "seed": (self.seed * 1_000_003 + 700_001 * (j + 1)) % (2 ** 31)}
                                  for r, _ in pool for j in range(self.rescore_seeds)])
            have = self.st.rescores("WHERE kind='final'")
        by_id = {r.id: r for r in rows}
        jobs = [_Job("rescore", by_id[e.candidate].arch, e.seed, self.runner, self._rescore_done(e.id))
                for e in have if e.status not in ("done", "failed")]
        if jobs:
            self._execute(jobs)

    def _rescore_done(self, rid):
        def done(res, err, seconds):
            err = err or _result_error(res)
            if err is not None:
                self.st.finish_rescore(rid, "failed", error=err, seconds=seconds)
                return
            res.weights = None          # a re-score is a measurement: never written back
            self.st.finish_rescore(rid, "done", score=float(res.score), metrics=res.metrics,
                                   seconds=res.seconds or seconds)
        return done

    # --- evaluating ----------------------------------------------------------------------------------

    def _width(self) -> int:
        import ray as _ray
        return self.in_flight or max(1, int(_ray.cluster_resources().get("CPU", 1)))

    def _prepare(self, job: _Job):
        """The job's payload, or (None, error) when prepare raised: the job fails, the search goes on."""
        try:
            return self.ev.prepare(job.arch), None
        except Exception as e:
            return None, f"prepare: {type(e).__name__}: {e}"

    def _execute(self, jobs) -> None:
        (self._execute_ray if self.use_ray else self._execute_local)(jobs)

    def _execute_local(self, jobs) -> None:
        for job in jobs:
            job.start()
            payload, err = self._prepare(job)
            t0 = time.perf_counter()
            res = None
            if err is None:
                try:
                    res = job.runner(job.arch, payload, job.seed)
                except Exception as e:   # a candidate that breaks is recorded, the search goes on
                    err = f"{type(e).__name__}: {e}"
            job.done(res, err, time.perf_counter() - t0)

    def _execute_ray(self, jobs) -> None:
        """A window of at most `in_flight` tasks: each is prepared (under weight sharing, its initial
        weights cut from the supernet snapshot of its generation) when it is sent, and recorded
        (its update merged) when it completes, in completion order."""
        import ray as _ray
        remote = remote_task(self._gpus())
        runners, limit = {}, self._width()
        queue, refs = list(jobs), {}
        while queue or refs:
            while queue and len(refs) < limit:
                job = queue.pop(0)
                job.start()
                payload, err = self._prepare(job)
                if err is not None:
                    job.done(None, err, 0.0)
                    continue
                if id(job.runner) not in runners:
                    runners[id(job.runner)] = _ray.put(job.runner)
                refs[remote.remote(runners[id(job.runner)], job.arch, payload, job.seed)] = job
            if not refs:
                continue
            ready, _ = _ray.wait(list(refs), num_returns=1)
            res, err, secs = _ray.get(ready[0])
            refs.pop(ready[0]).done(res, err, secs)

    def _gpus(self) -> float:
        if self.gpus is not None:
            return self.gpus
        return default_gpus_per_task(self.ev.device)

    def _candidate_done(self, row):
        def done(res, err, seconds):
            self._finish(row, res, err, seconds)
        return done

    def _save(self) -> str:
        name = self.st.save_state(self.ev.state_dict())
        self._since_checkpoint = 0
        return name

    def _finish(self, row, res: EvalResult | None, err: str | None, seconds: float) -> None:
        err = err or _result_error(res)
        if err is not None:
            self.failed_here += 1
            self.st.finish(row.id, "failed", error=err, seconds=seconds)
        else:
            self.done_here += 1
            self.ev.commit(row.arch, res)
            state_file = checkpoint = None
            if self.shared:
                self._since_checkpoint += 1
                if self._since_checkpoint >= self.checkpoint_every:
                    state_file = self._save()
                    checkpoint = {"warmup_done": self.st.warmup_count(), "open_generation": True}
            self.st.finish(row.id, "done", score=float(res.score), metrics=res.metrics,
                           seconds=res.seconds or seconds, steps=res.steps, state_file=state_file,
                           checkpoint=checkpoint)
            if state_file:
                self.st.prune_states(keep=state_file)
            ev = Evaluation(row.id, row.arch, float(res.score), row.generation, dict(res.metrics),
                            res.seconds or seconds, res.steps)
            for cb in self.callbacks:
                cb(ev)
        self._update_bar(None)

    def _update_bar(self, rows) -> None:
        if self.bar is None:
            return
        c = counts(self.st)
        self.bar.n = c["evaluated"] + c["failed"]
        self.bar.set_postfix(failed=c["failed"], dup=c["duplicates"],
                             best=None if c["best"] is None else round(c["best"], 4), refresh=False)
        self.bar.refresh()


def _result_error(res) -> str | None:
    if not isinstance(res, EvalResult):
        return f"evaluator returned {type(res).__name__}, not an EvalResult"
    if not math.isfinite(res.score):
        return f"score is not finite ({res.score}): training diverged"
    return None


def default_gpus_per_task(device: str, cluster_gpus: float | None = None) -> float:
    """GPUs a Ray task asks for by default: 1 when the evaluator trains on CUDA ("cuda", "cuda:N"),
    or on "auto" when the cluster has GPUs; else 0."""
    device = str(device or "cpu")
    if device.startswith("cuda"):
        return 1
    if device == "auto":
        if cluster_gpus is None:
            import ray as _ray
            cluster_gpus = _ray.cluster_resources().get("GPU", 0) if _ray.is_initialized() else 0
        return 1 if cluster_gpus > 0 else 0
    return 0


def remote_task(gpus: float):
    """The Ray remote function that runs one evaluation, asking for `gpus` GPUs per task."""
    import ray as _ray
    return _ray.remote(num_gpus=gpus)(_ray_task)


class _Pending:
    """Stand-in for a candidate of the generation being made (for dedup within a generation)."""

    status = "pending"
    score = None

    def __init__(self, cid):
        self.id = cid


def _ray_task(runner, arch, payload, seed):
    t0 = time.perf_counter()
    try:
        return runner(arch, payload, seed), None, time.perf_counter() - t0
    except Exception as e:
        return None, f"{type(e).__name__}: {e}", time.perf_counter() - t0


def counts(st: Study) -> dict:
    rows = st.db.execute("SELECT status, COUNT(*), SUM(illegal) FROM candidates GROUP BY status").fetchall()
    by = {s: (n, il or 0) for s, n, il in rows}
    best = st.db.execute("SELECT MAX(score) FROM candidates WHERE status='done'").fetchone()[0]
    return {"evaluated": by.get("done", (0, 0))[0], "failed": by.get("failed", (0, 0))[0],
            "duplicates": by.get("duplicate", (0, 0))[0],
            "pending": by.get("pending", (0, 0))[0] + by.get("running", (0, 0))[0],
            "illegal": sum(il for _, il in by.values()), "best": best}


def result_from_study(st: Study) -> SearchResult:
    rows = st.rows()
    done = sorted((r for r in rows if r.status == "done"), key=lambda r: r.finish_order)
    evs = [Evaluation(r.id, r.arch, r.score, r.generation, r.metrics, r.seconds or 0.0, r.steps or 0)
           for r in done]
    best = max(evs, key=lambda e: (e.score, -e.id), default=None)
    rescored = final_rescores(st, {r.id: r for r in rows})
    c = counts(st)
    warm = st.warmup_count(("done",))
    if rescored:
        return SearchResult(rescored[0].architecture, rescored[0].score, evs, c["failed"], c["duplicates"],
                            c["illegal"], str(st.path), rescored, warm)
    return SearchResult(best.architecture if best else None, best.score if best else None, evs,
                        c["failed"], c["duplicates"], c["illegal"], str(st.path), [], warm)


def final_rescores(st: Study, by_id: dict) -> list[Rescored]:
    """The final re-scores of a study by candidate (mean of its seeds), best first."""
    got: dict[int, list[float]] = {}
    for r in st.rescores("WHERE kind='final' AND status='done'"):
        got.setdefault(r.candidate, []).append(r.score)
    out = []
    for cid, scores in got.items():
        n = len(scores)
        mean = sum(scores) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n) if n > 1 else float("nan")
        out.append(Rescored(cid, by_id[cid].arch, mean, se, n, by_id[cid].score))
    return sorted(out, key=lambda r: (-r.score, r.id))


@contextmanager
def read_study(study: str | Path):
    """Open an existing study for reading: `study` is a search's --out folder or its study.db.
    Yields (study, meta); DataError when the file is missing, is not SQLite, or holds no search
    settings (also for a database error raised while the caller reads it). Closed on exit.
    One opening for `attnc search report`, the plots and open_result."""
    import sqlite3

    p = Path(study)
    if p.is_dir():
        p = p / "study.db"
    if not p.is_file():
        raise DataError(f"no study at {p}", hint="pass a search's --out folder or its study.db")
    try:
        st = Study(p)
    except sqlite3.DatabaseError as e:
        raise DataError(f"{p} is not a study database ({e})") from None
    try:
        meta = st.meta()
        if not meta or "algorithm" not in meta:
            raise DataError(f"{p} holds no search settings: not a study made by attnc search")
        yield st, meta
    except sqlite3.DatabaseError as e:
        raise DataError(f"{p} is not a study database ({e})") from None
    finally:
        st.close()


def open_result(study: str | Path) -> SearchResult:
    """The result of a (finished or not) search from its study file."""
    with read_study(study) as (st, _):
        return result_from_study(st)
