"""Table 1 and Table 6 in miniature: the 7 baselines, ConSPO and its 4 ablations, over paired seeds.

    conspo sweep --config experiments/arith_study.py --sweep experiments/sweeps/table1.py --workdir runs/table1

Arguments (comma-separated): ``quick`` (ConSPO and GRPO x 2 seeds x 4 steps: the test suite's check of the
machinery, use with arith_tiny.py:smoke), ``seeds=N`` (default 5), ``steps=N`` (train.num_steps).
The Base row (the warm start alone) comes from every run's eval/accuracy_before, no run of its own.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import base_overrides, credit_overrides, parse_arg  # noqa: E402

from conspo_jax.sweep import Point  # noqa: E402

BASELINES = ("grpo", "dapo", "dr_grpo", "disco", "gmpo", "cispo", "sapo")
ABLATIONS = ("conspo_no_contrastive", "conspo_no_loglik", "conspo_no_margin", "conspo_fixed_margin")
METHODS = (*BASELINES, "conspo", *ABLATIONS)


def get_sweep(arg=None):
    opts = parse_arg(arg, default_seeds=2 if arg and "quick" in arg.split(",") else 5)
    methods = opts["methods"] or (("conspo", "grpo") if opts["quick"] else METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"table1: unknown methods {unknown}; the rows are {', '.join(METHODS)}")
    common = base_overrides(opts)
    return [
        Point(
            name=f"{m}_s{s}", method=m, seed=s, overrides={**common, **credit_overrides(m, opts), "objective.name": m}
        )
        for s in range(opts["seeds"])
        for m in methods
    ]
