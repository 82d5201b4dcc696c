"""Test-wide setup. Eight host CPU devices let sharding tests build real meshes on one machine."""

import os

import pytest

from conspo_jax.base.xla_cache import host_cache_dir

# $CONSPO_TEST_XLA_FLAGS changes XLA's CPU code generation for the whole suite, subprocesses included (for
# example --xla_cpu_max_isa=SSE4_2): floating-point results then differ as they do on another processor
# model, which no test may depend on (CONTRIBUTING.md, "Tests that hold on any CPU").
CODEGEN_XLA_FLAGS = os.environ.get("CONSPO_TEST_XLA_FLAGS", "").strip()


def xla_flags(*flags: str) -> str:
    """An XLA_FLAGS value for a test's subprocess: its own flags, then the suite's code-generation flags."""
    return " ".join(f for f in (*flags, CODEGEN_XLA_FLAGS) if f)


# Must be set before jax initialises its backends; harmless for tests that use one device.
# Optimisation level 0: tests run tiny models, where LLVM time dominates; it halves compile time.
os.environ.setdefault(
    "XLA_FLAGS", xla_flags("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# $CONSPO_DATA_DIR (what the loaders read) wins, so tests also find the data from a git worktree elsewhere.
SHARED_DATA = os.environ.get("CONSPO_DATA_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)

# Identical XLA programs (the same tiny model compiled by several tests) are compiled once per session.
# Keyed by the host CPU: a /tmp inherited from another machine must not feed this one its native code
# (conspo_jax/base/xla_cache.py).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", host_cache_dir(os.path.join(os.environ.get("TMPDIR", "/tmp"), "conspo_jax_test_xla"))
)


@pytest.fixture(scope="session")
def smoke_warm_cache(tmp_path_factory):
    """One sft.cache_dir for the 200-step warm start of arith_tiny.py:smoke, which several modules' runs
    start from (their warm-start settings are the same; cached_warm_start refuses a cache made with other
    settings, naming the keys). The first run that needs it computes it; the rest restore it."""
    return str(tmp_path_factory.mktemp("smoke_warm"))
