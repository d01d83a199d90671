"""A tiny AutoTinyBERT search end to end (`attnc demo --tinybert`), a few minutes on a laptop CPU.

    from attnc.search.tinybert.demo import run_tinybert_demo, format_summary
    summary = run_tinybert_demo("runs/tinybert-demo")
    print(format_summary(summary))

Steps, all offline: (1) a tiny SuperPLM (4-128-256-4-128, head dim 32) trained for a few dozen
batch-wise steps (Algorithm 1, N=4 sub-models per batch) on `wiki-sample`; (2) measured CPU latencies
of 100 random sub-models (one thread, batch 1, sequence 128, the paper's target; timed together,
round-robin) and an MLP latency predictor fitted on them; (3) the evolutionary search (Algorithm 2) under a latency window
around the target, scoring sub-models by their held-out MLM loss read from the SuperPLM; (4) the best
architecture extracted as a Hugging Face folder (config + weights + tokenizer) and the search plot.

The target: `speedup` X gives BERT-base's measured latency / X; by default (None) the demo takes the
median latency of its measured sub-models (tiny models are 50-200x faster than BERT-base depending on
the machine, so a fixed X could miss the space) and reports the speedup over BERT-base it means.
Library code: returns a dict; progress bars only with progress=True.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def run_tinybert_demo(out: str | Path = "runs/tinybert-demo", progress: bool = True, *, steps: int = 40,
                      latency_samples: int = 100, latency_repeats: int = 30, generations: int = 3,
                      population: int = 10, speedup: float | None = None, seed: int = 0) -> dict:
    import torch

    from attnc.compiler.errors import ConfigError
    from attnc.runtime.data import cached_blocks, load_tokenizer
    from attnc.runtime.trainer import MLMData

    from . import report
    from .evolve import EvolutionConfig, SuperPLMFitness, search
    from .latency import LatencyPredictor, bert_base_latency_ms, collect
    from .space import Space
    from .supernet import SuperPLM
    from .train import SuperTrainConfig, save_superplm, train_superplm

    out = Path(out)
    if (out / "search" / "study.db").exists():
        raise ConfigError(f"{out} holds an earlier demo run", hint="delete it or pass another folder")
    t_all = time.perf_counter()
    timings = {}
    tok = load_tokenizer()
    seq_len = 64
    space = Space(max_layers=4, max_hidden=128, max_ffn=256, max_heads=4, head_dim=32, vocab_size=len(tok),
                  max_position_embeddings=128)

    # 1. the SuperPLM: batch-wise training on wiki-sample
    t0 = time.perf_counter()
    data = MLMData(cached_blocks("wiki-sample", tok, seq_len, progress=progress), tok, eval_blocks=32)
    torch.manual_seed(seed)
    supernet = SuperPLM(space)
    tm = train_superplm(supernet, data, SuperTrainConfig(steps=steps, batch_size=16, sub_batches=4, lr=1e-3,
                                                         seed=seed, device="cpu"), progress=progress)
    save_superplm(supernet, out, metrics=tm)
    timings["train_s"] = time.perf_counter() - t0

    # 2. latency: measured sub-models on the paper's target, an MLP predictor, BERT-base as reference
    t0 = time.perf_counter()
    lat_dir = out / "latency"
    # Sub-millisecond models on a busy machine: timed one after the other, their latencies move by
    # 15-20% with the machine's load (the predictor then learns noise: 40 archs gave 44% held-out
    # MAPE). All archs timed together, round-robin (interleave = samples; up to 16 MB each), share every
    # slow spell, and a small MLP (3x400 fits no better on 100 points, and takes 15x longer) reaches a
    # few percent.
    records = collect(space, latency_samples, lat_dir, seq=128, repeats=latency_repeats,
                      interleave=latency_samples, progress=progress, seed=seed)
    predictor, pm = LatencyPredictor.fit(space, records, seed=seed, seq=128, hidden=(64, 64),
                                         settings={"device": "cpu", "threads": 1, "batch": 1, "seq": 128})
    predictor.save(lat_dir)
    base = bert_base_latency_ms("cpu", 1, 1, 128, folder=lat_dir)
    timings["latency_s"] = time.perf_counter() - t0
    if speedup is None:
        target = statistics.median(r["ms"] for r in records)
    else:
        target = base / speedup

    # 3. the evolutionary search, scored on held-out blocks the SuperPLM did not train on
    t0 = time.perf_counter()
    data.split(seed)   # the split train_superplm used (its seed): eval_idx is held out
    fitness = SuperPLMFitness(supernet, data.tensor[data.eval_idx], tok)
    cfg = EvolutionConfig(target_ms=target, generations=generations, population=population, seed=seed)
    result = search(space, fitness, predictor.predict, cfg, study=out / "search" / "study.db", progress=progress)
    plot = report.save_plot(result, out / "search.png")
    timings["search_s"] = time.perf_counter() - t0

    # 4. the best sub-model as a Hugging Face folder
    best_dir = out / "best"
    model = supernet.extract(result.best)
    model.save_pretrained(best_dir)
    tok.save_pretrained(best_dir)
    # the predictor's guess, checked: the best timed round-robin beside the first 15 archs of the
    # dataset, and scaled by how much slower or faster those run now than when they were collected
    from .latency import measure_archs
    refs = records[:15]
    now = measure_archs(space, [result.best, *(r["arch"] for r in refs)], seq=128, repeats=latency_repeats)
    drift = statistics.median(n["ms"] / r["ms"] for n, r in zip(now[1:], refs))
    measured = now[0]["ms"] / drift
    timings["total_s"] = time.perf_counter() - t_all

    first_gen = result.generations[0]
    summary = {
        "out": str(out), "space": str(space.max_arch), "train_steps": tm["steps"],
        "train_loss_first10": sum(tm["losses"][:10]) / len(tm["losses"][:10]),
        "train_loss_last10": sum(tm["losses"][-10:]) / len(tm["losses"][-10:]),
        "latency_samples": len(records), "predictor_mape_pct": pm.get("mape_pct"),
        "predictor_heldout": pm.get("n_heldout"), "mean_predictor_mape_pct": pm["mean_predictor"]["mape_pct"],
        "bert_base_ms": base, "target_ms": target, "speedup": base / target,
        "window_ms": list(cfg.bounds), "evaluated": len(result.scored),
        "best": str(result.best), "best_score": result.score, "best_predicted_ms": result.latency_ms,
        "best_measured_ms": measured, "best_measured_raw_ms": now[0]["ms"], "machine_drift": drift,
        "best_speedup_measured": base / measured,
        "generation0_best": first_gen["best"], "generations": result.generations,
        "top": [r.to_json() for r in result.top(5)],
        "model": str(best_dir), "plot": str(plot), "study": result.study,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict) -> str:
    """Readable lines of run_tinybert_demo's summary (for the CLI to print)."""
    lines = [
        f"SuperPLM {s['space']}: {s['train_steps']} batch-wise steps on wiki-sample, "
        f"MLM loss {s['train_loss_first10']:.3f} -> {s['train_loss_last10']:.3f}",
        f"latency: {s['latency_samples']} sub-models measured (CPU, 1 thread, batch 1, seq 128), predictor "
        f"held-out MAPE {s['predictor_mape_pct']:.1f}% on {s['predictor_heldout']} archs (mean predictor: "
        f"{s['mean_predictor_mape_pct']:.1f}%)" if s["predictor_mape_pct"] is not None else
        f"latency: {s['latency_samples']} sub-models measured",
        f"target {s['target_ms']:.2f} ms = BERT-base {s['bert_base_ms']:.1f} ms / {s['speedup']:.1f}; "
        f"window {s['window_ms'][0]:.2f}-{s['window_ms'][1]:.2f} ms",
        f"evolution: {s['evaluated']} sub-models scored (held-out MLM loss from the SuperPLM)",
    ]
    for g in s["generations"]:
        if g["best"] is not None:
            lines.append(f"  generation {g['generation']}: best {g['best']:.4f}, median {g['median']:.4f}")
    lines.append(f"best {s['best']}: score {s['best_score']:.4f}, predicted {s['best_predicted_ms']:.2f} ms, "
                 f"measured {s['best_measured_ms']:.2f} ms ({s['best_measured_raw_ms']:.2f} ms timed now / machine "
                 f"drift {s['machine_drift']:.2f}; {s['best_speedup_measured']:.1f}x faster than BERT-base)")
    lines.append(f"saved: {s['model']} (AutoModelForMaskedLM after `import attnc`), plot {s['plot']}, "
                 f"study {s['study']}  [{s['timings']['total_s']:.0f} s]")
    return "\n".join(lines)
