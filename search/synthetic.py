"""Cheap synthetic evaluators with known good operations, for tests, benchmarks and demos.

They score the path structure the search works on, not a trained model, so the optimum is known:
`known_ops` rewards `softsign` and `cos` wherever they are, and conv layers with kernel 7. Module-level functions, so they pickle by reference (Ray workers, the CLI's
--evaluator attnc.search.synthetic:known_ops).
"""
from __future__ import annotations

from .evaluator import Evaluator
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


def fails_on_dist_pid(arch: Architecture):
    """fails_on_dist, reporting the evaluating process id in the metrics."""
    import os

    from .evaluator import EvalResult
    return EvalResult(score=fails_on_dist(arch), metrics={"pid": os.getpid()})


def known_ops_pid(arch: Architecture):
    """known_ops, reporting the evaluating process id in the metrics (shows where it ran)."""
    import os

    from .evaluator import EvalResult
    return EvalResult(score=known_ops(arch), metrics={"pid": os.getpid()})


class SharedCounters(Evaluator):
    """A weight-sharing stand-in for tests (Ray vs in-process): the "supernet" is one number per
    layer position; a child starts from them (prepare), its score depends on them, its "training"
    adds a known amount per layer, and commit writes the result back. A child sent before an
    earlier write-back sees older numbers and scores differently, so a test can tell whether two
    runs shared weights in the same order. Built on the Evaluator protocol (search/evaluator.py)."""

    weight_sharing = True

    def __init__(self, num_layers: int):
        self.values = [0.0] * num_layers

    def prepare(self, arch: Architecture):
        return list(self.values)

    def runner(self):
        return shared_counters_run

    def commit(self, arch: Architecture, result) -> None:
        self.values = list(result.weights)
        result.weights = None

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, d: dict) -> None:
        self.values = list(d["values"])


def shared_counters_run(arch: Architecture, payload, seed: int):
    """The SharedCounters runner (module level: Ray workers import it by name)."""
    from .evaluator import EvalResult

    trained = [v + (0.5 if c.kind == "conv" else 0.25 + c.formula.count("softsign(")) + 0.001 * (seed % 7)
               for v, c in zip(payload, arch.layers)]
    return EvalResult(score=known_ops(arch) + 0.01 * sum(payload), weights=trained,
                      metrics={"start": list(payload)})
