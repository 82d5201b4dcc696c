"""Per-run cost of the study's phases in CPU seconds, to size a sweep that fits a wall-time budget.

Wall time on the shared 2-core machine swings with other jobs' load; process CPU time (all threads) does
much less, and with 2 sweep workers saturating 2 cores a study's wall time is about its total CPU time / 2.
Measures, for each objective given: building the Trainer (the warm start through ``sft.cache_dir``: the
first objective pays for it, the rest reuse it), one held-out evaluation, and ``--steps`` RL steps
(the first one's compile reported apart).

    PYTHONPATH=. python bench/study_budget.py --config experiments/arith_study.py --objectives conspo,dapo --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from conspo_jax.base.configs import load_config_module
from conspo_jax.train.trainer import Trainer, rollout_metrics


def _clock():
    return time.process_time(), time.time()


def measure(config, workdir: str, steps: int) -> dict:
    cpu0, wall0 = _clock()
    trainer = Trainer(config, workdir)
    cpu1, wall1 = _clock()
    out = {"build_cpu_s": cpu1 - cpu0, "build_wall_s": wall1 - wall0}
    try:
        trainer.evaluate(0)
        cpu2, wall2 = _clock()
        out.update(eval_cpu_s=cpu2 - cpu1, eval_wall_s=wall2 - wall1)
        step_cpu, step_wall, rounds = [], [], []
        for step in range(steps):
            c0, w0 = _clock()
            rb = trainer.collect(step)
            row = trainer.update(trainer.make_batches(rb), step)
            row.update(rollout_metrics(rb, row, w0))
            trainer.after_step(step + 1, row)  # syncs the engine's weights (eval and checkpoints are off)
            c1, w1 = _clock()
            step_cpu.append(c1 - c0)
            step_wall.append(w1 - w0)
            rounds.append(rb.stats.get("rollout/sampling_rounds", 1.0))
        out.update(
            first_step_cpu_s=step_cpu[0],
            step_cpu_s=float(np.mean(step_cpu[1:])),
            step_wall_s=float(np.mean(step_wall[1:])),
            sampling_rounds=float(np.mean(rounds)),
            reward_mean=float(row["reward/mean"]),
        )
    finally:
        trainer.close()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--objectives", default="conspo,dapo")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="study_budget_")
    res = {"load_before": os.getloadavg()[0]}
    for name in a.objectives.split(","):
        c = load_config_module(a.config)
        c.objective.name = name
        c.train.progress_bar = False
        c.train.export_hf = False
        c.eval.every, c.train.ckpt_every = 0, 10**6  # evaluate() is timed once by hand; no checkpoint writes
        c.sft.cache_dir = os.path.join(root, "warm")
        res[name] = measure(c, os.path.join(root, name), a.steps)
        print(name, json.dumps(res[name]), flush=True)
    res["load_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
