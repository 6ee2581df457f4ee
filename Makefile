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

# A short Ray Train fine-tune of the shipped model (2 workers) on the embedded images, registered in MLflow;
# then the shipped model's showcase and the fine-tuned one's, side by side in runs/demo (after the training:
# a fresh run puts an existing runs/demo aside, grids included).
demo: setup
	$(BIN)/metarestore train --config configs/demo.yaml --workers 2
	$(BIN)/metarestore showcase --out runs/demo/shipped
	$(BIN)/metarestore showcase --model runs/demo/final --out runs/demo

# The same job in one process, without Ray.
demo-local: setup
	$(BIN)/metarestore train --local --config configs/demo.yaml
	$(BIN)/metarestore showcase --out runs/demo/shipped
	$(BIN)/metarestore showcase --model runs/demo/final --out runs/demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

# A base model's long run (BASE=base-wide: the shipped one, docs/model-card-base.md; BASE=base: the width-24
# model it replaced): continue it from its committed state (or start it), on any machine (a GPU is used when
# there is one). base-snapshot copies the newest checkpoint to checkpoints/$(BASE)-training (commit it); for the
# shipped run it also publishes the weights to metarestore/weights/base (builtin:base). ARGS: more options for
# train, e.g. ARGS="--set data.train=data/CBSD432" where ../shared/data is not there.
SHIPPED := base-chains
BASE ?= $(SHIPPED)
ARGS ?=
base-train: setup
	$(BIN)/metarestore train --local --config configs/$(BASE).yaml --no-register $(ARGS) \
	  $$(if test -d runs/$(BASE)/checkpoints; then echo --resume; \
	     elif test -d checkpoints/$(BASE)-training; then echo --resume-from checkpoints/$(BASE)-training; fi)

base-snapshot: setup
	latest=$$(ls -d runs/$(BASE)/checkpoints/step-* | tail -1) && rm -rf checkpoints/$(BASE)-training && \
	  mkdir -p checkpoints && cp -r $$latest checkpoints/$(BASE)-training
	test "$(BASE)" != $(SHIPPED) || \
	  $(BIN)/python -m metarestore.checkpoint publish checkpoints/$(BASE)-training metarestore/weights/base

# Timing benchmarks for docs/benchmarks.md: run on a quiet machine.
benchmarks: setup
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
