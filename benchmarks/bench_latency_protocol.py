"""Is the latency dataset's timing what `attnc latency` measures? (issue 20)

    python benchmarks/bench_latency_protocol.py [--rounds 3] [--json benchmarks/results/latency_protocol_cpu.json]

Six architectures of bench_tinybert_latency.py's space, each round: timed together in one group as
`attnc search latency` times its dataset (back-to-back blocks, the reference arch beside them), then
each by `attnc latency --arch A` in a new process, one after the other. Per arch: the median over
rounds of process / group (1.00: the two protocols agree; what is left between a dataset and a user's
`attnc latency` is the machine's speed at the two times). Time it on a quiet machine: the run holds
--cpu-lock exclusive throughout (about a minute a round).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from attnc.search.tinybert.latency import measure_archs, reference_arch
from bench_tinybert_latency import SPACE, attnc_latency    # its space, and `attnc latency` in a new process
ARCHS = ["1-48-420-4-256", "3-160-596-6-384", "2-492-964-1-64", "3-484-832-2-128", "4-216-1444-7-448",
         "6-488-1704-6-384"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per arch (both protocols)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--cpu-lock", default="/tmp/attnc-cpu.lock", help="lock file held exclusive ('' : none)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    from cpu_lock import CpuLock
    lock = CpuLock(args.cpu_lock)
    ref = reference_arch(SPACE)
    group = {a: [] for a in ARCHS}
    process = {a: [] for a in ARCHS}
    t0 = time.perf_counter()
    with lock.quiet():
        for r in range(args.rounds):
            for rec in measure_archs(SPACE, ARCHS, repeats=args.repeats, reference=ref):
                group[rec["arch"]].append(rec["ms"])
            for a in ARCHS:
                process[a].append(attnc_latency(a, args.repeats, 5))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for a in ARCHS:
        ratio = statistics.median(p / g for p, g in zip(process[a], group[a]))
        rows.append({"arch": a, "group_ms": group[a], "process_ms": process[a], "process_over_group": ratio})
        print(f"{a:>18s}  group {' '.join(f'{v:7.3f}' for v in group[a])}  process "
              f"{' '.join(f'{v:7.3f}' for v in process[a])}  process/group {ratio:.3f}")
    ratios = [r["process_over_group"] for r in rows]
    print(f"process / group: median {statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "latency_protocol (issue 20)",
            "command": "python " + " ".join(["benchmarks/bench_latency_protocol.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.perf_counter() - t0, 1),
            "rows": rows, "process_over_group_median": statistics.median(ratios),
            "process_over_group_range": [min(ratios), max(ratios)]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
