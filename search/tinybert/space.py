"""The AutoTinyBERT search space: one definition for sampling, mutation, the predictor and reports.

An architecture is the paper's string L-dm-df-h-dqkv with identical layers: L layers, hidden dm
(= do), FFN df, h heads and a qkv width dqkv (= dq = dk = dv, a multiple of h). A Space bounds it by
the SuperPLM's maxima and fixes how the heads are cut:

* mode "mlm" (pre-training, MHA strategy 1): the head dim is fixed (`head_dim`, 64 by default),
  h ranges over 1..max_heads and dqkv = head_dim * h; a sub-model takes the first h heads.
* mode "kd" (distillation, MHA strategy 2): h is fixed to max_heads (the teacher's head count),
  dqkv is any multiple of h up to max_qkv; a sub-model takes the first dqkv/h dims of every head.

dm and df move in steps of `step` (4) between their minima and maxima. The minima default to the
paper's (hidden and FFN 128; kd qkv 180, i.e. 15 dims for each of 12 heads) when the space is
paper-sized (max_hidden >= 768, BERT-base's width), and to 32 (hidden, FFN) and one head / one dim per
head (qkv) for the smaller spaces of tests, demos and benchmarks.
Optionally one attention formula (attnc DSL) for every layer: the compiled formula is part of the
architecture and its FLOPs part of the predictor's features.

This module imports neither torch nor transformers (the CLI parses arch strings with it).
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Callable

from attnc.compiler.errors import AttncError, ConfigError

MODES = ("mlm", "kd")
STANDARD_FORMULA = "softmax(Q @ K^T / sqrt(d)) @ V"   # = attnc.runtime.config.STANDARD_FORMULA
_ARCH_RE = re.compile(r"^\s*(\d+)-(\d+)-(\d+)-(\d+)-(\d+)\s*$")
_FIELDS = ("layers", "hidden", "ffn", "heads", "qkv")

# AutoTinyBERT-Fast's rule (the paper, section 4.3): 1.6 dm <= df <= 1.9 dm, 0.7 dm <= dqkv <= 1.0 dm.
FAST_FFN = (1.6, 1.9)
FAST_QKV = (0.7, 1.0)
# the paper's space (section 4.1): hidden and FFN from 128, kd qkv from 180; used when max_hidden >= 768
PAPER_HIDDEN = 768
PAPER_MIN_WIDTH = 128
PAPER_MIN_QKV = 180
SMALL_MIN_WIDTH = 32
MUTATIONS = ("local", "uniform")
LOCAL_STEPS = (-2, -1, 1, 2)      # local mutation: one or two grid steps either way


@dataclass(frozen=True, order=True)
class Arch:
    """One architecture L-dm-df-h-dqkv (all layers identical)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    qkv: int

    def __post_init__(self):
        for name in _FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"arch {name} must be a positive integer, got {v!r}",
                                  hint="every field of L-dm-df-h-dqkv is a positive integer")
        if self.qkv % self.heads:
            raise ConfigError(f"arch {self}: qkv dim {self.qkv} is not a multiple of {self.heads} heads",
                              hint=f"pick dqkv a multiple of h, e.g. "
                                   f"{max(self.heads, self.qkv - self.qkv % self.heads)}")

    @classmethod
    def parse(cls, text: str) -> Arch:
        """"3-200-300-3-192" -> Arch(3, 200, 300, 3, 192); ConfigError on malformed text."""
        m = _ARCH_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(f"malformed arch string {text!r}",
                              hint="write L-dm-df-h-dqkv with five positive integers, e.g. "
                                   "3-200-300-3-192 "
                                   "(layers, hidden, FFN, heads, qkv dim)")
        return cls(*(int(x) for x in m.groups()))

    def __str__(self) -> str:
        return f"{self.layers}-{self.hidden}-{self.ffn}-{self.heads}-{self.qkv}"

    @property
    def head_dim(self) -> int:
        return self.qkv // self.heads


def _as_arch(arch: Arch | str) -> Arch:
    if isinstance(arch, Arch):
        return arch
    if isinstance(arch, str):
        return Arch.parse(arch)
    raise ConfigError(f"an architecture is an Arch or an L-dm-df-h-dqkv string, "
                      f"got {type(arch).__name__}")


@dataclass(frozen=True)
class Space:
    """The search space of a SuperPLM whose own architecture is `max_arch`.

    Defaults are the paper's SuperPLM (8-768-3072-12-768) and, for such a paper-sized space
    (max_hidden >= 768), the paper's minima: hidden and FFN 128, and in kd mode qkv 180 (rounded up to
    a multiple of the head count). Smaller spaces default to hidden and FFN 32 (capped at the maxima)
    and the smallest qkv (one head in mlm mode, one dim per head in kd mode). The widths' minima and
    maxima must be multiples of `step`. min_qkv is the smallest qkv width a sub-model may have.
    """

    max_layers: int = 8
    max_hidden: int = 768
    max_ffn: int = 3072
    max_heads: int = 12
    mode: str = "mlm"
    vocab_size: int = 30522
    head_dim: int = 64               # per-head width of the SuperPLM (mlm: of every sub-model too)
    step: int = 4                    # dm and df move in steps of `step`
    min_layers: int = 1
    min_hidden: int | None = None    # None: 128 for a paper-sized space, else min(32, max_hidden)
    min_ffn: int | None = None       # None: 128 for a paper-sized space, else min(32, max_ffn)
    formula: str | None = None       # one attention formula for every layer (None: standard attention)
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    min_qkv: int | None = None       # None: kd 180 when paper-sized, else the smallest (see above)

    def __post_init__(self):
        paper = isinstance(self.max_hidden, int) and self.max_hidden >= PAPER_HIDDEN
        for name, cap in (("min_hidden", self.max_hidden), ("min_ffn", self.max_ffn)):
            if getattr(self, name) is None:
                low = PAPER_MIN_WIDTH if paper else SMALL_MIN_WIDTH
                object.__setattr__(self, name, min(low, cap) if isinstance(cap, int) and cap > 0 else low)
        if self.min_qkv is None and isinstance(self.max_heads, int) and isinstance(self.head_dim, int) \
                and self.max_heads > 0 and self.head_dim > 0:
            if self.mode == "kd":
                low = PAPER_MIN_QKV if paper else 1
                per_head = min(self.head_dim, -(-low // self.max_heads))
                object.__setattr__(self, "min_qkv", self.max_heads * per_head)
            else:
                object.__setattr__(self, "min_qkv", self.head_dim)
        for f in fields(self):
            if f.name in ("mode", "formula"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"space {f.name} must be a positive integer, got {v!r}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown space mode {self.mode!r}",
                              hint="mode is 'mlm' (pre-training, MHA strategy 1) or 'kd' "
                                   "(distillation, MHA strategy 2)")
        for lo, hi in (("min_layers", "max_layers"), ("min_hidden", "max_hidden"),
                       ("min_ffn", "max_ffn")):
            if getattr(self, lo) > getattr(self, hi):
                raise ConfigError(f"space {lo}={getattr(self, lo)} exceeds {hi}={getattr(self, hi)}",
                                  hint=f"lower {lo} or raise {hi}")
        if self.min_qkv > self.max_qkv:
            raise ConfigError(f"space min_qkv={self.min_qkv} exceeds the largest qkv width {self.max_qkv} "
                              f"(head_dim {self.head_dim} x {self.max_heads} heads)",
                              hint="lower min_qkv or raise head_dim / max_heads")
        for name in ("min_hidden", "max_hidden", "min_ffn", "max_ffn"):
            if getattr(self, name) % self.step:
                raise ConfigError(f"space {name}={getattr(self, name)} is not a multiple of "
                                  f"step={self.step}",
                                  hint=f"widths move in steps of {self.step}: pick a multiple of it")
        if self.formula is not None:
            if not isinstance(self.formula, str):
                raise ConfigError(f"space formula must be a string, got {type(self.formula).__name__}")
            from attnc.compiler.api import analyze
            try:
                analyze(self.formula)
            except AttncError as e:
                raise ConfigError(f"bad space formula {self.formula!r}\n{e}",
                                  hint="fix the formula (try `attnc check 'FORMULA'`)") from None

    # --- derived ------------------------------------------------------------------------------------

    @property
    def max_qkv(self) -> int:
        return self.head_dim * self.max_heads

    @property
    def max_arch(self) -> Arch:
        """The SuperPLM's own architecture."""
        return Arch(self.max_layers, self.max_hidden, self.max_ffn, self.max_heads, self.max_qkv)

    @property
    def strategy(self) -> int:
        """MHA strategy: 1 (first h heads, head dim kept) in mlm mode, 2 (all heads, first dqkv/h
        dims of each) in kd mode."""
        return 1 if self.mode == "mlm" else 2

    @property
    def formula_inputs(self) -> tuple[str, ...]:
        """The formula's inputs among Q K V P (those that get a projection)."""
        from attnc.compiler.api import analyze
        return tuple(analyze(self.formula or STANDARD_FORMULA).inputs)

    # --- membership ---------------------------------------------------------------------------------

    def validate(self, arch: Arch | str) -> Arch:
        """The Arch when it lies in this space; ConfigError naming the field and the fix otherwise."""
        arch = _as_arch(arch)
        return _validate(self, arch)

    def __contains__(self, arch) -> bool:
        try:
            self.validate(arch)
        except ConfigError:
            return False
        return True

    def _choices(self) -> dict[str, list[int]]:
        return {
            "layers": list(range(self.min_layers, self.max_layers + 1)),
            "hidden": list(range(self.min_hidden, self.max_hidden + 1, self.step)),
            "ffn": list(range(self.min_ffn, self.max_ffn + 1, self.step)),
            # mlm: the head count; kd: the per-head dim (qkv = max_heads * that)
            "heads": list(range(-(-self.min_qkv // self.head_dim), self.max_heads + 1)) if self.mode == "mlm"
            else list(range(-(-self.min_qkv // self.max_heads), self.head_dim + 1)),
        }

    def _make(self, L: int, dm: int, df: int, k: int) -> Arch:
        if self.mode == "mlm":
            return Arch(L, dm, df, k, self.head_dim * k)
        return Arch(L, dm, df, self.max_heads, self.max_heads * k)

    def size(self) -> int:
        """Number of architectures in the space."""
        n = 1
        for c in self._choices().values():
            n *= len(c)
        return n

    def sample(self, rng: random.Random) -> Arch:
        """Uniform over the space (the space is a product of independent per-field choices)."""
        c = self._choices()
        return self._make(rng.choice(c["layers"]), rng.choice(c["hidden"]), rng.choice(c["ffn"]),
                          rng.choice(c["heads"]))

    def mutate(self, arch: Arch | str, rng: random.Random, pm: float, kind: str = "local") -> Arch:
        """Each free field (L, dm, df, and h in mlm / the per-head dim in kd) changed with probability pm.

        kind "local" (the default, as the reference implementation): the field moves one or two grid
        steps up or down (L by 1-2 layers, dm and df by 1-2 x `step`, h by 1-2 heads, kd qkv by 1-2 x
        max_heads), uniformly among the moves that stay in the space (a field with one value stays).
        kind "uniform": the field is redrawn uniformly over its whole range (may return it unchanged)."""
        arch = self.validate(arch)
        if not 0.0 <= pm <= 1.0:
            raise ConfigError(f"mutation probability pm={pm} is not in [0, 1]")
        if kind not in MUTATIONS:
            raise ConfigError(f"unknown mutation {kind!r}", hint=f"use one of {', '.join(MUTATIONS)}")
        c = self._choices()
        cur = [arch.layers, arch.hidden, arch.ffn, arch.heads if self.mode == "mlm" else arch.head_dim]
        new = []
        for name, v in zip(("layers", "hidden", "ffn", "heads"), cur):
            if rng.random() >= pm:
                new.append(v)
            elif kind == "uniform":
                new.append(rng.choice(c[name]))
            else:
                grid = c[name]
                i = grid.index(v)
                moves = [i + s for s in LOCAL_STEPS if 0 <= i + s < len(grid)]
                new.append(grid[rng.choice(moves)] if moves else v)
        return self._make(*new)

    # --- AutoTinyBERT-Fast --------------------------------------------------------------------------

    def fast_arch(self, layers: int, hidden: int) -> Arch | None:
        """The rule's pick for (L, dm), or None when no width of the space obeys the rule:
        df = the multiple of step nearest 1.75 dm (the middle of [1.6 dm, 1.9 dm]) inside the range
        and the space; dqkv = the largest allowed qkv width in [0.7 dm, dm] (mlm: head_dim * h;
        kd: a multiple of max_heads)."""
        dm = hidden
        lo_f, hi_f = FAST_FFN[0] * dm, FAST_FFN[1] * dm
        dfs = [df for df in range(self.min_ffn, self.max_ffn + 1, self.step) if lo_f <= df <= hi_f]
        if not dfs:
            return None
        df = min(dfs, key=lambda v: (abs(v - 1.75 * dm), v))
        lo_q, hi_q = FAST_QKV[0] * dm, FAST_QKV[1] * dm
        ks = [k for k in self._choices()["heads"]
              if lo_q <= (self.head_dim * k if self.mode == "mlm" else self.max_heads * k) <= hi_q]
        if not ks:
            return None
        return self._make(layers, dm, df, max(ks))

    def fast_candidates(self, latency: Callable[[Arch], float] | None = None,
                        max_ms: float | None = None) -> list[Arch]:
        """AutoTinyBERT-Fast: one candidate per layer count obeying
        1.6 dm <= df <= 1.9 dm and 0.7 dm <= dqkv <= 1.0 dm (see fast_arch for df/dqkv).
        The pick per L is the widest such arch (largest dm); with `latency` and `max_ms`, the widest
        whose latency(arch) <= max_ms (layer counts with none are left out)."""
        if (latency is None) != (max_ms is None):
            raise ConfigError("fast_candidates takes latency and max_ms together")
        out = []
        for L in range(self.min_layers, self.max_layers + 1):
            for dm in range(self.max_hidden, self.min_hidden - 1, -self.step):
                arch = self.fast_arch(L, dm)
                if arch is None:
                    continue
                if latency is None or latency(arch) <= max_ms:
                    out.append(arch)
                    break
        return out

    # --- predictor features, configs ----------------------------------------------------------------

    FEATURE_NAMES = ("layers", "hidden", "ffn", "heads", "qkv", "flops", "params")

    def features(self, arch: Arch | str, seq_len: int = 128) -> list[float]:
        """[L, dm, df, h, dqkv, encoder forward FLOPs at seq_len (formula FLOPs included),
        parameters of the MLM model] -- the counts of attnc.runtime.counters, computed analytically."""
        arch = self.validate(arch)
        return list(_features(self, arch, seq_len))   # a copy: the memoised tuple stays intact

    def flops(self, arch: Arch | str, seq_len: int = 128) -> int:
        """Encoder forward FLOPs of one sequence (= runtime.counters.count_flops of config(arch))."""
        return int(self.features(arch, seq_len)[5])

    def params(self, arch: Arch | str) -> int:
        """Parameters of the stand-alone MLM model (equals count_parameters(config(arch), "mlm"))."""
        return int(self.features(arch)[6])

    def config(self, arch: Arch | str, **overrides):
        """The stand-alone AttncBertConfig of `arch` (what SuperPLM.extract builds)."""
        from attnc.runtime.config import AttncBertConfig

        arch = self.validate(arch)
        spec = {"type": "attention", "formula": self.formula or STANDARD_FORMULA}
        fixed = dict(vocab_size=self.vocab_size, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                     num_attention_heads=arch.heads, intermediate_size=arch.ffn, qkv_size=arch.qkv,
                     layers=[dict(spec) for _ in range(arch.layers)],
                     max_position_embeddings=self.max_position_embeddings,
                     type_vocab_size=self.type_vocab_size)
        clash = sorted(set(overrides) & set(fixed))
        if clash:
            raise ConfigError(f"config override(s) {', '.join(clash)} are set by the space and the arch",
                              hint="change the Space (or the arch) instead")
        return AttncBertConfig(**fixed, **overrides)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Space:
        if not isinstance(d, dict):
            raise ConfigError(f"a space is a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"unknown space field(s) {', '.join(extra)}",
                              hint=f"a space has {', '.join(sorted(known))}")
        return cls(**d)


@lru_cache(maxsize=65536)
def _validate(space: Space, arch: Arch) -> Arch:
    """Membership check (memoised: evolution and training call it thousands of times)."""
    s = space
    if not s.min_layers <= arch.layers <= s.max_layers:
        raise ConfigError(f"arch {arch}: {arch.layers} layers outside the space's "
                          f"{s.min_layers}..{s.max_layers}",
                          hint=f"pick L between {s.min_layers} and {s.max_layers}")
    for name, lo, hi in (("hidden", s.min_hidden, s.max_hidden), ("ffn", s.min_ffn, s.max_ffn)):
        v = getattr(arch, name)
        label = "hidden size dm" if name == "hidden" else "FFN size df"
        if not lo <= v <= hi:
            raise ConfigError(f"arch {arch}: {label} {v} is outside the SuperPLM's {lo}..{hi}",
                              hint=f"pick {label} between {lo} and {hi} (or build a larger SuperPLM)")
        if v % s.step:
            near = v - v % s.step if v - v % s.step >= lo else v + s.step - v % s.step
            raise ConfigError(f"arch {arch}: {label} {v} is not a multiple of the step {s.step}",
                              hint=f"widths move in steps of {s.step}, e.g. {near}")
    if arch.qkv < s.min_qkv:
        raise ConfigError(f"arch {arch}: qkv dim {arch.qkv} is below the space's minimum {s.min_qkv}",
                          hint=f"pick dqkv >= {s.min_qkv} (or build the space with a smaller min_qkv)")
    if arch.qkv > s.max_qkv:
        raise ConfigError(f"arch {arch}: qkv dim {arch.qkv} exceeds the SuperPLM's {s.max_qkv}",
                          hint=f"pick dqkv <= {s.max_qkv} "
                               f"(= head_dim {s.head_dim} x {s.max_heads} heads)")
    if s.mode == "mlm":
        if not 1 <= arch.heads <= s.max_heads:
            raise ConfigError(f"arch {arch}: {arch.heads} heads outside the space's 1..{s.max_heads}",
                              hint=f"pick h between 1 and {s.max_heads}")
        if arch.qkv != s.head_dim * arch.heads:
            raise ConfigError(f"arch {arch}: in mlm mode (MHA strategy 1) dqkv must be head_dim x h = "
                              f"{s.head_dim} x {arch.heads} = {s.head_dim * arch.heads}, got {arch.qkv}",
                              hint=f"write {arch.layers}-{arch.hidden}-{arch.ffn}-{arch.heads}-"
                                   f"{s.head_dim * arch.heads}, or use a kd-mode space")
    else:
        if arch.heads != s.max_heads:
            H = s.max_heads
            near = min(s.max_qkv, max(H, arch.qkv - arch.qkv % H))
            raise ConfigError(f"arch {arch}: in kd mode (MHA strategy 2) h is fixed to the teacher's "
                              f"{H} heads, got {arch.heads}",
                              hint=f"write h = {H} and dqkv a multiple of it, e.g. "
                                   f"{arch.layers}-{arch.hidden}-{arch.ffn}-{H}-{near}")
    return arch


@lru_cache(maxsize=65536)
def _features(space: Space, arch: Arch, n: int) -> tuple[float, ...]:
    # Mirrors attnc.runtime.counters (flops_breakdown, count_parameters(head="mlm")) for one
    # arch without building a config; tests check the two agree.
    L, dm, df, h, dq = arch.layers, arch.hidden, arch.ffn, arch.heads, arch.qkv
    V = space.vocab_size
    from attnc.compiler.api import analyze
    from attnc.runtime.counters import formula_flops
    a = analyze(space.formula or STANDARD_FORMULA)
    n_inputs = len(a.inputs)
    mix = h * formula_flops(a.simplified, n, dq // h)
    flops = 5 * n * dm + L * (n_inputs * 2 * n * dm * dq + mix + 2 * n * dq * dm + 5 * n * dm
                              + 2 * n * dm * df + 8 * n * df + 2 * n * df * dm + 5 * n * dm)
    params = ((V + space.max_position_embeddings + space.type_vocab_size) * dm + 2 * dm
              + L * (n_inputs * (dm * dq + dq) + dq * dm + dm + 2 * dm
                     + dm * df + df + df * dm + dm + 2 * dm)
              + dm * dm + dm + 2 * dm + V)
    return (float(L), float(dm), float(df), float(h), float(dq), float(flops), float(params))
