"""How well one ranking of architectures agrees with another, with bootstrap intervals and the
trivial rules a proxy must beat: the statistics of `attnc search fidelity` (OP-NAS proxies) and of
the AutoTinyBERT pairwise benchmark, in one place (plain Python, no torch, no scipy).

    from attnc.search import ranking
    ranking.pairwise_accuracy(proxy_losses, true_losses)           # share of pairs ordered alike
    ranking.kendall_tau(proxy_losses, true_losses)                 # tau-b
    ranking.bootstrap(lambda idx: ranking.pairwise_accuracy([p[i] for i in idx], [t[i] for i in idx]), n)
    ranking.compare({"superplm": proxy_losses, **ranking.trivial_rules(features)}, true_losses)

Scores are loss-like throughout (lower is better). The pairwise accuracy is over the pairs the
reference ranking (the second argument: the truth) does not tie; a pair the first ranking ties counts
one half (what breaking the tie by a coin earns), so a coarse rule ("larger hidden size wins", which
ties every two archs of one width) is judged on every pair, not only on those it separates. Bootstrap intervals resample the architectures (with replacement; pairs of
a resampled architecture with itself are ties, hence left out), so they say how much a figure
depends on which architectures were picked; paired differences use the same resamples for both
rankings.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Callable, Sequence

LEVEL = 0.90          # two-sided interval: the 5th and 95th percentiles of the bootstrap
REPS = 2000


def pairwise_counts(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    """(pairs ordered the same way by a and b, a pair tied in a counting 1/2; pairs untied in b)."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {len(a)} and {len(b)}")
    agree, total = 0.0, 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if db == 0:
            continue
        total += 1
        agree += 0.5 if da == 0 else float((da > 0) == (db > 0))
    return agree, total


def pairwise_accuracy(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of the pairs b does not tie that a orders as b does, a pair a ties counting 1/2 (nan when
    b ties every pair)."""
    agree, total = pairwise_counts(a, b)
    return agree / total if total else math.nan


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either ranking accounted for; nan when one ranking is constant)."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {len(a)} and {len(b)}")
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / denom if denom else math.nan


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks (nan when one ranking is
    constant)."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va and vb else math.nan


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of xs by linear interpolation between order statistics."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap(stat: Callable[[list[int]], float], n: int, *, reps: int = REPS, seed: int = 0,
              level: float = LEVEL) -> tuple[float, float]:
    """The `level` percentile interval of stat(indices) over `reps` resamples (with replacement) of
    range(n); resamples where the statistic is undefined (nan) are left out."""
    rng = random.Random(seed)
    vals = []
    for _ in range(reps):
        v = stat([rng.randrange(n) for _ in range(n)])
        if not math.isnan(v):
            vals.append(v)
    a = (1.0 - level) / 2
    return percentile(vals, a), percentile(vals, 1.0 - a)


def _pick(xs: Sequence[float], idx: list[int]) -> list[float]:
    return [xs[i] for i in idx]


def trivial_rules(features: dict[str, Sequence[float]]) -> dict[str, list[float]]:
    """Loss-like scores of the rules "larger X wins" and "smaller X wins" for every feature X
    (e.g. hidden size, parameters, FLOPs, depth): what a ranking from size or shape alone gets."""
    out = {}
    for name, vals in features.items():
        out[f"larger {name} wins"] = [-float(v) for v in vals]
        out[f"smaller {name} wins"] = [float(v) for v in vals]
    return out


def summarise(scores: Sequence[float], truth: Sequence[float], *, reps: int = REPS, seed: int = 0,
              level: float = LEVEL) -> dict:
    """Pairwise accuracy and Kendall tau-b of `scores` against `truth`, each with its bootstrap
    interval, and the pair counts."""
    n = len(truth)
    agree, total = pairwise_counts(scores, truth)
    return {"pairwise_accuracy": agree / total if total else math.nan, "pairs_agreeing": agree, "pairs": total,
            "pairwise_accuracy_ci": list(bootstrap(lambda i: pairwise_accuracy(_pick(scores, i), _pick(truth, i)),
                                                   n, reps=reps, seed=seed, level=level)),
            "kendall_tau": kendall_tau(scores, truth),
            "kendall_tau_ci": list(bootstrap(lambda i: kendall_tau(_pick(scores, i), _pick(truth, i)),
                                             n, reps=reps, seed=seed, level=level))}


def paired_difference(a: Sequence[float], b: Sequence[float], truth: Sequence[float], *, reps: int = REPS,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """Pairwise accuracy of a minus that of b against `truth`, with the bootstrap interval of the
    difference over the same resamples of the architectures."""
    def diff(idx):
        t = _pick(truth, idx)
        return pairwise_accuracy(_pick(a, idx), t) - pairwise_accuracy(_pick(b, idx), t)

    lo, hi = bootstrap(diff, len(truth), reps=reps, seed=seed, level=level)
    return {"difference": pairwise_accuracy(a, truth) - pairwise_accuracy(b, truth), "ci": [lo, hi]}


def self_agreement(per_seed: Sequence[Sequence[float]], *, reps: int = REPS, seed: int = 0,
                   level: float = LEVEL) -> dict:
    """How well the truth agrees with itself: the pairwise accuracy between every two seeds' losses
    (and its mean, with a bootstrap interval over architectures). With S seeds there are S(S-1)/2."""
    pairs = list(itertools.combinations(range(len(per_seed)), 2))
    if not pairs:
        return {"pairs": [], "mean": math.nan, "ci": [math.nan, math.nan]}

    def mean_acc(idx):
        vals = [pairwise_accuracy(_pick(per_seed[i], idx), _pick(per_seed[j], idx)) for i, j in pairs]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    n = len(per_seed[0])
    return {"pairs": [{"seeds": [i, j], "pairwise_accuracy": pairwise_accuracy(per_seed[i], per_seed[j])}
                      for i, j in pairs],
            "mean": mean_acc(list(range(n))), "ci": list(bootstrap(mean_acc, n, reps=reps, seed=seed, level=level))}


def random_ranking_range(n: int, *, reps: int = REPS, seed: int = 0, level: float = LEVEL) -> list[float]:
    """The `level` range of the pairwise accuracy of a random ranking of n distinct items against a
    fixed one: what chance alone gets on this many pairs."""
    rng = random.Random(seed)
    truth = list(range(n))
    vals = []
    for _ in range(reps):
        perm = truth[:]
        rng.shuffle(perm)
        vals.append(pairwise_accuracy(perm, truth))
    a = (1.0 - level) / 2
    return [percentile(vals, a), percentile(vals, 1.0 - a)]
