"""Step time with and without the overlapped pipeline (rollout.async_steps), measured in one process.

    PYTHONPATH=. python bench/async_pipeline.py [--config experiments/arith_tiny.py] [--steps 30] [--rounds 2]
    PYTHONPATH=. python bench/async_pipeline.py --long      # responses run to the length limit

Both modes start from the same cached warm start and train the same number of RL steps; the runs
alternate sync, async, sync, async... so that load from other jobs falls on both alike. Per run it takes
the median of ``time/step_s`` after the first ``--skip`` steps (compilation), and it prints one table:
median step time, its generate and exposed-wait parts, and the async/sync ratio. ``--long`` skips the
warm start and raises the response limit, so a random policy writes ``max_new_tokens`` tokens every row:
generation dominates the step, as in long-response reasoning RL.
"""

import argparse
import os
import statistics
import tempfile

from conspo_jax.base import logs
from conspo_jax.base.configs import load_config_module
from conspo_jax.train import train
from conspo_jax.train.metrics import read_metrics


def run(spec, workdir, *, async_steps, steps, cache, long):
    c = load_config_module(spec)
    c.rollout.async_steps = async_steps
    c.rollout.tis_cap = 2.0 if async_steps else 0.0
    c.train.num_steps = steps
    c.train.ckpt_every = steps
    c.train.progress_bar = False
    c.train.export_hf = False
    c.eval.at_start = False
    c.eval.every = 0
    c.sft.cache_dir = cache
    if long:
        c.sft.steps = 0
        c.rollout.max_new_tokens = 96
        c.model.overrides = {**c.model.overrides, "max_position_embeddings": 128}
    train(c, workdir)
    return read_metrics(workdir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/arith_tiny.py")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long", action="store_true")
    args = ap.parse_args()
    logs.console()
    root = tempfile.mkdtemp(prefix="async_bench_")
    cache = os.path.join(root, "warm")
    stats = {0: [], 1: []}
    for r in range(args.rounds):
        for mode in (0, 1):
            rows = run(
                args.config,
                os.path.join(root, f"r{r}_a{mode}"),
                async_steps=mode,
                steps=args.steps,
                cache=cache,
                long=args.long,
            )
            rows = [x for x in rows if "time/step_s" in x][args.skip :]
            med = {k: statistics.median(x[k] for x in rows) for k in ("time/step_s", "time/generate_s")}
            med["wait"] = statistics.median(x.get("time/wait_rollouts_s", 0.0) for x in rows)
            stats[mode].append(med)
            print(
                f"round {r} async_steps={mode}: step {med['time/step_s'] * 1e3:.0f} ms, "
                f"generate {med['time/generate_s'] * 1e3:.0f} ms, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )

    def mean(mode, key):
        return statistics.mean(s[key] for s in stats[mode])

    print("\n| async_steps | step (ms) | generate (ms) | exposed wait (ms) | step vs sync |")
    print("|---|---|---|---|---|")
    for mode in (0, 1):
        ratio = mean(mode, "time/step_s") / mean(0, "time/step_s")
        print(
            f"| {mode} | {mean(mode, 'time/step_s') * 1e3:.0f} | {mean(mode, 'time/generate_s') * 1e3:.0f} | "
            f"{mean(mode, 'wait') * 1e3:.0f} | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
