"""Architectures of the search space: one choice per layer (attention formula or light convolution).

Frozen dataclasses so they hash, compare and travel to Ray workers unchanged. Formulas are stored
in canonical form (attnc.analyze(text).canonical) so equal formulas are equal objects.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from attnc.compiler.errors import ConfigError

KERNEL_SIZES = (3, 5, 7, 9, 15, 31, 65)


def elementwise_primitives() -> tuple[str, ...]:
    """Unary OP-NAS primitives beyond the structural ones (neg, transpose, scale, softmax and the
    binary ops): every elementwise function of the compiler's table, the built-ins and any
    registered with attnc.ops.register_elementwise, by name. The paper's Table 1 uses two
    (logsigmoid, softsign); the others can be added to a space's primitives."""
    from attnc.compiler.elementwise import names
    return names()


def unknown_primitives(primitives, structural) -> list[str]:
    """The names in `primitives` that are neither in `structural` nor elementwise functions."""
    known = set(structural) | set(elementwise_primitives())
    return [p for p in primitives if p not in known]
KINDS = ("attention", "conv")


@dataclass(frozen=True)
class LayerChoice:
    kind: str                        # "attention" | "conv"
    formula: str | None = None       # canonical text, for attention layers
    kernel_size: int | None = None   # for conv layers: one of KERNEL_SIZES

    def __post_init__(self):
        if self.kind == "attention":
            if not isinstance(self.formula, str) or self.kernel_size is not None:
                raise ConfigError(f"an attention layer needs a formula and no kernel size, got {self!r}")
        elif self.kind == "conv":
            if self.kernel_size not in KERNEL_SIZES or self.formula is not None:
                raise ConfigError(f"a conv layer needs a kernel size in {KERNEL_SIZES}, got {self!r}")
        else:
            raise ConfigError(f"unknown layer kind {self.kind!r}", hint="use 'attention' or 'conv'")

    @classmethod
    def attention(cls, text: str) -> LayerChoice:
        """An attention layer from any formula text a model layer accepts (1-4 of Q, K, V, P), stored
        canonically (raises AttncError if illegal)."""
        from attnc.compiler.api import analyze
        from attnc.runtime.config import LAYER_CHECKS
        return cls("attention", formula=analyze(text, checks=LAYER_CHECKS).canonical)

    @classmethod
    def conv(cls, kernel_size: int) -> LayerChoice:
        return cls("conv", kernel_size=kernel_size)

    def key(self) -> str:
        if self.kind == "conv":
            return f"conv{self.kernel_size}"
        from attnc.compiler.api import formula_hash
        return f"attn:{formula_hash(self.formula)}"

    def to_spec(self, heads: int) -> dict:
        if self.kind == "conv":
            return {"type": "conv", "kernel_size": self.kernel_size, "heads": heads}
        return {"type": "attention", "formula": self.formula, "heads": heads}

    def to_json(self) -> dict:
        if self.kind == "conv":
            return {"kind": "conv", "kernel_size": self.kernel_size}
        return {"kind": "attention", "formula": self.formula}

    @classmethod
    def from_json(cls, d: dict) -> LayerChoice:
        if not isinstance(d, dict) or "kind" not in d:
            raise ConfigError(f"malformed layer choice {d!r}")
        return cls(d["kind"], formula=d.get("formula"), kernel_size=d.get("kernel_size"))

    def __str__(self) -> str:
        return f"conv(k={self.kernel_size})" if self.kind == "conv" else self.formula


@dataclass(frozen=True)
class Architecture:
    layers: tuple[LayerChoice, ...]
    hidden_size: int = 128
    intermediate_size: int = 512
    num_heads: int = 4

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError("an architecture needs at least one layer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")

    def to_config(self, **overrides: Any):
        """An AttncBertConfig of this architecture (overrides: any config field, e.g. vocab_size)."""
        from attnc.runtime.config import AttncBertConfig
        kw = dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                  num_hidden_layers=len(self.layers), num_attention_heads=self.num_heads,
                  layers=[c.to_spec(self.num_heads) for c in self.layers])
        kw.update(overrides)
        return AttncBertConfig(**kw)

    def to_json(self) -> dict:
        return {"layers": [c.to_json() for c in self.layers], "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_heads": self.num_heads}

    @classmethod
    def from_json(cls, d: dict) -> Architecture:
        try:
            return cls(layers=tuple(LayerChoice.from_json(x) for x in d["layers"]),
                       hidden_size=int(d.get("hidden_size", 128)),
                       intermediate_size=int(d.get("intermediate_size", 512)),
                       num_heads=int(d.get("num_heads", 4)))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed architecture JSON: {e}") from None

    def key(self) -> str:
        """Dedup key: the widths plus each layer's canonical hash (or kernel size)."""
        text = f"{self.hidden_size}-{self.intermediate_size}-{self.num_heads}|" + "|".join(
            c.key() for c in self.layers)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return " ; ".join(str(c) for c in self.layers)
