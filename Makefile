# The README's two commands: `make demo` and `make test`. Both set up .venv first (pip, editable, dev extra).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-local test test-fast lint benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Meta-train on the embedded images with Ray Train (2 workers), then restore degraded samples.
demo: setup
	$(BIN)/metarestore train --config configs/demo.yaml --workers 2
	$(BIN)/metarestore showcase --model runs/demo/final --out runs/demo

# The same job in one process, without Ray.
demo-local: setup
	$(BIN)/metarestore train --local --config configs/demo.yaml
	$(BIN)/metarestore showcase --model runs/demo/final --out runs/demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Timing benchmarks for docs/benchmarks.md: run on a quiet machine.
benchmarks: setup
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
