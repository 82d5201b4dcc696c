"""The overlapped pipeline against the synchronous one: ConSPO with rollout.async_steps 0 and 1, paired seeds.

    conspo sweep --config experiments/arith_tiny.py --sweep experiments/sweeps/async_pipeline.py --workdir runs/async

Rows ``conspo`` (synchronous, the reference) and ``conspo_async`` (one step off-policy, truncated importance
sampling at cap 2); the table's paired difference is async minus sync over the same seeds (same warm start,
same prompt order). Arguments as in table1.py (default seeds=3).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import base_overrides, parse_arg  # noqa: E402

from conspo_jax.sweep import Point  # noqa: E402


def get_sweep(arg=None):
    opts = parse_arg(arg, default_seeds=3)
    common = {**base_overrides(opts), "objective.name": "conspo"}
    points = []
    for s in range(opts["seeds"]):
        points.append(Point(name=f"sync_s{s}", method="conspo", seed=s, overrides=common))
        points.append(
            Point(
                name=f"async_s{s}",
                method="conspo_async",
                seed=s,
                overrides={**common, "rollout.async_steps": 1, "rollout.tis_cap": 2.0},
            )
        )
    return points
