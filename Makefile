# Quick start: `make demo` (set up + main job) and `make test` (set up + all tests).
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test bench
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
