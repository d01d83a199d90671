"""Cheap synthetic evaluators with known good operations, for tests, benchmarks and demos.

They score the path structure the search works on, not a trained model, so the optimum is known:
`known_ops` rewards `softsign` and `cos` wherever they are, and conv layers with kernel 7. Module-level functions, so they pickle by reference (Ray workers, the CLI's
--evaluator attnc.search.synthetic:known_ops).
"""
from __future__ import annotations

from .space import Architecture


def known_ops(arch: Architecture) -> float:
    """Mean over layers: per attention layer, the number of softsigns plus half the number of cosine
    similarities in the canonical formula (more of them needs longer, specific paths, which random
    sampling rarely draws); a conv layer scores 0.5 with kernel 7, else 0."""
    score = 0.0
    for layer in arch.layers:
        if layer.kind == "conv":
            score += 0.5 if layer.kernel_size == 7 else 0.0
        else:
            score += layer.formula.count("softsign(") + 0.5 * layer.formula.count("cos(")
    return score / len(arch.layers)


def fails_on_dist(arch: Architecture) -> float:
    """known_ops, but raises for formulas using dist and gives NaN for kernel 65 (failure paths)."""
    for layer in arch.layers:
        if layer.kind == "attention" and "dist(" in layer.formula:
            raise RuntimeError("synthetic failure: dist")
        if layer.kind == "conv" and layer.kernel_size == 65:
            return float("nan")
    return known_ops(arch)


def known_ops_pid(arch: Architecture):
    """known_ops, reporting the evaluating process id in the metrics (shows where it ran)."""
    import os

    from .evaluator import EvalResult
    return EvalResult(score=known_ops(arch), metrics={"pid": os.getpid()})
