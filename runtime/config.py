"""AttncBertConfig: a BERT encoder whose layers are compiled attention formulas or light convolutions.

Widths follow AutoTinyBERT: L layers, hidden dm (= do), FFN df, heads h, qkv dim dq = dk = dv
(divisible by h), written as the paper's arch string "L-dm-df-h-dqkv", e.g. "5-564-1054-8-512".
Every layer is one spec dict (normalised here, so a saved config.json is explicit):

    {"type": "attention", "formula": "softmax(Q @ K^T / sqrt(d)) @ V", "heads": 12, "qkv_size": 768}
    {"type": "conv", "kernel_size": 7, "heads": 12, "qkv_size": 768}

`d` in a formula is the head dim qkv_size / heads. Configs are JSON; nothing is ever evaluated.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from attnc.compiler.check import CheckOptions
from attnc.compiler.errors import AttncError, ConfigError
from transformers import PretrainedConfig

# what a layer's formula may be: 1-4 of Q, K, V, P (one input is a layer without token mixing, e.g.
# softsign(V), which an OP-NAS space with min_inputs=1 produces); the compiler's default is the paper's 2-4
LAYER_CHECKS = CheckOptions(min_inputs=1, max_inputs=4)

MODEL_TYPE = "attnc_bert"
STANDARD_FORMULA = "softmax(Q @ K^T / sqrt(d)) @ V"
KERNEL_SIZES = (3, 5, 7, 9, 15, 31, 65)
LAYER_TYPES = ("attention", "conv")
BACKENDS = ("torch", "triton", "auto")
ARCH_RE = re.compile(r"^\s*(\d+)-(\d+)-(\d+)-(\d+)-(\d+)\s*$")

# The two AutoBERT-Zero formulas quoted in the paper's figures (written in attnc's DSL).
AUTOBERT_ZERO_FORMULAS = (
    "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
)

_LAYER_KEYS = {"attention": {"type", "formula", "heads", "qkv_size"},
               "conv": {"type", "kernel_size", "heads", "qkv_size"}}


class AttncBertConfig(PretrainedConfig):
    """Configuration of an attnc BERT. Field names match transformers.BertConfig where they exist,
    so a standard BERT config.json loads into it unchanged (all layers standard attention)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 30522,                  # WordPiece vocabulary size
        hidden_size: int = 768,                   # dm (= do): width of the residual stream
        num_hidden_layers: int = 12,              # L
        num_attention_heads: int = 12,            # h: default heads of every layer
        intermediate_size: int = 3072,            # df: feed-forward inner width
        qkv_size: int | None = None,              # dq = dk = dv: default per-layer qkv width (None: dm)
        layers: list[dict] | None = None,         # per-layer specs (None: L standard attention layers)
        attention_backend: str = "auto",          # attnc.compile backend on CUDA: torch | triton | auto
        sdpa_fast_path: bool = True,              # standard formula -> F.scaled_dot_product_attention
        hidden_act: str = "gelu",                 # FFN / MLM-transform activation
        hidden_dropout_prob: float = 0.1,         # dropout on embeddings and sublayer outputs
        attention_probs_dropout_prob: float = 0.1,  # dropout on attention probs (SDPA path) / conv kernels
        max_position_embeddings: int = 512,       # learned absolute positions
        type_vocab_size: int = 2,                 # segment (token type) embeddings
        initializer_range: float = 0.02,          # std of the normal init
        layer_norm_eps: float = 1e-12,            # LayerNorm epsilon (BERT's)
        pad_token_id: int = 0,                    # [PAD] id (its embedding row is zero at init)
        classifier_dropout: float | None = None,  # classification-head dropout (None: hidden dropout)
        tie_word_embeddings: bool = True,         # MLM decoder shares the word-embedding matrix
        **kwargs,
    ):
        self.vocab_size = _pos_int(vocab_size, "vocab_size")
        self.hidden_size = _pos_int(hidden_size, "hidden_size")
        self.num_hidden_layers = _pos_int(num_hidden_layers, "num_hidden_layers")
        self.num_attention_heads = _pos_int(num_attention_heads, "num_attention_heads")
        self.intermediate_size = _pos_int(intermediate_size, "intermediate_size")
        self.qkv_size = _pos_int(qkv_size, "qkv_size") if qkv_size is not None else self.hidden_size
        if attention_backend not in BACKENDS:
            raise ConfigError(f"unknown attention_backend {attention_backend!r}",
                              hint=f"choose one of {', '.join(BACKENDS)}")
        self.attention_backend = attention_backend
        self.sdpa_fast_path = bool(sdpa_fast_path)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = _pos_int(max_position_embeddings, "max_position_embeddings")
        self.type_vocab_size = _pos_int(type_vocab_size, "type_vocab_size")
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.classifier_dropout = classifier_dropout
        kwargs.pop("model_type", None)
        for key in ("is_decoder", "add_cross_attention"):   # a BERT config.json carries these
            if kwargs.pop(key, False):
                raise ConfigError(f"{key}=True is not supported: attnc BERT is an encoder",
                                  hint=f"set {key} to false in config.json")
        for key in ("position_embedding_type", "use_cache", "gradient_checkpointing"):
            kwargs.pop(key, None)                           # BERT-only fields with no effect here
        self.layers = normalise_layers(layers, self.num_hidden_layers, self.num_attention_heads,
                                       self.qkv_size)
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    # --- convenience -----------------------------------------------------------------------------

    @property
    def arch(self) -> str:
        """AutoTinyBERT arch string L-dm-df-h-dqkv of the global widths."""
        return (f"{self.num_hidden_layers}-{self.hidden_size}-{self.intermediate_size}-"
                f"{self.num_attention_heads}-{self.qkv_size}")

    @classmethod
    def from_arch(cls, arch: str, **kwargs) -> AttncBertConfig:
        """Config from an arch string "L-dm-df-h-dqkv" (all layers standard attention unless
        `layers` is given)."""
        L, dm, df, h, dq = parse_arch(arch)
        return cls(num_hidden_layers=L, hidden_size=dm, intermediate_size=df,
                   num_attention_heads=h, qkv_size=dq, **kwargs)


# --- parsing helpers --------------------------------------------------------------------------------


def parse_arch(arch: str) -> tuple[int, int, int, int, int]:
    """"L-dm-df-h-dqkv" -> (L, dm, df, h, dqkv), validated."""
    m = ARCH_RE.match(arch) if isinstance(arch, str) else None
    if m is None:
        raise ConfigError(f"malformed arch string {arch!r}",
                          hint="write L-dm-df-h-dqkv with five positive integers, e.g. 5-564-1054-8-512 "
                               "(layers, hidden, FFN, heads, qkv dim)")
    L, dm, df, h, dq = (int(x) for x in m.groups())
    for name, val in zip(("L", "dm", "df", "h", "dqkv"), (L, dm, df, h, dq)):
        if val <= 0:
            raise ConfigError(f"arch string {arch!r}: {name} must be positive, got {val}",
                              hint="every field of L-dm-df-h-dqkv is a positive integer")
    if dq % h:
        raise ConfigError(f"arch string {arch!r}: qkv dim {dq} is not divisible by {h} heads",
                          hint=f"pick dqkv a multiple of h, e.g. {max(h, dq - dq % h)}")
    return L, dm, df, h, dq


def parse_layer(text: str) -> dict:
    """A short per-layer spec from the command line: "conv:7", "attn:FORMULA", "std" or a formula."""
    t = text.strip()
    if t in ("std", "standard", "attn", "attention"):
        return {"type": "attention", "formula": STANDARD_FORMULA}
    if t.startswith("conv:") or t.startswith("conv"):
        ks = t[5:] if t.startswith("conv:") else t[4:]
        try:
            k = int(ks)
        except ValueError:
            raise ConfigError(f"bad conv layer spec {text!r}",
                              hint=f"write conv:K with K in {KERNEL_SIZES}, e.g. conv:7") from None
        return {"type": "conv", "kernel_size": k}
    t = t.removeprefix("attn:")
    return {"type": "attention", "formula": t}


def normalise_layers(layers: list | None, L: int, heads: int, qkv: int) -> list[dict]:
    """Fill defaults into per-layer specs and check them; raises ConfigError naming the layer."""
    if layers is None or len(layers) == 0:
        layers = [{"type": "attention"} for _ in range(L)]
    if not isinstance(layers, (list, tuple)):
        raise ConfigError(f"layers must be a list of layer specs, got {type(layers).__name__}")
    if len(layers) != L:
        raise ConfigError(f"{len(layers)} layer specs for num_hidden_layers={L}",
                          hint="give one spec per layer, or none for all-standard attention")
    out = []
    for i, spec in enumerate(layers):
        if isinstance(spec, str):
            spec = parse_layer(spec)
        if not isinstance(spec, dict):
            raise ConfigError(f"layer {i}: a spec is a JSON object, got {type(spec).__name__}")
        kind = spec.get("type", "attention")
        if kind not in LAYER_TYPES:
            raise ConfigError(f"layer {i}: unknown layer type {kind!r}",
                              hint=f"use one of {', '.join(LAYER_TYPES)}")
        extra = set(spec) - _LAYER_KEYS[kind]
        if extra:
            raise ConfigError(f"layer {i}: unknown key(s) {', '.join(sorted(extra))} for a {kind} layer",
                              hint=f"a {kind} layer takes {', '.join(sorted(_LAYER_KEYS[kind]))}")
        h = _pos_int(spec.get("heads", heads), f"layer {i} heads")
        dq = _pos_int(spec.get("qkv_size", qkv), f"layer {i} qkv_size")
        if dq % h:
            raise ConfigError(f"layer {i}: qkv_size {dq} is not divisible by {h} heads",
                              hint=f"pick qkv_size a multiple of heads, e.g. {max(h, dq - dq % h)}")
        if kind == "attention":
            formula = spec.get("formula", STANDARD_FORMULA)
            if not isinstance(formula, str):
                raise ConfigError(f"layer {i}: formula must be a string")
            _check_formula(formula, i)
            out.append({"type": "attention", "formula": formula, "heads": h, "qkv_size": dq})
        else:
            k = spec.get("kernel_size")
            if not isinstance(k, int) or isinstance(k, bool) or k not in KERNEL_SIZES:
                raise ConfigError(f"layer {i}: unknown conv kernel size {k!r}",
                                  hint=f"kernel_size must be one of {', '.join(map(str, KERNEL_SIZES))}")
            out.append({"type": "conv", "kernel_size": k, "heads": h, "qkv_size": dq})
    return out


def _check_formula(formula: str, i: int) -> None:
    from attnc.compiler.api import analyze

    try:
        analyze(formula, checks=LAYER_CHECKS)
    except AttncError as e:
        raise ConfigError(f"layer {i}: bad attention formula {formula!r}\n{e}",
                          hint="fix the formula (try `attnc check 'FORMULA'`)") from None


def _pos_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {x!r}")
    return x


# --- presets and the CONFIG_OR_ARCH resolver -----------------------------------------------------------

PRESETS: dict[str, dict] = {
    # BERT-base / small shapes (all standard attention)
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                      num_attention_heads=12),
    "bert-small": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=2048,
                       num_attention_heads=8),
    "bert-tiny": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=512,
                      num_attention_heads=2),
    # AutoTinyBERT example shape from the paper
    "autotinybert-5l": dict(num_hidden_layers=5, hidden_size=564, intermediate_size=1054,
                            num_attention_heads=8, qkv_size=512),
    # a tiny hybrid: two AutoBERT-Zero formulas, standard attention and a light conv
    "tiny-hybrid": dict(num_hidden_layers=4, hidden_size=128, intermediate_size=512,
                        num_attention_heads=4, qkv_size=128, max_position_embeddings=128,
                        layers=[{"type": "attention", "formula": AUTOBERT_ZERO_FORMULAS[0]},
                                {"type": "conv", "kernel_size": 7},
                                {"type": "attention", "formula": STANDARD_FORMULA},
                                {"type": "attention", "formula": AUTOBERT_ZERO_FORMULAS[1]}]),
}


def resolve_config(spec: str | dict | AttncBertConfig, *, layers: list[str] | None = None,
                   formula: str | None = None, **overrides) -> AttncBertConfig:
    """CONFIG_OR_ARCH -> AttncBertConfig. `spec` is a preset name, an arch string, a JSON config
    file (or a folder with config.json), a dict or a config. `layers` (short specs, see
    parse_layer) or `formula` (every attention layer) replace the per-layer specs."""
    if isinstance(spec, AttncBertConfig):
        d = spec.to_dict()
    elif isinstance(spec, dict):
        d = dict(spec)
    elif isinstance(spec, str) and spec in PRESETS:
        d = dict(PRESETS[spec])
    elif isinstance(spec, str) and ARCH_RE.match(spec):
        L, dm, df, h, dq = parse_arch(spec)
        d = dict(num_hidden_layers=L, hidden_size=dm, intermediate_size=df, num_attention_heads=h,
                 qkv_size=dq)
    elif isinstance(spec, str) and (Path(spec).is_file() or (Path(spec) / "config.json").is_file()):
        path = Path(spec) / "config.json" if Path(spec).is_dir() else Path(spec)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}", hint="give a JSON object") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config {path} is not a JSON object")
        if "arch" in d:   # {"arch": "L-dm-df-h-dqkv", "layers": [...], ...}
            L, dm, df, h, dq = parse_arch(d.pop("arch"))
            d = dict(num_hidden_layers=L, hidden_size=dm, intermediate_size=df,
                     num_attention_heads=h, qkv_size=dq, **d)
    else:
        if isinstance(spec, str) and any(p.strip().isdigit() for p in spec.split("-")):
            parse_arch(spec)   # looks like an arch string: raises the arch-string error
        raise ConfigError(f"unknown model {spec!r}",
                          hint=f"give an arch string L-dm-df-h-dqkv, a JSON config file or a preset "
                               f"({', '.join(PRESETS)})")
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    d.pop("architectures", None)
    d.update(overrides)
    if formula is not None:
        d["layers"] = [{"type": "attention", "formula": formula}] * d.get("num_hidden_layers", 12)
    if layers:
        L = d.get("num_hidden_layers", 12)
        specs = [parse_layer(x) for x in layers]
        if len(specs) == 1:
            specs = specs * L
        elif len(specs) != L:
            raise ConfigError(f"{len(specs)} --layer specs for {L} layers",
                              hint="give one --layer per layer, or a single one for all layers")
        d["layers"] = specs
    elif "layers" in d and d["layers"] and "num_hidden_layers" not in overrides:
        d.setdefault("num_hidden_layers", len(d["layers"]))
    if d.get("layers"):
        # a preset's or file's specs inherit the (possibly overridden) global widths
        d["layers"] = [{k: v for k, v in s.items() if k not in ("heads", "qkv_size")}
                       if isinstance(s, dict) and ("num_attention_heads" in overrides
                                                   or "qkv_size" in overrides) else s
                       for s in d["layers"]]
    return AttncBertConfig(**d)
