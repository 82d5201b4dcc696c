"""How many sweep workers make a study fastest on this machine: wall time of one sweep per setting.

    PYTHONPATH=. python bench/sweep_workers.py --config experiments/arith_tiny.py:smoke \
        --sweep experiments/sweeps/table1.py:quick [--settings 1,2,2t]

A setting is a worker count, with ``t`` for threaded runs (the runner's default) or ``s`` for runs pinned
to one thread (XLA/BLAS single-thread settings).
Each setting runs the whole sweep from scratch in a fresh directory; prints one line per setting.
"""

import argparse
import os
import shutil
import tempfile
import time

from conspo_jax.sweep.grid import load_sweep
from conspo_jax.sweep.runner import run_sweep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--settings", default="1,2")
    args = ap.parse_args()
    points = load_sweep(args.sweep)
    # No persistent compilation cache: a setting must not reuse the programs an earlier one compiled.
    extra = {"train.progress_bar": False, "train.export_hf": False, "xla_cache_dir": ""}
    for setting in args.settings.split(","):
        workers = int(setting.rstrip("ts"))
        single = setting.endswith("s")
        work = tempfile.mkdtemp(prefix="sweep_bench_")
        load0 = os.getloadavg()[0]
        t0 = time.time()
        summary = run_sweep(
            points,
            config_spec=args.config,
            workdir=work,
            workers=workers,
            extra_overrides=extra,
            warmstart_cache=False,
            single_thread=single,
            log=lambda _msg: None,
        )
        wall = time.time() - t0
        print(
            f"setting {setting}: {len(points)} runs, wall {wall:.1f}s, {wall / len(points):.1f}s/run, "
            f"failed {len(summary.failed)}, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
