"""Proxy fidelity: is a search's proxy worth its cost? (`attnc search fidelity`, `attnc.search.fidelity`)

Given architectures (a file, one per line, layers separated by ` | ` as the report prints them: a
formula or `conv(k=K)`; or a sample of a space), this trains the truth -- each architecture from
scratch for T MLM steps, with S seeds; its score is the mean of minus the held-out MLM loss -- and
scores the architectures with each proxy:

  * "biws": the weight-shared proxy as a search uses it: a supernet warmed up by `warmup_children`
    children (drawn at random from the architectures, `warmup_steps` steps each (default
    `shared_steps`), written back one after another), then every architecture scored for
    `shared_steps` steps from that same
    supernet state (nothing written back: the order of scoring does not matter);
  * "scratch": from scratch at the same cost: (warm-up steps + N x shared_steps) / N steps each;
  * any Evaluator or function arch -> score (`evaluators`, e.g. a user's `--evaluator`).

Every proxy scores every architecture with one seed (common random numbers): the same training
batches, masks and draws, so the differences between scores are the architectures', not the data's
(on 16 architectures BIWS's tau against the truth was higher at each of four warm-ups, mean +0.56
against +0.38: benchmarks/results/fidelity_crn16_cpu.txt). The
truth trains each seed s of every architecture with the same seed too. `workers` > 1 trains the truth
and the from-scratch proxy in that many processes (spawned; torch threads split between them).

It reports, per proxy, Kendall's tau and Spearman's rho against the truth with bootstrap 90%
intervals (architectures resampled with replacement), each proxy's tau minus the from-scratch
proxy's with a paired interval (both on the same resample), the truth's own agreement (tau between its
first two seeds, with its interval: a ceiling for any proxy) and the seconds per evaluation (the
BIWS warm-up shared out over the architectures). Every finished training is appended to
OUT/fidelity.jsonl at once; a run again with the same OUT skips what is there (BIWS as a whole:
its warm-up and scores are one unit). The truth is kept across proxy settings: a run with the same
truth settings and another shared_steps / warmup_children trains only the proxies again.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from attnc.compiler.errors import ConfigError, DataError

from . import ranking
from .space import Architecture, LayerChoice


# ProxyConfig fields the fidelity tool sets itself for each training
_OWNED = frozenset({"task", "weight_sharing", "pretrain_steps", "shared_pretrain_steps", "warmup_steps",
                    "warmup_children"})


@dataclass(frozen=True)
class FidelityConfig:
    truth_steps: int = 2000
    truth_seeds: int = 2
    shared_steps: int = 40
    warmup_children: int = 60
    warmup_steps: int | None = None     # MLM steps of each warm-up child (None: shared_steps)
    scratch: bool = True                # the from-scratch proxy at BIWS's cost
    biws: bool = True
    bootstrap: int = 2000
    seed: int = 0
    proxy: dict = field(default_factory=dict)   # ProxyConfig fields shared by truth and proxies (task=None etc.)

    def __post_init__(self):
        for name in ("truth_steps", "truth_seeds", "shared_steps", "bootstrap"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"fidelity {name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_children, int) or self.warmup_children < 0:
            raise ConfigError(f"fidelity warmup_children must be a non-negative integer, got {self.warmup_children!r}")
        w = self.warmup_steps
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ConfigError(f"fidelity warmup_steps must be a positive integer (or None: shared_steps), got {w!r}")
        owned = sorted(_OWNED & set(self.proxy))
        if owned:
            raise ConfigError(f"fidelity proxy settings may not set {', '.join(owned)}: the tool sets them for "
                              f"each of its trainings (MLM, from scratch or weight-shared)",
                              hint="use FidelityConfig's truth_steps, shared_steps and warmup_steps")

    @property
    def steps_per_warmup_child(self) -> int:
        return self.shared_steps if self.warmup_steps is None else self.warmup_steps


# --- architectures ------------------------------------------------------------------------------------


def parse_architecture(line: str, hidden: int, ffn: int, heads: int, where: str = "") -> Architecture:
    """One line: layers separated by ` | `, each a formula or `conv(k=K)` (as reports print them)."""
    from attnc.compiler.api import analyze
    from attnc.compiler.errors import AttncError
    from attnc.runtime.config import LAYER_CHECKS

    layers = []
    for part in (p.strip() for p in line.split(" | ")):
        if part.startswith("conv(k=") and part.endswith(")"):
            try:
                layers.append(LayerChoice.conv(int(part[len("conv(k="):-1])))
            except (ValueError, AttncError) as e:
                raise DataError(f"{where}bad convolution layer {part!r}: {e}",
                                hint="write conv(k=K) with K one of the kernel sizes") from None
            continue
        try:
            a = analyze(part, checks=LAYER_CHECKS)
        except AttncError as e:
            raise DataError(f"{where}layer {part!r} is not a formula attnc compiles: {e}",
                            hint="one architecture per line, layers separated by ' | '") from None
        layers.append(LayerChoice("attention", formula=a.canonical))
    return Architecture(tuple(layers), hidden_size=hidden, intermediate_size=ffn, num_heads=heads)


def arch_line(arch: Architecture) -> str:
    """The architectures-file line of `arch` (what parse_architecture reads)."""
    return " | ".join(str(c) for c in arch.layers)


def read_architectures(path, hidden: int = 64, ffn: int = 256, heads: int = 4) -> list[Architecture]:
    """Architectures of a file (blank lines and lines starting with # skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no architectures file at {p}", hint="one architecture per line, layers separated by ' | '")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(parse_architecture(line.strip(), hidden, ffn, heads, where=f"{p}:{n}: "))
    if len(out) < 3:
        raise DataError(f"{p} holds {len(out)} architecture(s); a ranking needs at least 3")
    if len({a.key() for a in out}) != len(out):
        raise DataError(f"{p} lists an architecture twice", hint="each line once")
    return out


def sample_architectures(space, n: int, seed: int = 0) -> list[Architecture]:
    """n distinct architectures sampled from an OP-NAS space."""
    from .opnas import sample_arch

    rng, out, keys = random.Random(f"attnc-fidelity:{seed}"), [], set()
    for _ in range(50 * n):
        a = sample_arch(rng, space).arch
        if a.key() not in keys:
            keys.add(a.key())
            out.append(a)
            if len(out) == n:
                return out
    raise ConfigError(f"the space holds fewer than {n} distinct architectures")


# --- rank statistics -----------------------------------------------------------------------------------


def agreement(proxy: Sequence[float], truth: Sequence[float], reps: int, seed: int) -> dict:
    """Kendall tau-b and Spearman rho of a proxy's scores against the truth's, each with its bootstrap
    90% interval over architectures resampled with replacement (attnc.search.ranking)."""
    def interval(stat, s):
        return ranking.bootstrap(lambda i: stat([proxy[k] for k in i], [truth[k] for k in i]), len(truth),
                                 reps=reps, seed=s, level=0.90)
    return {"kendall_tau": ranking.kendall_tau(proxy, truth), "kendall_tau_ci90": interval(ranking.kendall_tau, seed),
            "spearman_rho": ranking.spearman_rho(proxy, truth),
            "spearman_rho_ci90": interval(ranking.spearman_rho, seed + 1)}


def paired_difference(a: Sequence[float], b: Sequence[float], truth: Sequence[float], reps: int, seed: int) -> dict:
    """Kendall tau of proxy a minus that of proxy b against the truth, with its paired bootstrap 90%
    interval (both taus on the same resample of architectures): whether a ranks better than b."""
    def diff(idx):
        t = [truth[k] for k in idx]
        return ranking.kendall_tau([a[k] for k in idx], t) - ranking.kendall_tau([b[k] for k in idx], t)
    return {"kendall_tau_diff": diff(list(range(len(truth)))),
            "kendall_tau_diff_ci90": ranking.bootstrap(diff, len(truth), reps=reps, seed=seed, level=0.90)}


# --- the run ------------------------------------------------------------------------------------------


class _Log:
    """OUT/fidelity.jsonl: one line per finished training {"what", "arch", "seed", "score", "seconds"}."""

    def __init__(self, folder: Path, settings: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "fidelity.jsonl"
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            if lines and lines[0].get("settings") != json.loads(json.dumps(settings)):
                raise ConfigError(f"{self.path} was made with other settings",
                                  hint="use another output folder, or the same settings to resume")
            for r in lines[1:]:
                self.rows[(r["what"], r["arch"], r["seed"])] = r
        else:
            self._append({"settings": settings})

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def get(self, what, arch, seed):
        return self.rows.get((what, arch, seed))

    def add(self, what, arch, seed, score, seconds, **extra) -> dict:
        row = {"what": what, "arch": arch, "seed": seed, "score": score, "seconds": seconds, **extra}
        self.rows[(what, arch, seed)] = row
        self._append(row)
        return row


def fidelity(architectures: Sequence[Architecture], out, config: FidelityConfig = FidelityConfig(), *,
             evaluators: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
             workers: int = 1, ops_modules: Sequence[str] = ()) -> dict:
    """Train the truth and score each proxy on `architectures`; results in OUT (resumable), returned
    as a dict (see the module doc). evaluators: {name: an Evaluator or a function arch -> score}.
    workers: processes for the truth and the from-scratch proxy (how, not what: a run may resume with
    another count); ops_modules: modules those processes import first (the CLI's --ops)."""
    from .evaluator import CallableEvaluator, Evaluator
    from .proxy import ProxyConfig

    archs = list(architectures)
    if len(archs) < 3:
        raise ConfigError(f"fidelity needs at least 3 architectures, got {len(archs)}")
    names = [arch_line(a) for a in archs]
    cfg = config
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"fidelity workers must be a positive integer, got {workers!r}")
    taken = sorted(set(evaluators or {}) & {"biws", "scratch"} | {k for k in evaluators or {} if k.startswith("baseline:")})
    if taken:
        raise ConfigError(f"evaluator name {taken[0]!r} is one of the fidelity tool's own proxies",
                          hint="give the evaluator another name")
    # what the log's trainings depend on: the truth's settings (the proxies' rows carry their own tag,
    # so one truth serves any number of proxy settings: rerun with another --warmup-children)
    settings = {"truth_steps": cfg.truth_steps, "truth_seeds": cfg.truth_seeds, "seed": cfg.seed,
                "proxy": cfg.proxy, "architectures": [a.to_json() for a in archs], "scoring": "common seed"}
    # a proxy row's settings: steps per child x warm-up children (x steps per warm-up child, when other)
    tag = f"@{cfg.shared_steps}x{cfg.warmup_children}"
    if cfg.steps_per_warmup_child != cfg.shared_steps:
        tag += f"x{cfg.steps_per_warmup_child}"
    log = _Log(Path(out), settings)
    say = progress or (lambda s: None)
    base = dict(task=None, **cfg.proxy)
    try:
        ProxyConfig(**base)
    except TypeError as e:
        raise ConfigError(f"unknown proxy setting: {e}") from None

    n = len(archs)
    biws_steps = cfg.shared_steps + cfg.warmup_children * cfg.steps_per_warmup_child / n   # per evaluation
    scratch_steps = max(1, round(biws_steps))
    # the from-scratch proxy depends on its step count only: BIWS settings of one cost share its rows
    # (logs written before this named them after the BIWS setting: "scratch@16x96"; those are read too)
    scratch_what = f"scratch@{scratch_steps}"

    def get(what, name, s):
        row = log.get(what, name, s)
        return log.get("scratch" + tag, name, s) if row is None and what == scratch_what else row

    # the truth (truth_steps x truth_seeds) and the from-scratch proxy: independent trainings
    jobs = [("truth", s, dict(base, weight_sharing=False, pretrain_steps=cfg.truth_steps), 10_000 * (s + 1) + cfg.seed)
            for s in range(cfg.truth_seeds)]
    if cfg.scratch:
        jobs.append((scratch_what, 0, dict(base, weight_sharing=False, pretrain_steps=scratch_steps),
                     20_000 + cfg.seed))
    todo = [(what, s, kw, seed, a, name) for what, s, kw, seed in jobs for a, name in zip(archs, names)
            if get(what, name, s) is None]
    for (what, s, _, _, _, name), (score, seconds, se) in train_many(todo, workers, ops_modules):
        log.add(what, name, s, score, seconds, se=se)
        say(f"truth seed {s}: {score:.4f}  {name}" if what == "truth" else f"scratch: {score:.4f}  {name}")
    truth = {s: [log.get("truth", n, s)["score"] for n in names] for s in range(cfg.truth_seeds)}
    truth_mean = [sum(truth[s][i] for s in truth) / len(truth) for i in range(len(archs))]

    proxies: dict[str, dict] = {}
    if cfg.biws:
        if log.get("biws" + tag, names[-1], 0) is None:
            _run_biws(archs, names, cfg, base, log, say, tag)
        rows = [log.get("biws" + tag, nm, 0) for nm in names]
        warm = log.get("biws-warmup" + tag, "*", 0)
        proxies["biws"] = {"scores": [r["score"] for r in rows],
                           "seconds_each": (sum(r["seconds"] for r in rows) + warm["seconds"]) / n,
                           "steps_each": biws_steps,
                           "warmup_seconds": warm["seconds"]}
    if cfg.scratch:
        rows = [get(scratch_what, nm, 0) for nm in names]
        proxies["scratch"] = {"scores": [r["score"] for r in rows], "steps_each": scratch_steps,
                              "seconds_each": sum(r["seconds"] for r in rows) / n}
    for name, e in (evaluators or {}).items():
        ev = e if isinstance(e, Evaluator) else CallableEvaluator(e)
        proxies[name] = _score_each(ev, f"evaluator:{name}", archs, names, cfg, log, say)

    # trivial baselines: the encoder's parameter count ("size alone") and a random order
    rnd = random.Random(cfg.seed)
    proxies["baseline:params"] = {"scores": [float(_params(a)) for a in archs], "seconds_each": 0.0}
    proxies["baseline:random"] = {"scores": [rnd.random() for _ in archs], "seconds_each": 0.0}
    for k, p in proxies.items():
        p.update(agreement(p["scores"], truth_mean, cfg.bootstrap, cfg.seed))
    if "scratch" in proxies:   # each proxy against from-scratch training at BIWS's cost, paired
        for k, p in proxies.items():
            if k != "scratch":
                p["minus_scratch"] = paired_difference(p["scores"], proxies["scratch"]["scores"], truth_mean,
                                                       cfg.bootstrap, cfg.seed + 3)
    result = {"architectures": names, "truth": {"scores_per_seed": [truth[s] for s in sorted(truth)],
                                                 "mean": truth_mean, "steps": cfg.truth_steps,
                                                 "seconds_each": _mean_seconds(log, "truth")},
              "proxies": proxies, "config": asdict(cfg), "out": str(out)}
    if cfg.truth_seeds >= 2:
        result["truth"]["self_agreement"] = agreement(truth[0], truth[1], cfg.bootstrap, cfg.seed + 7)
    return result


def _score_each(ev, what, archs, names, cfg, log, say) -> dict:
    runner = ev.runner()
    for a, name in zip(archs, names):
        if log.get(what, name, 0) is None:
            t0 = time.perf_counter()
            res = runner(a, ev.prepare(a), 20_000 + cfg.seed)
            score = float(getattr(res, "score", res))
            log.add(what, name, 0, score, time.perf_counter() - t0)
            say(f"{what}: {score:.4f}  {name}")
    rows = [log.get(what, nm, 0) for nm in names]
    return {"scores": [r["score"] for r in rows], "seconds_each": sum(r["seconds"] for r in rows) / len(rows)}


def _run_biws(archs, names, cfg, base, log, say, tag: str) -> None:
    from .proxy import ProxyConfig, ProxyEvaluator

    ev = ProxyEvaluator(ProxyConfig(weight_sharing=True, shared_pretrain_steps=cfg.shared_steps,
                                    warmup_steps=cfg.warmup_steps, **base))
    runner, warm = ev.runner(), ev.warmup_runner()
    rng = random.Random(f"attnc-fidelity-warmup:{cfg.seed}")
    t0 = time.perf_counter()
    for i in range(cfg.warmup_children):   # written back one after another
        a = rng.choice(archs)
        ev.commit(a, warm(a, ev.prepare(a), 30_000 + i + cfg.seed))
    log.add("biws-warmup" + tag, "*", 0, None, time.perf_counter() - t0, children=cfg.warmup_children)
    say(f"biws warm-up: {cfg.warmup_children} children in {time.perf_counter() - t0:.0f} s")
    for a, name in zip(archs, names):   # all from the warmed-up state with one seed, nothing written back
        t1 = time.perf_counter()
        res = runner(a, ev.prepare(a), 20_000 + cfg.seed)
        log.add("biws" + tag, name, 0, float(res.score), time.perf_counter() - t1)
        say(f"biws: {res.score:.4f}  {name}")


# --- trainings in worker processes -------------------------------------------------------------------

_RUNNERS: dict[str, Any] = {}     # per process: ProxyConfig fields (JSON) -> its runner


def train_from_scratch(kwargs: dict, arch_json: dict, seed: int) -> tuple[float, float, float | None]:
    """One from-scratch training of the architecture `arch_json` (Architecture.to_json()) by the proxy
    with ProxyConfig fields `kwargs` (weight_sharing=False): (score, seconds, the score's standard error)."""
    from .proxy import ProxyConfig, ProxyEvaluator

    key = json.dumps(kwargs, sort_keys=True)
    if key not in _RUNNERS:
        _RUNNERS[key] = ProxyEvaluator(ProxyConfig(**kwargs)).runner()
    t0 = time.perf_counter()
    res = _RUNNERS[key](Architecture.from_json(arch_json), None, seed)
    return float(res.score), time.perf_counter() - t0, res.metrics.get("score_se")


def _init_worker(threads: int, ops_modules: tuple) -> None:
    import torch

    from attnc.ops import import_ops_modules
    torch.set_num_threads(threads)
    import_ops_modules(ops_modules)


def train_many(todo: list, workers: int, ops_modules: Sequence[str] = ()):
    """Yield (job, (score, seconds, se)) for each job (what, seed index, proxy kwargs, seed, arch, name)
    trained from scratch, in this process or in `workers` spawned ones (as they finish)."""
    if workers == 1 or len(todo) <= 1:
        for job in todo:
            yield job, train_from_scratch(job[2], job[4].to_json(), job[3])
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // workers) if torch.get_num_threads() > 1 else 1
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads, tuple(ops_modules))) as pool:
        futures = {pool.submit(train_from_scratch, job[2], job[4].to_json(), job[3]): job for job in todo}
        try:
            for f in as_completed(futures):
                yield futures[f], f.result()      # the caller logs each before the next: nothing finished is lost
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)   # don't train the queued ones for nothing
            raise


def _mean_seconds(log: _Log, what: str) -> float:
    v = [r["seconds"] for (w, _, _), r in log.rows.items() if w == what]
    return sum(v) / len(v) if v else math.nan


def _params(arch: Architecture) -> int:
    import torch

    from attnc.runtime.modeling import AttncBertModel
    with torch.device("meta"):
        enc = AttncBertModel(arch.to_config(), add_pooling_layer=False).encoder
    return sum(p.numel() for p in enc.parameters())


def plot(result: dict, path) -> None:
    """Proxy score against the truth, one panel per proxy (PNG/PDF/SVG by the file's suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in result["proxies"] if not k.startswith("baseline:")]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.8), squeeze=False)
    truth = result["truth"]["mean"]
    for ax, k in zip(axes[0], names):
        p = result["proxies"][k]
        ax.scatter(truth, p["scores"], s=18)
        lo, hi = p["kendall_tau_ci90"]
        ax.set_title(f"{k}: tau {p['kendall_tau']:+.2f} [{lo:+.2f}, {hi:+.2f}]", fontsize=9)
        ax.set_xlabel(f"truth (-held-out MLM loss, {result['truth']['steps']} steps)")
        ax.set_ylabel("proxy score")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_result(r: dict) -> list[str]:
    lines = [f"{len(r['architectures'])} architectures; truth {r['truth']['steps']} steps x "
             f"{len(r['truth']['scores_per_seed'])} seeds ({r['truth']['seconds_each']:.1f} s each)"]
    sa = r["truth"].get("self_agreement")
    if sa:
        lines.append(f"  truth seed 0 vs seed 1: tau {sa['kendall_tau']:+.3f} [{sa['kendall_tau_ci90'][0]:+.3f}, "
                     f"{sa['kendall_tau_ci90'][1]:+.3f}]  (a ceiling for any proxy)")
    for k, p in r["proxies"].items():
        (tl, th), (rl, rh) = p["kendall_tau_ci90"], p["spearman_rho_ci90"]
        lines.append(f"  {k:18s} tau {p['kendall_tau']:+.3f} [{tl:+.3f}, {th:+.3f}]  rho {p['spearman_rho']:+.3f} "
                     f"[{rl:+.3f}, {rh:+.3f}]  {p['seconds_each']:.2f} s/eval"
                     + (f", {p['steps_each']:g} MLM steps/eval" if "steps_each" in p else ""))
        if k == "biws" and "minus_scratch" in p:
            d = p["minus_scratch"]
            lines.append(f"  {'biws - scratch':18s} tau {d['kendall_tau_diff']:+.3f} [{d['kendall_tau_diff_ci90'][0]:+.3f}, "
                         f"{d['kendall_tau_diff_ci90'][1]:+.3f}]  (paired: the same architectures resampled)")
    lines.append("  (90% bootstrap intervals over architectures)")
    return lines
