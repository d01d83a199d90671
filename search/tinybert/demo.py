"""A tiny AutoTinyBERT search end to end (`attnc demo --tinybert`), a few minutes on a laptop CPU.

    from attnc.search.tinybert.demo import run_tinybert_demo, format_summary
    summary = run_tinybert_demo("runs/tinybert-demo")
    print(format_summary(summary))

Steps, all offline: (1) a tiny SuperPLM (4-128-256-4-128, head dim 32) trained for a few dozen
batch-wise steps (Algorithm 1, N=4 sub-models per batch) on `wiki-sample`; (2) measured CPU latencies
of 100 sub-models (one thread, batch 1, sequence 128, the paper's target; timed together, back-to-back
blocks taking turns) and an MLP latency predictor fitted on them, with its safety margin; (3) the
evolutionary search (Algorithm 2) under the latency limit, scoring sub-models by their held-out MLM loss
read from the SuperPLM; (4) the 3 best timed side by side with BERT-base, and the best one that meets
the target on measurement extracted as a Hugging Face folder (a vanilla BERT when it is expressible as
one) with the search plot.

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
    # 15-20% with the machine's load. All archs timed together (interleave = samples; up to 16 MB
    # each), back-to-back blocks taking turns, share every slow spell; a small MLP (3x400 fits no
    # better on 100 points, and takes 15x longer) reaches a few percent.
    records = collect(space, latency_samples, lat_dir, seq=128, repeats=latency_repeats,
                      interleave=latency_samples, progress=progress, seed=seed)
    settings = {"device": "cpu", "threads": 1, "batch": 1, "seq": 128, "warmup": 3, "repeats": latency_repeats,
                "timing": "back-to-back"}
    predictor, pm = LatencyPredictor.fit(space, records, seed=seed, seq=128, hidden=(64, 64), settings=settings)
    predictor.save(lat_dir)
    base = bert_base_latency_ms("cpu", 1, 1, 128, folder=lat_dir)
    timings["latency_s"] = time.perf_counter() - t0
    if speedup is None:
        target = statistics.median(r["ms"] for r in records)
    else:
        target = base / speedup

    # 3. the evolutionary search under the latency limit (with the predictor's safety margin),
    # scored on held-out blocks the SuperPLM did not train on
    t0 = time.perf_counter()
    data.split(seed)   # the split train_superplm used (its seed): eval_idx is held out
    fitness = SuperPLMFitness(supernet, data.tensor[data.eval_idx], tok)
    cfg = EvolutionConfig(target_ms=target, generations=generations, population=population, seed=seed,
                          margin=predictor.safety_margin or 0.0)
    result = search(space, fitness, predictor.predict, cfg, study=out / "search" / "study.db", progress=progress)
    plot = report.save_plot(result, out / "search.png")
    timings["search_s"] = time.perf_counter() - t0

    # 4. the promise checked: the 3 best timed side by side with BERT-base; the best that meets the
    # target (measured speedup >= BERT-base / target) is exported, misses are reported as missing
    from .export import save_model
    from .latency import verify_archs
    top = result.top(3)
    v = verify_archs(space, [r.arch for r in top], target_ms=target, speedup=base / target,
                     settings={**settings, "repeats": 10}, predicted=[r.latency_ms for r in top])
    best = next((r for r in top if r.arch in v["found"]), None)
    best_dir, export = out / "best", None
    if best is not None:
        export = save_model(supernet.extract(best.arch), best_dir, tokenizer=tok)
    timings["total_s"] = time.perf_counter() - t_all

    first_gen = result.generations[0]
    summary = {
        "out": str(out), "space": str(space.max_arch), "train_steps": tm["steps"],
        "train_loss_first10": sum(tm["losses"][:10]) / len(tm["losses"][:10]),
        "train_loss_last10": sum(tm["losses"][-10:]) / len(tm["losses"][-10:]),
        "latency_samples": len(records), "predictor_mape_pct": pm.get("mape_pct"),
        "predictor_heldout": pm.get("n_heldout"), "mean_predictor_mape_pct": pm["mean_predictor"]["mape_pct"],
        "predictor_safety_margin": predictor.safety_margin,
        "bert_base_ms": base, "target_ms": target, "speedup": base / target,
        "admitted_ms": list(cfg.bounds), "evaluated": len(result.scored), "search_best": str(result.best),
        "verification": v, "found": v["found"], "missing": v["missing"],
        "best": best.arch if best else None, "best_score": best.score if best else None,
        "best_predicted_ms": best.latency_ms if best else None,
        "generation0_best": first_gen["best"], "generations": result.generations,
        "top": [r.to_json() for r in result.top(5)],
        "model": str(best_dir) if best else None, "export": export, "plot": str(plot), "study": result.study,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict) -> str:
    """Readable lines of run_tinybert_demo's summary (for the CLI to print)."""
    margin = s["predictor_safety_margin"]
    lines = [
        f"SuperPLM {s['space']}: {s['train_steps']} batch-wise steps on wiki-sample, "
        f"MLM loss {s['train_loss_first10']:.3f} -> {s['train_loss_last10']:.3f}",
        f"latency: {s['latency_samples']} sub-models measured (CPU, 1 thread, batch 1, seq 128), predictor "
        f"held-out MAPE {s['predictor_mape_pct']:.1f}% on {s['predictor_heldout']} archs (mean predictor: "
        f"{s['mean_predictor_mape_pct']:.1f}%)" if s["predictor_mape_pct"] is not None else
        f"latency: {s['latency_samples']} sub-models measured",
        f"target {s['target_ms']:.2f} ms = BERT-base {s['bert_base_ms']:.1f} ms / {s['speedup']:.1f}; limit: predicted "
        f"latency <= {s['admitted_ms'][1]:.2f} ms (safety margin {100 * (margin or 0):.1f}%)",
        f"evolution: {s['evaluated']} sub-models scored (held-out MLM loss from the SuperPLM)",
    ]
    for g in s["generations"]:
        if g["best"] is not None:
            lines.append(f"  generation {g['generation']}: best {g['best']:.4f}, median {g['median']:.4f}")
    v = s["verification"]
    lines.append(f"the 3 best timed side by side with BERT-base ({v['bert_base_ms']:.1f} ms):")
    for r in v["archs"]:
        lines.append(f"  {r['arch']:<18} predicted {r['predicted_ms']:.2f} ms, measured {r['measured_ms']:.2f} ms "
                     f"({r['measured_speedup']:.1f}x BERT-base): " + ("meets the target" if r["meets"] else
                                                                     "MISSES the target"))
    if s["best"] is None:
        lines.append("no architecture met the target on measurement: nothing exported (rerun on a quieter "
                     "machine, or a search with a larger --margin)")
    else:
        e = s["export"]
        lines.append(f"best found {s['best']}: score {s['best_score']:.4f}; saved: {s['model']} ({e['how']}), "
                     f"plot {s['plot']}, study {s['study']}  [{s['timings']['total_s']:.0f} s]")
    return "\n".join(lines)
