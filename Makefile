# The two commands of the README, each doing its own set-up on a fresh machine:
#   make run    set up .venv and run the main job on the embedded default (MNIST config)
#   make test   set up .venv with the dev extras, lint, and run every test tier that fits a CPU
# Other targets: test-fast (skips the `slow` tier), lint, bench-sizes, clean.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test test-fast lint bench-sizes clean

$(STAMP): pyproject.toml
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# Main job. Until the training loop lands (issue 4) it prints what the embedded default and the
# 1.5B sCD model cost: parameters, FLOPs per sample and training-state memory.
run: $(STAMP)
	$(BIN)/scm-jax info --config configs/mnist.py
	$(BIN)/scm-jax info --config configs/imagenet512.py:size=xxl,objective=scd --devices 8

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-sizes: $(STAMP)
	$(BIN)/python benchmarks/model_sizes.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
