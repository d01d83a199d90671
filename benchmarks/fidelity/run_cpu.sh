#!/bin/sh
# The committed fidelity run (benchmarks/results/fidelity_cpu.json, fidelity_cpu.png), sized to finish in
# ~30 minutes on a shared 2-core CPU: the truth is at the scale (2,000 steps x 2 seeds, hidden 64),
# but the architectures are 16, not >= 30, and BIWS's warm-up is small (48 children x 16 steps).
# Run from the repository root: sh benchmarks/fidelity/run_cpu.sh
OMP_NUM_THREADS=1 attnc search fidelity --archs benchmarks/fidelity/archs16.txt --out runs/fidelity-cpu \
    --hidden 64 --ffn 256 --heads 4 --truth-steps 2000 --truth-seeds 2 --shared-steps 16 --warmup-children 48 \
    --vocab 2000 --seq-len 32 --batch-size 16 --eval-blocks 256 --lr 3e-3 --device cpu --bootstrap 2000 \
    --json --plot benchmarks/results/fidelity_cpu.png > benchmarks/results/fidelity_cpu.json
