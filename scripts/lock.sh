#!/usr/bin/env bash
# `make lock`: compile requirements/lock-cpu.txt, the exact versions scripts/setup.sh and CI install,
# from pyproject.toml (attnc's ranges, every extra) and requirements/cpu.in (the CPU torch build).
# Uses uv (`uv pip compile`): installed into the active environment from the `lock` extra if missing.
# The lock is universal (environment markers for every Python attnc supports); the CI machine and
# the tests run CPython 3.11 on Linux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -m uv --version >/dev/null 2>&1; then
    echo "lock: installing uv" >&2
    "$PY" -m pip install --disable-pip-version-check -q "uv>=0.9"
fi
# torch's CPU builds (`+cpu`) are not on PyPI: take them from this machine's wheel folder where it
# has one, else from PyTorch's CPU index.
if ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
    torch_src=(--find-links /opt/wheels)
else
    torch_src=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$PY" -m uv pip compile pyproject.toml requirements/cpu.in --all-extras --universal \
    "${torch_src[@]}" --no-emit-find-links --no-emit-index-url --custom-compile-command "make lock" \
    --quiet -o requirements/lock-cpu.txt "$@"
echo "lock: wrote requirements/lock-cpu.txt ($(grep -c '^[a-z0-9]' requirements/lock-cpu.txt) pins)" >&2
