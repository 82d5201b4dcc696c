"""LoRA against full fine-tuning: ConSPO with every weight trained, and with rank-r adapters on all seven
projections over the frozen warm-started base, paired seeds.

    conspo sweep --config experiments/arith_study.py --sweep experiments/sweeps/lora.py --workdir runs/lora

Rows ``conspo`` (every weight, the reference) and ``conspo_lora_r8``; the table's "vs ConSPO" column is LoRA
minus full, paired by seed. Both rows of a seed start from one warm start (it trains every weight; LoRA's adapters come
after it, B = 0), so the pair differs only in what RL may change.

LoRA's learning rate: "LoRA Without Regret" (Thinking Machines, 2025) finds the best LoRA rate about 10x
the best full fine-tuning rate, across model sizes, in supervised and RL training. ``lora_lr`` sets it
(default 3e-3, 10x arith_study.py's 3e-4; for smollm2_135m.py's 2e-5 pass ``lora_lr=2e-4``).
Arguments (comma-separated): as table1.py (default seeds=3), plus ``rank=R`` (default 8) and ``lora_lr=X``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import base_overrides, parse_arg  # noqa: E402

from conspo_jax.sweep import Point  # noqa: E402


def get_sweep(arg=None):
    opts = parse_arg(arg, default_seeds=3, extra={"rank": (int, 8), "lora_lr": (float, 3e-3)})
    rank = opts["rank"]
    if rank <= 0:
        raise ValueError(f"lora sweep: rank={rank} must be > 0 (the full row is rank 0)")
    common = {**base_overrides(opts), "objective.name": "conspo"}
    lora = {**common, "model.lora.rank": rank, "optim.lr": opts["lora_lr"]}
    points = []
    for s in range(opts["seeds"]):
        points.append(Point(name=f"full_s{s}", method="conspo", seed=s, overrides=common))
        points.append(Point(name=f"lora_r{rank}_s{s}", method=f"conspo_lora_r{rank}", seed=s, overrides=lora))
    return points
