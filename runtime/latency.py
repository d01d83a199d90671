"""Inference latency: the measurement AutoTinyBERT's latency predictor is built on.

A randomly initialised encoder (weights do not change the time) in eval mode under
torch.inference_mode, fixed thread count, `warmup` untimed runs, then the median of `runs`
timed forward passes on a (batch, seq) input with no padding.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from .config import AttncBertConfig


@contextmanager
def num_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def forward_ms(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """One forward pass of `model` on (ids, mask), in milliseconds (synchronised on CUDA)."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def time_forward(model: torch.nn.Module, seq: int = 128, batch: int = 1, *, warmup: int = 5,
                 runs: int = 20, threads: int | None = 1, device: str = "cpu") -> dict:
    """Median / mean / min forward latency (milliseconds) of `model` on random token ids."""
    model = model.eval().to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            forward_ms(model, ids, mask)
        times = [forward_ms(model, ids, mask) for _ in range(runs)]
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "runs": runs, "warmup": warmup, "seq": seq, "batch": batch,
            "threads": threads, "device": device}


def measure_latency(config: AttncBertConfig, seq: int = 128, batch: int = 1, *, warmup: int = 5,
                    runs: int = 20, threads: int | None = 1, device: str = "cpu", seed: int = 0) -> dict:
    """Latency of an AttncBertModel (no pooler) built from `config`."""
    from .modeling import AttncBertModel

    if seq > config.max_position_embeddings:
        from attnc.compiler.errors import ConfigError
        raise ConfigError(f"--seq {seq} exceeds max_position_embeddings={config.max_position_embeddings}",
                          hint="use a shorter sequence or a config with more positions")
    torch.manual_seed(seed)
    model = AttncBertModel(config, add_pooling_layer=False)
    out = time_forward(model, seq, batch, warmup=warmup, runs=runs, threads=threads, device=device)
    out["arch"] = config.arch
    return out


def compare_with_bert(config: AttncBertConfig, seq: int = 128, batch: int = 1, *, warmup: int = 5,
                      runs: int = 20, threads: int | None = 1, rounds: int = 3) -> dict:
    """Runtime vs transformers.BertModel of the same (standard-attention) architecture, in one run,
    interleaving the two `rounds` times; the ratio is of the best per-model medians."""
    from transformers import BertConfig, BertModel

    from .modeling import from_bert

    if any(s["type"] != "attention" or s["qkv_size"] != config.hidden_size for s in config.layers):
        raise ValueError("compare_with_bert needs a standard BERT shape (qkv_size == hidden_size)")
    bc = BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                    num_hidden_layers=config.num_hidden_layers,
                    num_attention_heads=config.num_attention_heads,
                    intermediate_size=config.intermediate_size,
                    max_position_embeddings=config.max_position_embeddings)
    torch.manual_seed(0)
    bert = BertModel(bc, add_pooling_layer=False).eval()
    ours = from_bert(bert).eval()
    res = {"bert": [], "attnc": []}
    for _ in range(rounds):
        res["bert"].append(time_forward(bert, seq, batch, warmup=warmup, runs=runs, threads=threads)["median_ms"])
        res["attnc"].append(time_forward(ours, seq, batch, warmup=warmup, runs=runs, threads=threads)["median_ms"])
    b, a = min(res["bert"]), min(res["attnc"])
    return {"arch": config.arch, "seq": seq, "batch": batch, "threads": threads,
            "bert_ms": b, "attnc_ms": a, "ratio": a / b, "bert_attn_impl": bert.config._attn_implementation,
            "rounds": res}
