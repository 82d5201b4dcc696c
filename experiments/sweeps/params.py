"""Figure 2 in miniature: ConSPO's tau, M and alpha, each varied with the others at the paper's defaults.

    conspo sweep --config experiments/arith_study.py --sweep experiments/sweeps/params.py --workdir runs/params

tau in {1, 5, 10, 20}, M in {0, 0.005, 0.01, 0.05}, alpha (objective.conspo.warmup_ratio) in
{0.1, 0.3, 0.5, 1.0}; the all-defaults run (10, 0.01, 0.3) lies on all three curves, so one seed is
10 runs. Arguments as in table1.py (default seeds=3; ``quick``: tau in {1, 10} only).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import base_overrides, parse_arg  # noqa: E402

from conspo_jax.sweep import Point  # noqa: E402

DEFAULTS = {"tau": 10.0, "max_margin": 0.01, "warmup_ratio": 0.3}
GRID = {"tau": (1.0, 5.0, 10.0, 20.0), "max_margin": (0.0, 0.005, 0.01, 0.05), "warmup_ratio": (0.1, 0.3, 0.5, 1.0)}


def get_sweep(arg=None):
    opts = parse_arg(arg, default_seeds=3)
    grid = {"tau": (1.0, 10.0)} if opts["quick"] else GRID
    common = {**base_overrides(opts), "objective.name": "conspo"}
    points = []
    for s in range(opts["seeds"]):
        points.append(Point(name=f"defaults_s{s}", method="conspo", seed=s, overrides=common, params=dict(DEFAULTS)))
        for param, values in grid.items():
            for v in values:
                if v == DEFAULTS[param]:
                    continue  # the defaults run above
                points.append(
                    Point(
                        name=f"{param}={v:g}_s{s}",
                        method="conspo",
                        seed=s,
                        overrides={**common, f"objective.conspo.{param}": v},
                        params={param: v},
                        in_table=False,
                    )
                )
    return points
