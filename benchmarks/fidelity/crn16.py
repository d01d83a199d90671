"""One seed for every architecture (common random numbers) against one seed each, for BIWS scoring.

On the 16 architectures of the run committed at 2b46262 (benchmarks/results/fidelity_cpu16_2b46262.json:
its truth, 2,000 steps x 2 seeds at hidden 64), one supernet is warmed up by random children (16 steps
each) and, at 48, 150, 300 and 600 children, every architecture is scored for 16 steps from that state,
either all with seed 20000 ("crn") or architecture i with seed 20000 + i ("nocrn"); Kendall tau and
Spearman rho against the truth. Results: benchmarks/results/fidelity_crn16_cpu.txt, from

    OMP_NUM_THREADS=1 python benchmarks/fidelity/crn16.py 600 crn
    OMP_NUM_THREADS=1 python benchmarks/fidelity/crn16.py 600 nocrn
"""
import json
import random
import sys
import time

import torch

from attnc.runtime.demo import demo_tokenizer
from attnc.search import proxy_fidelity as pf
from attnc.search import ranking
from attnc.search.proxy import ProxyConfig, ProxyEvaluator

torch.set_num_threads(1)
W, crn = int(sys.argv[1]), sys.argv[2] == "crn"
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 16
d = json.load(open("benchmarks/results/fidelity_cpu16_2b46262.json"))
truth = d["truth"]["mean"]
archs = [pf.parse_architecture(line, 64, 256, 4) for line in d["architectures"]]
base = dict(task=None, seq_len=32, batch_size=16, eval_blocks=256, device="cpu", seed=0, lr=3e-3,
            tokenizer=str(demo_tokenizer(2000)))
ev = ProxyEvaluator(ProxyConfig(weight_sharing=True, shared_pretrain_steps=steps, **base))
runner = ev.runner()
rng = random.Random("w")
t0 = time.time()
done = 0
for cp in sorted({48, 150, 300, 600, W}):
    if cp > W:
        break
    while done < cp:
        a = rng.choice(archs)
        ev.commit(a, runner(a, ev.prepare(a), 30_000 + done))
        done += 1
    tw = time.time() - t0
    scores = [float(runner(a, ev.prepare(a), 20_000 if crn else 20_000 + i).score) for i, a in enumerate(archs)]
    print(f"W={cp} crn={crn} steps={steps} warm {tw:.0f}s tau {ranking.kendall_tau(scores, truth):+.3f} "
          f"rho {ranking.spearman_rho(scores, truth):+.3f} spread {max(scores) - min(scores):.3f} "
          f"mean {sum(scores) / len(scores):.3f}", flush=True)
