"""Every shipped experiment module builds, validates its values and accepts overrides (levanter habit)."""

import glob
import os

import pytest

from conspo_jax.base.configs import load_config_module
from conspo_jax.objectives import list_objectives
from conspo_jax.train.config_base import PAPER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
CPU_MODULES = [m for m in MODULES if "arith" in m or "smollm2" in m]  # sized for a 2-core machine
PAPER_MODULES = [m for m in MODULES if m not in CPU_MODULES]


def test_there_are_experiments():
    assert len(MODULES) >= 6


@pytest.mark.parametrize("path", MODULES, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["", "random", "smoke"])
def test_every_config_builds(path, arg):
    arith = "arith" in path
    if (arith and arg == "random") or (path in PAPER_MODULES and arg == "smoke"):
        with pytest.raises(ValueError, match="unknown"):
            load_config_module(f"{path}:{arg}")
        return
    c = load_config_module(f"{path}:{arg}" if arg else path)
    assert c.rollout.n >= 1 and c.rollout.prompts_per_step >= 1
    assert c.objective.name in list_objectives()
    for name in list_objectives():
        assert name in c.objective, name
    assert c.model.random_init == (arg == "random")


@pytest.mark.parametrize("path", PAPER_MODULES, ids=os.path.basename)
def test_paper_defaults(path):
    c = load_config_module(path)
    assert (c.rollout.prompts_per_step, c.rollout.n, c.rollout.temperature) == (256, 8, 1.0)
    assert c.optim.lr == PAPER["lr"] == 2e-6
    k = c.objective.conspo
    assert (k.tau, k.max_margin, k.warmup_ratio) == (10.0, 0.01, 0.3)
    assert (c.eval.temperature, c.eval.top_p) == (0.6, 0.95)
    short = "qwen3" in path or "llama32" in path
    assert c.rollout.max_new_tokens == (4096 if short else 8192)
    assert c.data.num_epochs == (2 if "qwen3" in path else 4)
    assert c.model.remat == "names"  # the GPU default the CPU proof chose (BENCHMARKS.md)


@pytest.mark.parametrize("path", CPU_MODULES, ids=os.path.basename)
def test_cpu_configs_keep_no_remat(path):
    assert load_config_module(path).model.remat == "none"


def test_objective_argument_selects_baseline():
    c = load_config_module(os.path.join(ROOT, "experiments", "r1_distill_qwen_1p5b.py") + ":grpo,random")
    assert c.objective.name == "grpo" and c.model.random_init
