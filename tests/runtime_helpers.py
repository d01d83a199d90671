"""Shared setup of the runtime tests: offline hub, a reusable data cache, tiny configs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ATTNC_DATA_CACHE", str(Path(tempfile.gettempdir()) / "attnc-test-data"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["ATTNC_DATA_CACHE"]) / "datasets"))

P_FORMULA = "softmax(Q @ K^T / sqrt(d)) @ (V + P)"


def tiny_bert_config(**kw):
    from transformers import BertConfig

    args = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=64)
    args.update(kw)
    return BertConfig(**args)


def tiny_hybrid(vocab_size: int = 120, **kw):
    from attnc.runtime import AUTOBERT_ZERO_FORMULAS, AttncBertConfig

    layers = [{"type": "attention", "formula": AUTOBERT_ZERO_FORMULAS[0]},
              {"type": "conv", "kernel_size": 5},
              {"type": "attention"},
              {"type": "attention", "formula": P_FORMULA, "heads": 2, "qkv_size": 16}]
    args = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=48, qkv_size=24, max_position_embeddings=64, layers=layers)
    args.update(kw)
    return AttncBertConfig(**args)
