"""Runtime helpers the generated PyTorch code calls (the reference / CPU path).

Tensors are (B, H, rows, cols); a key-padding `keep` mask is (B, 1, 1, n) bool, True = real
token, or None. The formula's `n` is each sequence's number of real tokens (`seq_lengths`). Padding semantics, the same in every backend: every reduction over the token
axis n (softmax over an n-long row, a matmul whose inner dim is n, norm/cos/dist over n-long
rows) ignores padded tokens, so padded keys contribute nothing to any output row. Rows whose
every entry is masked give 0 from softmax, never NaN.
"""
from __future__ import annotations

import torch

from .scalars import s_div, s_pow  # noqa: F401 - the generated code calls ops.s_div / ops.s_pow

# ---- tensors -----------------------------------------------------------------------------------


def key_keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, n) bool key padding mask -> (B, 1, 1, n) broadcastable keep mask."""
    if mask is None:
        return None
    return mask[:, None, None, :]


def seq_lengths(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`n` of a formula: each sequence's own length, its real tokens (True entries of the (B, n)
    key padding mask; the padded length without a mask), as a (B,) float64 tensor on like's device.
    A sequence without any real token counts 1: its rows mean nothing, and a scale such as 1 / n
    stays finite there, so no NaN reaches the gradients of the others."""
    if mask is None:
        return torch.full((like.shape[0],), float(like.shape[-2]), dtype=torch.float64, device=like.device)
    return mask.sum(-1).clamp_min(1).to(device=like.device, dtype=torch.float64)


def row_index(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=like.dtype).view(n, 1)  # (n, 1)


def col_index(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=like.dtype).view(1, n)  # (1, n)


def __getattr__(name: str):
    """`ops.softmax`, `ops.cos`, ...: a structural operation's function, which lives with the rest
    of the operation's definition (its `run`, compiler/structural.py)."""
    from . import structural
    spec = structural.BY_NAME.get(name)
    if spec is None or not hasattr(spec, "run"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return spec.run


class _ElementwiseForms:
    """`fn.NAME(t)` / `sfn.NAME(x)`: the tensor / float form of the elementwise function NAME
    from the table in compiler/elementwise.py (the generated code calls these)."""

    def __init__(self, scalar: bool):
        self._scalar = scalar

    def __getattr__(self, name: str):
        from .elementwise import lookup
        entry = lookup(name)
        if entry is None:
            raise AttributeError(f"no elementwise function {name!r} is registered")
        return entry.scalar_fn() if self._scalar else entry.torch_fn()


fn = _ElementwiseForms(scalar=False)
sfn = _ElementwiseForms(scalar=True)
