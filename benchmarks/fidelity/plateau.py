"""Do attention layers learn within the fidelity truth's budget? (issue 19)

    python benchmarks/fidelity/plateau.py --steps 2000,6000 --json benchmarks/results/fidelity_plateau_cpu.json
    python benchmarks/fidelity/plateau.py --steps 2000 --batch-size 64 --models attention,no-mixing \
        --json benchmarks/results/fidelity_plateau_b64_cpu.json       # 4x the tokens per step

Trains, at the settings of `run_cpu.sh`'s truth (hidden 64, FFN 256, 4 heads, 2 layers, the 2,000-word
vocabulary, blocks of 32, batch 16, lr 3e-3, the truth's seed 0), four models for each step count:
Hugging Face's own BertForMaskedLM (the control: no attnc code in its layers), attnc's standard
attention, no token mixing at all (`V | V`) and two kernel-3 convolutions; prints the held-out MLM loss
of each. If the two attention models sit at the no-mixing model's loss, the truth cannot tell attention
formulas apart at this budget, whatever the proxy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MODELS = {
    "hf-bert": None,
    "attention": "softmax(Q @ K^T / sqrt(d)) @ V | softmax(Q @ K^T / sqrt(d)) @ V",
    "no-mixing": "V | V",
    "conv3": "conv(k=3) | conv(k=3)",
}
SEED = 10_000    # the truth's seed 0 (proxy_fidelity: 10_000 * (s + 1) + seed)


def train_one(job) -> dict:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from attnc.runtime.demo import demo_tokenizer
    from attnc.runtime.modeling import AttncBertForMaskedLM
    from attnc.runtime.trainer import TrainConfig, train
    from attnc.search import proxy_fidelity as pf
    from attnc.search.proxy import ProxyConfig, _mlm_data, _tokenizer

    name, steps, batch, seq, lr = job
    torch.set_num_threads(1)
    cfg = ProxyConfig(task=None, seq_len=seq, batch_size=batch, eval_blocks=256, device="cpu", seed=0, lr=lr,
                      tokenizer=str(demo_tokenizer(2000)))
    tok = _tokenizer(cfg.tokenizer)
    torch.manual_seed(SEED)
    if MODELS[name] is None:
        model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=256,
                                           max_position_embeddings=max(64, seq)))
    else:
        arch = pf.parse_architecture(MODELS[name], 64, 256, 4)
        model = AttncBertForMaskedLM(arch.to_config(vocab_size=len(tok), max_position_embeddings=max(64, seq)))
    t0 = time.perf_counter()
    res = train(model, _mlm_data(cfg), TrainConfig(steps=steps, batch_size=batch, lr=lr, seed=SEED, device="cpu",
                                                   warmup=0.1))
    return {"model": name, "formula": MODELS[name], "steps": steps, "batch_size": batch, "seq_len": seq, "lr": lr,
            "heldout_mlm_loss": float(res.metrics["final_eval"]["loss"]),
            "loss_se": float(res.metrics["final_eval"]["loss_se"]), "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="2000,6000")
    ap.add_argument("--batch-size", type=int, default=16, help="the truth's: 16")
    ap.add_argument("--seq-len", type=int, default=32, help="the truth's: 32")
    ap.add_argument("--lr", type=float, default=3e-3, help="the truth's: 3e-3")
    ap.add_argument("--models", default=",".join(MODELS), help=f"a subset of {', '.join(MODELS)}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}: use {', '.join(MODELS)}")
    jobs = [(m, int(s), args.batch_size, args.seq_len, args.lr) for s in args.steps.split(",") for m in models]
    rows = []
    with ProcessPoolExecutor(args.workers) as ex:
        for r in ex.map(train_one, jobs):
            rows.append(r)
            print(f"{r['steps']:6d} steps  {r['model']:10s} held-out MLM loss {r['heldout_mlm_loss']:.3f} "
                  f"(se {r['loss_se']:.3f}, {r['seconds']:.0f} s)", flush=True)
    if args.json:
        import torch
        import transformers
        Path(args.json).write_text(json.dumps({
            "benchmark": "fidelity_plateau (issue 19)",
            "command": "python " + " ".join(["benchmarks/fidelity/plateau.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
