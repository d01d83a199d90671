#!/bin/sh
# The committed fidelity runs (benchmarks/results/fidelity_cpu*.json, fidelity_cpu*.png), sized for a 2-core
# CPU: 32 two-layer architectures at hidden 64, the truth at the scale (2,000 steps x 2 seeds, in 2
# processes: ~17 minutes), then three proxy budgets over that same truth (it is trained once): BIWS warmed up
# by 3 and by 9 children per architecture (96 / 288 x 16 steps), and by 1 per architecture with 48-step
# children (32 x 48 steps, scoring 48 steps), each with the from-scratch proxy at its cost.
# Run from the repository root: sh benchmarks/fidelity/run_cpu.sh
set -e
for sw in 16x96 16x288 48x32; do
    steps=${sw%x*}; warm=${sw#*x}; name=w$warm; [ "$steps" = 16 ] || name=s${steps}w$warm
    OMP_NUM_THREADS=1 attnc search fidelity --archs benchmarks/fidelity/archs32.txt --out runs/fidelity-cpu32 \
        --hidden 64 --ffn 256 --heads 4 --truth-steps 2000 --truth-seeds 2 --shared-steps $steps \
        --warmup-children $warm --vocab 2000 --seq-len 32 --batch-size 16 --eval-blocks 256 --lr 3e-3 \
        --device cpu --bootstrap 2000 --workers 2 --json --plot benchmarks/results/fidelity_cpu_$name.png \
        > benchmarks/results/fidelity_cpu_$name.json
done
