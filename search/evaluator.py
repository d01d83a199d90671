"""The evaluator protocol of the search: how a candidate architecture gets its score.

The driver calls `prepare(arch)` (e.g. initial weights cut from a supernet), then a picklable
`runner()` runs `(arch, payload, seed) -> EvalResult` in-process or on a Ray worker, then the
driver calls `commit(arch, result)` in completion order (e.g. write trained weights back).
`begin_generation()` / `end_generation()` bracket the candidates of one generation (a weight-sharing
evaluator prepares them all from one state and merges their updates at the end); a warm-up before
the search (`warmup_children` random children, run with `warmup_runner()`, committed one by one)
trains shared state before anything is scored. `state_dict()` / `load_state_dict()` persist
whatever the evaluator shares between candidates so a resumed search continues from the same state.
`device` says where the runner trains (a Ray task asks for a GPU when it is "cuda").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .space import Architecture


@dataclass
class EvalResult:
    score: float                                  # higher is better
    metrics: dict = field(default_factory=dict)   # JSON-able extras
    seconds: float = 0.0
    steps: int = 0
    weights: Any = None                           # trained weights for commit() (not stored in the study)


class Evaluator:
    """Base class; subclasses override what they need."""

    weight_sharing: bool = False
    device: str = "cpu"            # where the runner trains: cpu | cuda[:N] | auto
    warmup_children: int = 0       # random children trained (and committed) before the search scores any

    def prepare(self, arch: Architecture) -> Any:
        return None

    def runner(self) -> Callable[[Architecture, Any, int], EvalResult]:
        raise NotImplementedError

    def warmup_runner(self) -> Callable[[Architecture, Any, int], EvalResult]:
        return self.runner()

    def commit(self, arch: Architecture, result: EvalResult) -> None:
        pass

    def begin_generation(self) -> None:
        pass

    def end_generation(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

    def identity(self) -> dict:
        """What the scores of a study mean (kept in the study; a resumed search must match it)."""
        return {"kind": "evaluator", "name": f"{type(self).__module__}.{type(self).__qualname__}"}


class _CallRunner:
    """Picklable runner around a plain function (module-level functions pickle by reference)."""

    def __init__(self, fn: Callable[[Architecture], float]):
        self.fn = fn

    def __call__(self, arch: Architecture, payload: Any, seed: int) -> EvalResult:
        t0 = time.perf_counter()
        out = self.fn(arch)
        seconds = time.perf_counter() - t0
        if isinstance(out, EvalResult):
            return out
        return EvalResult(score=float(out), seconds=seconds)


class CallableEvaluator(Evaluator):
    """Wraps any `f(arch) -> float` (higher is better), e.g. a synthetic evaluator."""

    def __init__(self, fn: Callable[[Architecture], float]):
        if not callable(fn):
            from attnc.compiler.errors import ConfigError
            raise ConfigError(f"evaluate must be callable, got {type(fn).__name__}")
        self.fn = fn

    def runner(self) -> Callable[[Architecture, Any, int], EvalResult]:
        return _CallRunner(self.fn)

    def __repr__(self) -> str:
        return f"CallableEvaluator({getattr(self.fn, '__qualname__', self.fn)!r})"

    def identity(self) -> dict:
        name = getattr(self.fn, "__qualname__", type(self.fn).__qualname__)
        return {"kind": "function", "name": f"{getattr(self.fn, '__module__', '?')}:{name}"}
