# sparsight: `make demo` runs the embedded default study; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo quick test test-fast benchmarks gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sparsight run --profile default

quick: $(STAMP)
	$(BIN)/sparsight run --profile quick

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

benchmarks: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# every CUDA path and GPU benchmark in one run (SMOKE=1: tiny sizes on the CPU; GPU_CHECK_ARGS: more flags).
# WHEELS=DIR, on a GPU machine without a package index: PYTHON's own torch, and the wheels that
# `python -m benchmarks.wheelhouse --out DIR` gathered installed into build/site beside it
# (without make: `python3 -m benchmarks.gpu_check --wheels DIR`)
ifdef WHEELS
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --wheels $(WHEELS) $(if $(SMOKE),--smoke) $(GPU_CHECK_ARGS)
else
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check $(if $(SMOKE),--smoke) $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(VENV) runs .pytest_cache
