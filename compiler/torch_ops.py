"""Runtime helpers the generated PyTorch code calls (the reference / CPU path).

Tensors are (B, H, rows, cols); a key-padding `keep` mask is (B, 1, 1, n) bool, True = real
token, or None. Padding semantics, the same in every backend: every reduction over the token
axis n (softmax over an n-long row, a matmul whose inner dim is n, norm/cos/dist over n-long
rows) ignores padded tokens, so padded keys contribute nothing to any output row. Rows whose
every entry is masked give 0 from softmax, never NaN.
"""
from __future__ import annotations

import math

import torch

from .scalars import s_div, s_pow  # noqa: F401 - the generated code calls ops.s_div / ops.s_pow

# ---- tensors -----------------------------------------------------------------------------------


def key_keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, n) bool key padding mask -> (B, 1, 1, n) broadcastable keep mask."""
    if mask is None:
        return None
    return mask[:, None, None, :]


def row_index(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=like.dtype).view(n, 1)  # (n, 1)


def col_index(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=like.dtype).view(1, n)  # (1, n)


def mask_cols(x: torch.Tensor, keep: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor:
    """Set the padded columns (last axis, token positions) of x to `fill`."""
    return x if keep is None else x.masked_fill(~keep, fill)


def matmul(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b; with `keep` (inner dim is n) padded tokens are dropped from the contraction."""
    if keep is not None:
        a = mask_cols(a, keep)
        b = mask_cols(b.transpose(-1, -2), keep).transpose(-1, -2)
    return a @ b


def softmax(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Row softmax, safe for -inf entries and fully masked rows (which give 0)."""
    if keep is not None:
        x = x.masked_fill(~keep, -math.inf)
    m = x.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient at 0 and 0 for tiny negative round-off."""
    pos = x > 0
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


def norm(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Row L2 norm, keepdim: (.., a, b) -> (.., a, 1)."""
    x = mask_cols(x, keep)
    return safe_sqrt((x * x).sum(dim=-1, keepdim=True))


def scale(x: torch.Tensor) -> torch.Tensor:
    return x / math.sqrt(x.shape[-1])


def cos(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None,
        eps: float = 1e-8) -> torch.Tensor:
    """Pairwise cosine similarity of rows: (.., a, m), (.., b, m) -> (.., a, b)."""
    a = mask_cols(a, keep)
    b = mask_cols(b, keep)
    an = a / norm(a).clamp_min(eps)
    bn = b / norm(b).clamp_min(eps)
    return an @ bn.transpose(-1, -2)


def dist(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise euclidean distance of rows: (.., a, m), (.., b, m) -> (.., a, b)."""
    a = mask_cols(a, keep)
    b = mask_cols(b, keep)
    sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1, keepdim=True).transpose(-1, -2) \
        - 2 * (a @ b.transpose(-1, -2))
    return safe_sqrt(sq)


def where(cond: torch.Tensor, a, b, like: torch.Tensor) -> torch.Tensor:
    """torch.where keeping `like`'s dtype when both branches are Python scalars."""
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        a = torch.tensor(a, dtype=like.dtype, device=like.device)
    return torch.where(cond, a, b)


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
