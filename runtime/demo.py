"""The main-job demo: compile the paper's formulas, pretrain a tiny attention/conv hybrid on
wiki-sample, fine-tune it on rt-polarity — a few minutes on 2 CPU cores, fully offline.

    from attnc.runtime.demo import run_demo
    result = run_demo("runs/demo", steps=300)
    result["finetune"]["dev"]["validation"]["accuracy"]   # beats result["finetune"]["majority_baseline"]
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .config import AUTOBERT_ZERO_FORMULAS, STANDARD_FORMULA, resolve_config

DEMO_MODEL = "tiny-hybrid"


def run_demo(out_dir: str | os.PathLike, steps: int = 300, *, progress: bool = True, seed: int = 0,
             vocab_size: int = 8000, seq_len: int = 64, finetune_examples: int = 4000,
             finetune_epochs: float = 4.0, finetune_length: int = 48) -> dict:
    """Pretrain `tiny-hybrid` (MLM, a WordPiece vocab trained on the corpus) and fine-tune it on a
    subset of rt-polarity; returns {"formulas", "pretrain", "finetune", "seconds"}."""
    import attnc

    t0 = time.time()
    out = Path(out_dir)
    formulas = {}
    for f in (STANDARD_FORMULA,) + AUTOBERT_ZERO_FORMULAS:
        fn = attnc.compile(f, backend="torch")
        formulas[f] = {"hash": fn.hash, "inputs": list(fn.inputs), "canonical": fn.canonical}
    from .train import finetune, pretrain

    config = resolve_config(DEMO_MODEL)
    pre = pretrain(config, out / "pretrain", corpus="wiki-sample", steps=steps, batch_size=32,
                   seq_len=seq_len, lr=1e-3, warmup=0.05, seed=seed, train_vocab=vocab_size,
                   progress=progress)
    fin = finetune(out / "pretrain", "rt-polarity", out_dir=out / "finetune-rt-polarity",
                   epochs=finetune_epochs, batch_size=32, lr=5e-4, max_length=finetune_length,
                   max_train=finetune_examples, seed=seed, progress=progress)
    return {"formulas": formulas, "pretrain": pre, "finetune": fin, "seconds": time.time() - t0}
