"""The demo (experiments/arith_tiny.py) over seeds: the measurement behind the README's before/after figure.

    conspo sweep --config experiments/arith_tiny.py --sweep experiments/sweeps/demo.py --workdir runs/demo

One ConSPO run per seed (default seeds 0-4, ``seeds=N``), exactly what ``make train`` runs with
``--config.seed=S``; Table 1's Base row is each seed's accuracy before RL, so ``table.md`` lists the gain.
Arguments as in table1.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import base_overrides, parse_arg  # noqa: E402

from conspo_jax.sweep import Point  # noqa: E402


def get_sweep(arg=None):
    opts = parse_arg(arg, default_seeds=5)
    common = {**base_overrides(opts), "objective.name": "conspo"}
    return [Point(name=f"conspo_s{s}", method="conspo", seed=s, overrides=common) for s in range(opts["seeds"])]
