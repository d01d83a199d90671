"""Training throughput (tokens/s) of attnc vs transformers.BertForMaskedLM, side by side in one run.

Same architecture, same initial weights, same data (cached wiki-sample blocks, same dynamic masks),
same loop (attnc.runtime.trainer.train: AdamW, warm-up schedule, clipping, dropout), same device and
precision. Each side runs `--rounds` times, interleaved; the best round counts (robust to a busy
machine). Warm-up steps (allocator, autotuning, first-call compilation) are not timed.
Target: attnc / BertForMaskedLM >= 1.0 for the standard formula.

    python benchmarks/bench_training.py                                    # CPU, 4-256-1024-4-256
    python benchmarks/bench_training.py --device cuda --precision bf16 --arch 12-768-3072-12-768 \\
        --batch 32 --seq 128 --steps 30 --formula "softsign(cos(Q, K)) @ V"
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


class _Clock:
    """on_step callback: the wall time after `skip` warm-up steps and at the last step."""

    def __init__(self, skip: int, device: torch.device):
        self.skip, self.device = skip, device
        self.t_start = self.t_end = None
        self.steps = 0

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_step(self, step, loss, state):
        if step == self.skip:
            self.t_start = self._now()
        elif step > self.skip:
            self.t_end, self.steps = self._now(), step - self.skip


def _models(arch: str, formula: str | None, vocab: int, pad_id: int, seed: int):
    from attnc.runtime import AttncBertForMaskedLM, resolve_config
    from transformers import BertConfig, BertForMaskedLM

    cfg = resolve_config(arch, vocab_size=vocab, pad_token_id=pad_id)
    torch.manual_seed(seed)
    hf_cfg = BertConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=pad_id,
                        attn_implementation="sdpa")
    hf = BertForMaskedLM(hf_cfg)
    sides = {"transformers": hf}
    std = AttncBertForMaskedLM(cfg)
    missing = set(std.state_dict()) - set(hf.state_dict())
    assert not missing, f"weights the HF model lacks: {sorted(missing)[:5]}"
    std.load_state_dict({k: v for k, v in hf.state_dict().items() if k in std.state_dict()})
    sides["attnc"] = std
    if formula:
        fcfg = resolve_config(arch, formula=formula, vocab_size=vocab, pad_token_id=pad_id)
        torch.manual_seed(seed)
        sides["attnc:" + formula] = AttncBertForMaskedLM(fcfg)
    return sides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="4-256-1024-4-256", help="L-dm-df-h-dqkv (dqkv = dm)")
    ap.add_argument("--formula", help="also time this formula in every layer (attnc only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per round")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--corpus", default="wiki-sample")
    ap.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the shipped uncased vocab); "
                    "with ATTNC_DATA_CACHE pointing at a carried cache, no data package is needed")
    ap.add_argument("--json", metavar="FILE", help="default: benchmarks/results/training_<device>.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from attnc.runtime import data as D
    from attnc.runtime.trainer import MLMData, TrainConfig, resolve_device, train

    device = resolve_device(args.device)
    tok = D.load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    blocks = D.cached_blocks(args.corpus, tok, args.seq)
    data_s = time.perf_counter() - t0
    data = MLMData(blocks, tok)
    sides = _models(args.arch, args.formula, len(tok), tok.pad_token_id, seed=0)
    total = args.warmup_steps + args.steps
    cfg = TrainConfig(steps=total, batch_size=args.batch, lr=1e-4, device=str(device),
                      precision=args.precision, seed=0)
    best: dict[str, float] = {}
    losses: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, model in sides.items():
            clock = _Clock(args.warmup_steps, device)
            # a fresh copy each round: every round trains the same initial weights
            m = type(model)(model.config)
            m.load_state_dict(model.state_dict())
            r = train(m, data, cfg, callbacks=[clock])
            tps = clock.steps * args.batch * args.seq / (clock.t_end - clock.t_start)
            best[name] = max(best.get(name, 0.0), tps)
            losses[name] = r.metrics["losses"][:3]
            del m, r
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = best["transformers"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"training throughput, {args.arch}, batch {args.batch} x seq {args.seq}, {args.precision} on "
          f"{dev_name} ({device}), torch {torch.__version__}, transformers {transformers.__version__}; "
          f"best of {args.rounds} rounds x {args.steps} steps")
    rows = []
    for name, tps in best.items():
        ratio = tps / ref
        rows.append({"model": name, "tokens_per_s": tps, "ratio_vs_transformers": ratio,
                     "first_losses": losses[name]})
        print(f"  {name:<40} {tps:>12,.0f} tokens/s   ratio {ratio:.3f}")
    print(f"  (cached blocks loaded in {data_s:.3f}s)")
    command = shlex.join(["python", "benchmarks/bench_training.py", *(sys.argv[1:] if argv is None else argv)])
    out = {"benchmark": "training_tokens_per_s", "command": command,
           "arch": args.arch, "batch": args.batch, "seq": args.seq, "steps": args.steps,
           "warmup_steps": args.warmup_steps, "rounds": args.rounds, "precision": args.precision,
           "device": str(device), "device_name": dev_name, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "results": rows}
    path = Path(args.json or Path(__file__).parent / "results" / f"training_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
