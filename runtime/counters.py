"""Parameter and FLOP counters for any AttncBertConfig, computed from the config alone.

Parameters are exact (they equal sum(p.numel()) of the built model; BERT-base: 109,482,240).
FLOPs are forward FLOPs of one sequence of length n: 2 per multiply-add of every matmul
(linear layers, the formula's matmuls / cos / dist, the convolution), plus the compiler's count for
every other formula op (attnc.compiler.report: softmax 5 per entry, elementwise functions their
table cost); GLU, GELU and LayerNorm are counted as elementwise work (1, 8 and 5 per element).
Embedding lookups count 0.
"""
from __future__ import annotations

from .config import LAYER_CHECKS, AttncBertConfig

HEADS = (None, "mlm", "pretraining", "classification")


def count_parameters(config: AttncBertConfig, head: str | None = None, *, pooler: bool | None = None,
                     num_labels: int | None = None) -> int:
    """Exact parameter count. head: None (AttncBertModel, with pooler), "mlm" (no pooler, decoder
    tied), "pretraining" (MLM + NSP) or "classification" (pooler + classifier)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}")
    dm, df, V = config.hidden_size, config.intermediate_size, config.vocab_size
    total = (V + config.max_position_embeddings + config.type_vocab_size) * dm + 2 * dm
    for spec in config.layers:
        dq = spec["qkv_size"]
        if spec["type"] == "attention":
            from attnc.compiler.api import analyze
            total += len(analyze(spec["formula"], checks=LAYER_CHECKS).inputs) * (dm * dq + dq)   # used projections only
        else:
            total += dm * 2 * dq + 2 * dq + spec["heads"] * spec["kernel_size"]
        total += dq * dm + dm + 2 * dm                                      # attention.output
        total += dm * df + df + df * dm + dm + 2 * dm                        # FFN + LayerNorm
    if pooler is None:
        pooler = head != "mlm"
    if pooler:
        total += dm * dm + dm
    if head in ("mlm", "pretraining"):
        total += dm * dm + dm + 2 * dm + V                                   # transform + bias
    if head == "pretraining":
        total += 2 * dm + 2
    if head == "classification":
        k = num_labels if num_labels is not None else config.num_labels
        total += dm * k + k
    return total


def flops_breakdown(config: AttncBertConfig, seq_len: int = 128) -> dict[str, int]:
    """Forward FLOPs of the encoder (no pooler / heads) for one sequence, by part."""
    n, dm, df = seq_len, config.hidden_size, config.intermediate_size
    parts = {"embeddings": 5 * n * dm, "projections": 0, "mixing": 0, "output": 0, "ffn": 0}
    for spec in config.layers:
        dq, h = spec["qkv_size"], spec["heads"]
        if spec["type"] == "attention":
            from attnc.compiler.api import analyze
            a = analyze(spec["formula"], checks=LAYER_CHECKS)
            parts["projections"] += len(a.inputs) * 2 * n * dm * dq
            parts["mixing"] += h * formula_flops(a.simplified, n, dq // h)
        else:
            parts["projections"] += 2 * n * dm * 2 * dq + n * dq               # input proj + GLU
            parts["mixing"] += 2 * n * dq * spec["kernel_size"]
        parts["output"] += 2 * n * dq * dm + 5 * n * dm
        parts["ffn"] += 2 * n * dm * df + 8 * n * df + 2 * n * df * dm + 5 * n * dm
    parts["total"] = sum(parts.values())
    return parts


def count_flops(config: AttncBertConfig, seq_len: int = 128) -> int:
    """Forward FLOPs of the encoder for one sequence of length seq_len."""
    return flops_breakdown(config, seq_len)["total"]


def formula_flops(graph, n: int, d: int) -> int:
    """FLOPs of one head of a formula graph (attnc IR) for sequence length n and head dim d: the
    compiler's count (attnc.compiler.report.flops_expr, the one FLOP counter of the project)."""
    from attnc.compiler.report import flops_at
    return flops_at(graph, n, d)
