# The README's two commands: `make demo` and `make test`. Both set up .venv first (pip, editable, dev extra).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-local test test-fast lint benchmarks base-train base-snapshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The shipped model restores and adapts at once; then a short Ray Train fine-tune of it (2 workers) on the
# embedded images, registered in MLflow, and the same showcase again.
demo: setup
	$(BIN)/metarestore showcase --out runs/demo/shipped
	$(BIN)/metarestore train --config configs/demo.yaml --workers 2
	$(BIN)/metarestore showcase --model runs/demo/final --out runs/demo

# The same job in one process, without Ray.
demo-local: setup
	$(BIN)/metarestore showcase --out runs/demo/shipped
	$(BIN)/metarestore train --local --config configs/demo.yaml
	$(BIN)/metarestore showcase --model runs/demo/final --out runs/demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

# The shipped base model (docs/model-card-base.md): continue its training from the committed state, on any
# machine (a GPU is used when there is one), then snapshot it: the resumable state goes to
# checkpoints/base-training (commit it) and the weights alone to metarestore/weights/base (builtin:base).
base-train: setup
	$(BIN)/metarestore train --local --config configs/base.yaml --no-register \
	  $$(test -d runs/base/checkpoints && echo --resume || echo --resume-from checkpoints/base-training)

base-snapshot: setup
	latest=$$(ls -d runs/base/checkpoints/step-* | tail -1) && rm -rf checkpoints/base-training && \
	  mkdir -p checkpoints && cp -r $$latest checkpoints/base-training
	$(BIN)/python -m metarestore.checkpoint publish checkpoints/base-training metarestore/weights/base

# Timing benchmarks for docs/benchmarks.md: run on a quiet machine.
benchmarks: setup
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
