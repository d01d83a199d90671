"""The pairwise benchmark's statistics (attnc.search.ranking) against independent
references: scipy's Kendall tau-b, a brute-force pair count, numpy's percentiles, and known cases."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from scipy.stats import kendalltau

from attnc.search import ranking as R


def _brute_accuracy(a, b):
    num = den = 0.0
    for i in range(len(a)):
        for j in range(len(a)):
            if i < j and b[i] != b[j]:
                den += 1
                num += 0.5 if a[i] == a[j] else float(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j]))
    return num / den


def test_pairwise_accuracy_and_kendall_tau_match_independent_references():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(3, 14)
        a = [rng.choice([1, 2, 3, 4, 5]) + rng.random() * (rng.random() < 0.5) for _ in range(n)]   # ties
        b = [rng.choice([1, 2, 3, 4]) for _ in range(n)]
        if len(set(b)) < 2 or len(set(a)) < 2:
            continue
        assert R.pairwise_accuracy(a, b) == pytest.approx(_brute_accuracy(a, b))
        assert R.kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic)   # scipy: tau-b
    assert R.pairwise_accuracy([1, 2, 3], [1, 2, 3]) == 1.0 and R.pairwise_accuracy([3, 2, 1], [1, 2, 3]) == 0.0
    assert R.pairwise_accuracy([1, 1, 1], [1, 2, 3]) == 0.5          # a rule that ties everything: chance
    assert math.isnan(R.pairwise_accuracy([1, 2], [5, 5]))
    with pytest.raises(ValueError):
        R.pairwise_accuracy([1, 2], [1, 2, 3])


def test_trivial_rules_in_both_directions_add_up_to_one():
    rng = random.Random(1)
    truth = [rng.random() for _ in range(12)]
    feats = {"hidden": [rng.choice([32, 64, 96]) for _ in range(12)], "depth": [rng.randint(1, 4) for _ in range(12)]}
    rules = R.trivial_rules(feats)
    assert set(rules) == {"larger hidden wins", "smaller hidden wins", "larger depth wins", "smaller depth wins"}
    for name in feats:
        up, down = (R.pairwise_accuracy(rules[f"{d} {name} wins"], truth) for d in ("larger", "smaller"))
        assert up + down == pytest.approx(1.0)
    # "larger wins" is a loss-like score: the largest gets the lowest
    assert rules["larger hidden wins"] == [-v for v in feats["hidden"]]


def test_bootstrap_intervals_resample_architectures_and_shrink_with_more_of_them():
    # percentile() is numpy's linear interpolation
    xs = [random.Random(2).random() for _ in range(37)]
    for q in (0.0, 0.05, 0.5, 0.95, 1.0):
        assert R.percentile(xs, q) == pytest.approx(float(np.percentile(xs, 100 * q)))

    def widths(n):
        rng = random.Random(n)
        truth = [rng.random() for _ in range(n)]
        proxy = [t + 0.3 * rng.gauss(0, 1) for t in truth]
        s = R.summarise(proxy, truth, reps=400)
        lo, hi = s["pairwise_accuracy_ci"]
        assert lo <= s["pairwise_accuracy"] <= hi
        return hi - lo

    assert widths(60) < 0.6 * widths(8)
    # deterministic for a seed
    truth = list(range(10))
    proxy = [0, 2, 1, 3, 5, 4, 6, 9, 8, 7]
    assert R.summarise(proxy, truth, reps=200) == R.summarise(proxy, truth, reps=200)
    # a perfect proxy has a degenerate interval at 1
    assert R.summarise(truth, truth, reps=200)["pairwise_accuracy_ci"] == [1.0, 1.0]


def test_paired_difference_and_self_agreement():
    rng = random.Random(3)
    truth = [rng.random() for _ in range(20)]
    good = [t + 0.05 * rng.gauss(0, 1) for t in truth]
    bad = [rng.random() for _ in truth]
    d = R.paired_difference(good, bad, truth, reps=500)
    assert d["difference"] == pytest.approx(R.pairwise_accuracy(good, truth) - R.pairwise_accuracy(bad, truth))
    assert d["ci"][0] > 0 and d["ci"][0] <= d["difference"] <= d["ci"][1]
    same = R.paired_difference(good, good, truth, reps=100)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    sa = R.self_agreement([truth, truth, good], reps=200)
    assert [p["seeds"] for p in sa["pairs"]] == [[0, 1], [0, 2], [1, 2]]
    assert sa["pairs"][0]["pairwise_accuracy"] == 1.0
    assert sa["mean"] == pytest.approx((1 + 2 * R.pairwise_accuracy(good, truth)) / 3)
    lo, hi = R.random_ranking_range(16, reps=1000)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 0.03


def test_spearman_rho_matches_scipy_with_ties():
    from scipy.stats import spearmanr
    rng = random.Random(1)
    checked = 0
    for _ in range(60):
        n = rng.randint(3, 15)
        a = [rng.choice([1, 2, 3, 4, 5, 6]) for _ in range(n)]       # many ties
        b = [rng.random() if rng.random() < 0.7 else 0.5 for _ in range(n)]
        if len(set(a)) < 2 or len(set(b)) < 2:
            continue
        assert R.spearman_rho(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
        checked += 1
    assert checked >= 40
    assert R.spearman_rho([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert R.spearman_rho([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(R.spearman_rho([1, 1, 1], [1, 2, 3]))


def _tau_by_hand(a, b) -> float:
    """Kendall's tau-a from concordant and discordant pairs (no ties in the inputs used here)."""
    c = d = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        s = (a[i] - a[j]) * (b[i] - b[j])
        c += s > 0
        d += s < 0
    return (c - d) / (len(a) * (len(a) - 1) / 2)


def test_tau_rho_and_bootstrap_against_hand_computation():
    a = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2]
    b = [1.0, 3.0, 4.0, 6.0, 2.0, 0.0]
    assert R.kendall_tau(a, b) == pytest.approx(_tau_by_hand(a, b))
    ra, rb = [sorted(a).index(x) for x in a], [sorted(b).index(x) for x in b]
    n = len(a)
    rho = 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))
    assert R.spearman_rho(a, b) == pytest.approx(rho)
    lo, hi = R.bootstrap(lambda i: R.kendall_tau([a[k] for k in i], [b[k] for k in i]), len(a), reps=500)
    assert lo < R.kendall_tau(a, b) < hi and -1 <= lo and hi <= 1
    assert R.bootstrap(lambda i: R.kendall_tau([a[k] for k in i], [2 * a[k] for k in i]), len(a), reps=200) == (1.0, 1.0)   # same order: always 1
