"""The main-job demos, fully offline on a few CPU cores.

`run_search_demo` (what `attnc demo` runs after compiling the paper's formulas): a small OP-NAS
search over 4-layer attention/conv hybrids with the BIWS proxy evaluator (weight-shared MLM
pretraining on wiki-sample; score = minus the held-out MLM loss, since at demo sizes a fine-tuned
rt-polarity accuracy stays at the majority class for every candidate), then the best architecture
exported with its supernet weights (and the demo's tokenizer) as a Hugging Face folder.

    from attnc.runtime.demo import run_search_demo
    result = run_search_demo("runs/demo", budget=12)
    result["search"]["best_layers"]    # the best architecture, one line per layer

`run_demo`: pretrain the fixed `tiny-hybrid` on wiki-sample and fine-tune it on rt-polarity.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .config import AUTOBERT_ZERO_FORMULAS, STANDARD_FORMULA, resolve_config

DEMO_MODEL = "tiny-hybrid"


def run_search_demo(out_dir: str | os.PathLike, budget: int = 24, *, progress: bool = True, seed: int = 0,
                    num_layers: int = 4, hidden_size: int = 64, shared_steps: int = 20,
                    finetune_steps: int = 60, vocab_size: int = 4000, warmup_children: int = 8,
                    rescore_seeds: int = 3) -> dict:
    """A small OP-NAS search (study in OUT/search/study.db, resumable) and the best model exported to
    OUT/best (loads with transformers.AutoModel after `import attnc`). Returns {"search": {...},
    "export": path, "seconds"}. The supernet is warmed up by `warmup_children` random children
    first; the best is the search's top re-scored with `rescore_seeds` seeds from the final supernet
    (search["rescored"]: mean, standard error and the score it had during the search)."""
    from attnc.search import opnas
    from attnc.search.biws import export_model
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator

    from .data import load_tokenizer

    t0 = time.time()
    out = Path(out_dir)
    (out / "search").mkdir(parents=True, exist_ok=True)
    space = opnas.Space(num_layers=num_layers, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                        num_heads=4)
    # score = -held-out MLM loss: at demo sizes (a minute of CPU) a fine-tuned rt-polarity accuracy
    # stays at the majority class for every candidate, while the MLM loss separates them
    cfg = ProxyConfig(task=None, tokenizer=str(demo_tokenizer(vocab_size)),
                      shared_pretrain_steps=shared_steps, finetune_steps=finetune_steps,
                      finetune_lr=1e-3, batch_size=32, seq_len=64, finetune_max_len=48, max_train=2000,
                      max_eval=500, warmup_children=warmup_children,
                      seed=seed)
    evaluator = ProxyEvaluator(cfg)
    # a small population so that half the budget goes to the mutation (OP-NAS) phase; a demo run
    # again with a larger --budget continues its study, with the population it was made with
    study = out / "search" / "study.db"
    population = max(2, budget // 2)
    if study.exists():
        with opnas.read_study(study) as (_, meta):
            population = int(meta.get("population", population))
    result = opnas.search(space, evaluate=evaluator, algorithm="opnas", budget=budget, seed=seed,
                          population=population, top_k=2, children=2, study=study, progress=progress,
                          rescore_seeds=rescore_seeds)
    best = result.best_architecture
    curve, top = [], None   # best so far after each finished evaluation (failures keep the previous best)
    for e in result.evaluations:
        if e.score is not None:
            top = e.score if top is None else max(top, e.score)
        curve.append(top)
    summary = {"evaluated": len(result.evaluations), "best_so_far": curve, "failed": result.failed,
               "duplicates": result.duplicates, "illegal": result.illegal, "best_score": result.best_score,
               "best_layers": [str(layer) for layer in best.layers] if best is not None else [],
               "top": [{"score": e.score, "layers": [str(x) for x in e.architecture.layers]}
                       for e in result.top(3)],
               "rescored": [{"id": r.id, "score": r.score, "se": r.se, "seeds": r.n, "search_score": r.search_score,
                             "layers": [str(x) for x in r.architecture.layers]} for r in result.rescored],
               "warmup_children": result.warmup,
               "score_se": _median([e.metrics.get("score_se") for e in result.evaluations]),
               "proxy": repr(evaluator), "study": str(result.study)}
    export = None
    if best is not None and evaluator.supernet is not None:
        model = export_model(evaluator.supernet, best)
        export = out / "best"
        model.save_pretrained(export)
        load_tokenizer(cfg.tokenizer).save_pretrained(export)   # the folder is complete
    return {"search": summary, "export": None if export is None else str(export), "seconds": time.time() - t0}


def _median(values) -> float | None:
    v = sorted(x for x in values if x is not None)
    return v[len(v) // 2] if v else None


def demo_tokenizer(vocab_size: int) -> Path:
    """A WordPiece vocabulary of `vocab_size` trained on wiki-sample once and cached (a small vocab
    keeps the MLM head, not the searched layers, from dominating the cost of tiny models)."""
    from .data import cache_dir, load_corpus, train_wordpiece

    path = cache_dir() / f"demo-wordpiece-{vocab_size}"
    if not (path / "tokenizer.json").is_file():
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".tmp-wordpiece-")
        train_wordpiece(load_corpus("wiki-sample")["text"], vocab_size).save_pretrained(tmp)
        try:
            os.replace(tmp, path)   # atomic; a concurrent builder may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "tokenizer.json").is_file():   # not a lost race: a real failure
                raise
    return path


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
