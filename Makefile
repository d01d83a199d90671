# Quick start: `make demo` (set up + main job) and `make test` (set up + all tests).
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test bench lock fresh-check
# Installs the exact versions of requirements/lock-cpu.txt; ATTNC_DEPS=latest for the newest releases.
setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) -m attnc demo
	$(PYTHON) -m attnc demo --tinybert

# CPU only: Triton kernels run under the interpreter. pytest's exit 5 (no tests) fails too.
test: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PYTHON) benchmarks/compile_latency.py

# Recompile requirements/lock-cpu.txt from pyproject.toml and requirements/cpu.in (uv pip compile).
lock:
	bash scripts/lock.sh

# Before resolving an issue: clone HEAD, new virtualenv, the README's quick start as written.
fresh-check:
	bash scripts/fresh_check.sh
