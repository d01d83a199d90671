"""AutoTinyBERT in attnc: a one-shot SuperPLM, a latency predictor and evolution under a latency limit.

    from attnc.search import tinybert
    space = tinybert.Space(max_layers=4, max_hidden=256, max_ffn=1024, max_heads=4, mode="mlm", vocab_size=30522)
    supernet = tinybert.SuperPLM(space)
    arch = tinybert.Arch.parse("3-200-300-3-192")
    supernet.set_arch(arch); out = supernet(input_ids=ids, attention_mask=mask)   # .logits
    sub = supernet.extract(arch)
    tinybert.LatencyPredictor.load(DIR).predict(arch)   # milliseconds
    tinybert.save_model(sub, "runs/best")                # a vanilla BERT folder when qkv = hidden

Names load lazily: `attnc --help` must not import torch/transformers through this package.
"""
from __future__ import annotations

from attnc._lazy import lazy_getattr

_LAZY = {   # public name -> submodule defining it
    "Arch": "space", "Space": "space",
    "SuperPLM": "supernet",
    "SuperTrainConfig": "train", "train_superplm": "train", "save_superplm": "train",
    "load_superplm": "train", "heldout_mlm_loss": "train", "heldout_distill_loss": "train",
    "new_fit_layer": "train", "load_recipe": "train", "load_fit_layer": "train",
    "LatencyPredictor": "latency", "collect": "latency", "measure_arch": "latency",
    "bert_base_latency_ms": "latency", "verify_archs": "latency", "measure_beside_bert_base": "latency",
    "EvolutionConfig": "evolve", "SearchResult": "evolve", "search": "evolve", "fast_search": "evolve",
    "SuperPLMFitness": "evolve", "SuperPLMDistillFitness": "evolve", "open_result": "evolve",
    "FinetuneConfig": "fitness", "FinetuneFitness": "fitness", "save_model": "export",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(globals(), _LAZY)
