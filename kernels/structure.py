"""What the formula says about its weights before any tensor is seen: mask bands, value bounds.

    mask_band(g, plan)      -> Band | None   the keys a query can see, as lo <= j - i <= hi, when
                                             the weights are exactly "nothing" (softmax: a score
                                             of -inf; no normalisation: a weight of 0) outside
                                             a condition on the positions i, j (causal `j <= i`,
                                             banded `abs(i - j) <= w`, and their & / |)
    key_block_range(...)    -> (first key, end)  the key blocks one query block must visit
    query_block_range(...)  -> (first query, end) the query blocks one key block must visit
    computed_entries(...)   -> entries of the n x n score the kernels compute (whole blocks)
    weight_interval(g, plan)-> (lo, hi)      bounds of the weights W (softmax: [0, 1])

The fused kernels skip key blocks outside the band (forward and backward), and keep weights
whose bound does not fit in fp16 out of fp16 products. Scalars that depend on the sizes n and d
are judged by evaluating them at sample sizes (SAMPLES): a window of `n / 4` keys changes with
n, so it is not a constant band and nothing is skipped for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
from attnc.compiler import elementwise, structural
from attnc.compiler import torch_ops as ops
from attnc.compiler.ir import Op, is_fn, node_of

SAMPLES = tuple((n, d) for n in (1, 2, 7, 64, 1000, 65536) for d in (1, 3, 16, 64, 256))
FP16_SAFE = 2.0 ** 15        # |w| below this goes into fp16 products (fp16 max is 65504)

# built-in elementwise functions that are non-decreasing on their domain
_INCREASING = frozenset({"exp", "log", "sqrt", "relu", "sigmoid", "tanh", "softplus", "logsigmoid",
                         "softsign"})


# ---- scalars at sample sizes -------------------------------------------------------------------

_FLOAT_OPS = {
    Op.NEG: lambda a: -a, Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b, Op.DIV: ops.s_div, Op.POW: ops.s_pow, Op.MAX: max, Op.MIN: min,
}


def _apply(op, args: list[float]) -> float | None:
    try:
        if is_fn(op):
            entry = elementwise.get(op.value)
            if not all(entry.in_domain(a) for a in args if math.isfinite(a)):
                return math.nan
            return float(entry.scalar_fn()(*args))
        fn = _FLOAT_OPS.get(op)
        return None if fn is None else float(fn(*args))
    except (ArithmeticError, ValueError):   # overflow, a math domain error: not evaluable here
        return None


def scalar_values(g: nx.DiGraph, nid: int) -> list[float] | None:
    """The scalar node `nid` evaluated at every (n, d) of SAMPLES (None: not evaluable)."""
    out = []
    for n, d in SAMPLES:
        v = _scalar_at(g, nid, n, d)
        if v is None:
            return None
        out.append(v)
    return out


def _scalar_at(g, nid, n, d):
    node = node_of(g, nid)
    if node.op is Op.CONST:
        return float(node.value)
    if node.op is Op.SYMBOL:
        return float(n if node.name == "n" else d)
    args = [_scalar_at(g, o, n, d) for o in node.operands]
    if any(a is None for a in args):
        return None
    return _apply(node.op, args)


def constant(g: nx.DiGraph, nid: int) -> float | None:
    """The value of a scalar node when it is the same at every sample size, else None."""
    vals = scalar_values(g, nid)
    if not vals:
        return None
    first = vals[0]
    same = all(v == first or (math.isnan(v) and math.isnan(first)) for v in vals)
    return first if same else None


# ---- mask bands --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Band:
    """Keys j that query i can see: lo <= j - i <= hi (None: unbounded on that side)."""

    lo: int | None
    hi: int | None

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{self.lo} <= j - i <= {self.hi}"
        if self.hi is not None:
            return f"j - i <= {self.hi}"
        return f"j - i >= {self.lo}"

    @property
    def kind(self) -> str:
        if self.lo is None:
            return "causal" if self.hi is not None and self.hi <= 0 else "upper bound"
        if self.hi is None:
            return "anti-causal" if self.lo >= 0 else "lower bound"
        return "banded"

    def contains(self, t: int) -> bool:
        return (self.lo is None or t >= self.lo) and (self.hi is None or t <= self.hi)


def _intersect(a: Band | None, b: Band | None) -> Band | None:
    if a is None:
        return b
    if b is None:
        return a
    lo = b.lo if a.lo is None else a.lo if b.lo is None else max(a.lo, b.lo)
    hi = b.hi if a.hi is None else a.hi if b.hi is None else min(a.hi, b.hi)
    return Band(lo, hi)


def _hull(a: Band | None, b: Band | None) -> Band | None:
    if a is None or b is None:
        return None
    lo = None if a.lo is None or b.lo is None else min(a.lo, b.lo)
    hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
    return None if lo is None and hi is None else Band(lo, hi)


def _linear(g, nid):
    """(coefficient of i, coefficient of j, constant) when `nid` is linear in the positions."""
    node = node_of(g, nid)
    op = node.op
    if node.shape == ():
        c = constant(g, nid)
        return None if c is None or not math.isfinite(c) else (0.0, 0.0, c)
    if op is Op.INDEX:
        return (1.0, 0.0, 0.0) if node.name == "i" else (0.0, 1.0, 0.0)
    parts = [_linear(g, o) for o in node.operands]
    if any(p is None for p in parts):
        return None
    if op is Op.NEG:
        return tuple(-x for x in parts[0])
    if op in (Op.ADD, Op.SUB):
        s = 1.0 if op is Op.ADD else -1.0
        return tuple(a + s * b for a, b in zip(*parts))
    if op is Op.MUL:
        a, b = parts
        if a[:2] == (0.0, 0.0):
            return tuple(a[2] * x for x in b)
        if b[:2] == (0.0, 0.0):
            return tuple(b[2] * x for x in a)
    if op is Op.DIV and parts[1][:2] == (0.0, 0.0) and parts[1][2] != 0:
        return tuple(x / parts[1][2] for x in parts[0])
    return None


def _compare_band(op, diff) -> Band | None:
    """The band of `diff op 0`, diff = a*i + b*j + c with b = -a (a function of t = j - i)."""
    ci, cj, c = diff
    if ci == 0 and cj == 0:
        return None
    if cj != -ci:
        return None
    a = cj                          # diff = a * t + c
    x = -c / a                      # a * t op -c  <=>  t op' x
    if a < 0:
        op = {Op.LE: Op.GE, Op.LT: Op.GT, Op.GE: Op.LE, Op.GT: Op.LT}.get(op, op)
    if op is Op.LE:
        return Band(None, math.floor(x))
    if op is Op.LT:
        return Band(None, math.ceil(x) - 1)
    if op is Op.GE:
        return Band(math.ceil(x), None)
    if op is Op.GT:
        return Band(math.floor(x) + 1, None)
    if op is Op.EQ:
        return Band(math.ceil(x), math.floor(x))
    return None


def condition_band(g: nx.DiGraph, nid: int) -> Band | None:
    """The band {t = j - i} outside which the boolean node `nid` is False (None: no band)."""
    node = node_of(g, nid)
    op = node.op
    if op is Op.AND:
        a, b = (condition_band(g, o) for o in node.operands)
        return _intersect(a, b)
    if op is Op.OR:
        a, b = (condition_band(g, o) for o in node.operands)
        return _hull(a, b)
    if op is Op.NOT:
        inner = node_of(g, node.operands[0])
        flip = {Op.LE: Op.GT, Op.LT: Op.GE, Op.GE: Op.LT, Op.GT: Op.LE}.get(inner.op)
        if flip is None:
            return None
        return _comparison(g, flip, *inner.operands)
    if op in (Op.LE, Op.LT, Op.GE, Op.GT, Op.EQ):
        return _comparison(g, op, *node.operands)
    return None


def _comparison(g, op, a, b) -> Band | None:
    na, nb = node_of(g, a), node_of(g, b)
    # abs(L) <= c  <=>  -c <= L <= c   (and c >= abs(L))
    if op in (Op.GE, Op.GT) and is_fn(nb.op) and nb.op.value == "abs":
        op, a, b, na, nb = {Op.GE: Op.LE, Op.GT: Op.LT}[op], b, a, nb, na
    if is_fn(na.op) and na.op.value == "abs":
        if op not in (Op.LE, Op.LT):
            return None
        inner, c = _linear(g, na.operands[0]), _linear(g, b)
        if inner is None or c is None or c[:2] != (0.0, 0.0):
            return None
        upper = _compare_band(op, (inner[0], inner[1], inner[2] - c[2]))
        lower = _compare_band({Op.LE: Op.GE, Op.LT: Op.GT}[op],
                              (inner[0], inner[1], inner[2] + c[2]))
        if upper is None or lower is None:
            return None
        return _intersect(upper, lower)
    la, lb = _linear(g, a), _linear(g, b)
    if la is None or lb is None:
        return None
    return _compare_band(op, tuple(x - y for x, y in zip(la, lb)))


FINITE = "finite"     # a value known only to be finite (a function of positions and sizes)
_BIG_N = 2.0 ** 31     # positions are below this


def _finite_unknown(g, nid) -> bool:
    """True when `nid` reads no input and is finite at every position (interval analysis)."""
    if any(node_of(g, x).op is Op.INPUT for x in nx.ancestors(g, nid) | {nid}):
        return False
    lo, hi = _interval(g, nid, {}, index_max=_BIG_N)
    return math.isfinite(lo) and math.isfinite(hi)


def _combine(op, args):
    """`op` on per-sample outside values (tuples), with FINITE for unknown finite operands."""
    if all(a != FINITE for a in args):
        out = tuple(_apply(op, list(vs)) for vs in zip(*args))
        return None if any(v is None for v in out) else out
    known = [a for a in args if a != FINITE]
    if op in (Op.ADD, Op.SUB) and len(known) == 1:
        vals = known[0]
        if op is Op.SUB and args[1] is vals:
            vals = tuple(-v for v in vals)
        if all(math.isinf(v) and v == vals[0] for v in vals):
            return vals              # -inf + finite = -inf
    if op is Op.MUL and len(known) == 1 and all(v == 0 for v in known[0]):
        return known[0]              # 0 * finite = 0
    return None


def _outside(g, nid, cond, memo):
    """Per-sample values of `nid` wherever the condition node `cond` is False: a tuple over
    SAMPLES, FINITE, or None (unknown)."""
    if nid in memo:
        return memo[nid]
    node = node_of(g, nid)
    op = node.op
    res = None
    if node.shape == ():
        vals = scalar_values(g, nid)
        res = tuple(vals) if vals else None
    elif op is Op.WHERE and node.operands[0] == cond:
        res = _outside(g, node.operands[2], cond, memo)
    elif op is Op.WHERE:
        va, vb = (_outside(g, o, cond, memo) for o in node.operands[1:])
        res = va if va is not None and va == vb and va != FINITE else None
    elif is_fn(op) or op in _FLOAT_OPS:
        args = [_outside(g, o, cond, memo) for o in node.operands]
        if all(a is not None for a in args):
            res = _combine(op, args)
    if res is None and _finite_unknown(g, nid):
        res = FINITE
    memo[nid] = res
    return res


def mask_band(g: nx.DiGraph, plan) -> Band | None:
    """The band of key positions outside which the weights are exactly nothing, or None.

    softmax: the score is -inf there (so p = 0); no normalisation: the weight is 0 there. In
    both cases the value is a constant, so no gradient flows there either."""
    target = -math.inf if plan.normalization == "softmax" else 0.0
    top = plan.score
    band = None
    for c in position_conditions(g, plan):
        vals = _outside(g, top, c, {})
        if vals is None or vals == FINITE or any(v != target for v in vals):
            continue
        band = _intersect(band, condition_band(g, c))
    if band is None or (band.lo is None and band.hi is None):
        return None
    return band


def position_conditions(g: nx.DiGraph, plan) -> list[int]:
    """Conditions of where / mask in the score that read only positions and sizes (the candidates
    for a band), in node order."""
    top = plan.score
    out = set()
    for nid in nx.ancestors(g, top) | {top}:
        node = node_of(g, nid)
        if node.op is Op.WHERE:
            c = node.operands[0]
            if not any(node_of(g, x).op is Op.INPUT for x in nx.ancestors(g, c) | {c}):
                out.add(c)
    return sorted(out)


# ---- block ranges (the generated kernels compute the same bounds) ------------------------------

def key_block_range(band: Band | None, start_m: int, block_m: int, block_n: int, n: int):
    """[first, end) of the key positions a query block [start_m, start_m + block_m) visits; first
    is a multiple of block_n. Key blocks wholly outside the band are skipped."""
    lo, hi = 0, n
    if band is not None and band.hi is not None:   # the last query row is min(start_m + block_m, n) - 1
        hi = min(min(start_m + block_m, n) + band.hi, n)
    if band is not None and band.lo is not None:
        lo = max(start_m + band.lo, 0)
        if lo >= hi:          # no key in reach: an empty loop
            hi = 0
        lo = lo // block_n * block_n
    return lo, hi


def query_block_range(band: Band | None, start_n: int, block_n: int, block_m: int, n: int):
    """[first, end) of the query positions a key block [start_n, start_n + block_n) visits."""
    lo, hi = 0, n
    if band is not None and band.lo is not None:
        hi = min(min(start_n + block_n, n) - band.lo, n)
    if band is not None and band.hi is not None:
        lo = max(start_n - band.hi, 0)
        if lo >= hi:          # no query in reach: an empty loop
            hi = 0
        lo = lo // block_m * block_m
    return lo, hi


def computed_entries(band: Band | None, n: int, block_m: int, block_n: int) -> int:
    """Score entries the forward kernel computes at sequence length n (whole blocks, clipped at n)."""
    total = 0
    for start_m in range(0, n, block_m):
        rows = min(block_m, n - start_m)
        lo, hi = key_block_range(band, start_m, block_m, block_n, n)
        for start_n in range(lo, max(hi, lo), block_n):
            total += rows * min(block_n, n - start_n)
    return total


# ---- bounds of the weights ---------------------------------------------------------------------

_ANY = (-math.inf, math.inf)


def _mul(a, b):
    vals = []
    for x in a:
        for y in b:
            if (x == 0 and math.isinf(y)) or (y == 0 and math.isinf(x)):
                vals.append(0.0)
            else:
                vals.append(x * y)
    return (min(vals), max(vals))


def weight_interval(g: nx.DiGraph, plan) -> tuple[float, float]:
    """An interval holding every weight W (the left operand of the product over the keys)."""
    if plan.normalization == "softmax":
        return (0.0, 1.0)
    return _interval(g, plan.score, {})


def _interval(g, nid, memo, index_max=math.inf):
    if nid in memo:
        return memo[nid]
    node = node_of(g, nid)
    op = node.op
    res = _ANY
    if node.shape == ():
        vals = scalar_values(g, nid)
        if vals and not any(math.isnan(v) for v in vals):
            res = (min(vals), max(vals))
    elif op is Op.INDEX:
        res = (0.0, index_max)
    elif structural.get(op) is not None:    # softmax in [0, 1], cos in [-1, 1], ...: its entry
        args = [_interval(g, o, memo, index_max) for o in node.operands]
        res = structural.get(op).interval(args) or _ANY
    elif op in (Op.ADD, Op.SUB, Op.NEG, Op.MUL, Op.DIV, Op.MAX, Op.MIN) or is_fn(op):
        args = [_interval(g, o, memo, index_max) for o in node.operands]
        res = _interval_op(op, args)
    memo[nid] = res
    return res


def _interval_op(op, args):
    if op is Op.NEG:
        return (-args[0][1], -args[0][0])
    if op is Op.ADD:
        return (args[0][0] + args[1][0], args[0][1] + args[1][1])
    if op is Op.SUB:
        return (args[0][0] - args[1][1], args[0][1] - args[1][0])
    if op is Op.MUL:
        return _mul(*args)
    if op is Op.DIV:
        lo, hi = args[1]
        if lo <= 0 <= hi:
            return _ANY
        return _mul(args[0], (1.0 / hi, 1.0 / lo))
    if op is Op.MAX:
        return (max(args[0][0], args[1][0]), max(args[0][1], args[1][1]))
    if op is Op.MIN:
        return (min(args[0][0], args[1][0]), min(args[0][1], args[1][1]))
    entry = elementwise.lookup(op.value)
    (lo, hi), = args
    if entry is None or not entry.builtin:
        return _ANY
    if op.value == "abs":
        m = max(abs(lo), abs(hi))
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), m)
    if op.value in _INCREASING:
        f = entry.scalar_fn()
        return (_at(f, lo, -math.inf), _at(f, hi, math.inf))
    return _ANY


def _at(f, x, fallback):
    """f at an interval end (a large finite stand-in for an infinite end); `fallback` when it
    cannot be evaluated there."""
    end = math.isinf(x)
    if end:
        x = math.copysign(1e30, x)
    try:
        v = float(f(x))
    except (ArithmeticError, ValueError):
        return fallback
    if math.isnan(v) or (end and abs(v) >= 1e29):
        return fallback
    return v


def weights_fit_fp16(g: nx.DiGraph, plan) -> bool:
    lo, hi = weight_interval(g, plan)
    return max(abs(lo), abs(hi)) <= FP16_SAFE


__all__ = ["Band", "FP16_SAFE", "SAMPLES", "computed_entries", "condition_band", "constant",
           "key_block_range", "mask_band", "position_conditions", "query_block_range",
           "scalar_values", "weight_interval", "weights_fit_fp16"]
