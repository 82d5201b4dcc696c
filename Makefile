# One entry point for people and CI. `make test` builds the environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp's name changes with setup.cfg, so editing dependencies reinstalls.
STAMP := $(VENV)/.installed-$(shell cksum setup.cfg | cut -d' ' -f1)
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: env test lint wheel-smoke train bench-objectives bench-logprob bench-gpu notebooks proto

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

env: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# A wheel, installed non-editable into a fresh virtualenv, runs the smoke config from another directory.
wheel-smoke: $(STAMP)
	scripts/wheel_smoke.sh $(BIN)/python

train: $(STAMP)
	$(BIN)/conspo train --config experiments/arith_tiny.py --workdir runs/arith_tiny

bench-objectives: $(STAMP)
	$(BIN)/python bench/objectives.py

bench-logprob: $(STAMP)
	$(BIN)/python bench/logprob_step.py

# Everything that needs a GPU, one table last (bench/gpu_suite.sh; BENCHMARKS.md). No $(STAMP): the GPU
# machine has no network, the suite installs .whl/ itself. BENCH_GPU_ARGS=--cpu: the CPU-sized check.
bench-gpu:
	PYTHON=$(or $(wildcard $(BIN)/python),python3) bash bench/gpu_suite.sh $(BENCH_GPU_ARGS)

proto: $(STAMP)
	$(BIN)/python -m conspo_jax.sidecar.gen_proto
