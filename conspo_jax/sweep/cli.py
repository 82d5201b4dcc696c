"""``conspo sweep``: run a study's grid of ``conspo train`` runs, then write its tables and figures.

    conspo sweep --config experiments/arith_tiny.py --sweep experiments/sweeps/table1.py --workdir runs/table1
    python -m conspo_jax.sweep --config experiments/arith_tiny.py:smoke --sweep experiments/sweeps/table1.py:quick \
        --workdir /tmp/quick

``--config.k=v`` overrides apply to every run (a point's own overrides win). Re-running the command skips
finished runs and resumes interrupted ones; ``--report_only`` rewrites the outputs from what is on disk.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from conspo_jax.base.configs import UsageError, _has_key, parse_command_line, stderr_line
from conspo_jax.sweep.grid import load_sweep
from conspo_jax.sweep.report import write_report
from conspo_jax.sweep.runner import run_sweep

# Measured on the 2-core machine (experiments/sweeps/README.md): 2 workers finish a sweep 1.32x faster than 1.
DEFAULT_WORKERS = 2
# Every run of a study: no per-step progress bar in the logs, no HF export (the study reads metrics only).
RUN_DEFAULTS = {"train.progress_bar": False, "train.export_hf": False}


def define_flags(fv):
    flags.DEFINE_string("sweep", None, "Sweep module path.py[:arg] defining get_sweep(arg).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Study directory: runs/<point>, warmstart/, table.md, ...", flag_values=fv)
    flags.DEFINE_integer("workers", DEFAULT_WORKERS, "Training runs at a time.", flag_values=fv)
    flags.DEFINE_string(
        "warmstart_dir",
        None,
        "Warm-start cache root (default <workdir>/warmstart). Name another study's to start from the same "
        "warm starts; one made under other settings is refused.",
        flag_values=fv,
    )
    flags.DEFINE_bool("report_only", False, "Only rewrite the tables and figures from finished runs.", flag_values=fv)


def run(fv) -> int:
    """The body of ``conspo sweep`` (for cli.COMMANDS); 0 when every run finished, 1 otherwise."""
    if not fv.sweep:
        raise UsageError("--sweep is required, e.g. --sweep experiments/sweeps/table1.py")
    if not fv.workdir:
        raise UsageError("--workdir is required for sweep")
    if fv.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {fv.workers}")
    config = fv.config
    points = load_sweep(fv.sweep)
    for p in points:
        for key in p.overrides:
            if not _has_key(config, key):
                raise UsageError(f"sweep point {p.name!r}: unknown config key {key!r}")
    extra = {k: v for k, v in RUN_DEFAULTS.items() if _has_key(config, k)}
    extra.update(config_flags.get_override_values(fv["config"]))
    if not fv.report_only:
        summary = run_sweep(
            points,
            config_spec=config_flags.get_config_filename(fv["config"]),
            workdir=fv.workdir,
            workers=fv.workers,
            extra_overrides=extra,
            # until the trainer has sft.cache_dir, runs recompute the (identical, seeded) warm start
            warmstart_cache=_has_key(config, "sft.cache_dir"),
            warmstart_dir=fv.warmstart_dir,
        )
    results = write_report(points, fv.workdir)
    print(f"[sweep] wrote {fv.workdir}/table.md ({len(results['runs'])}/{len(points)} runs)", flush=True)
    if results["missing"]:
        stderr_line(f"conspo sweep: {len(results['missing'])} run(s) unfinished: {', '.join(results['missing'])}")
        return 1
    return 0 if fv.report_only or not summary.failed else 1


def main(argv=None) -> int:
    """``python -m conspo_jax.sweep --config ... --sweep ... --workdir ...`` (same as ``conspo sweep``)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        return run(parse_command_line(["conspo sweep", *argv[1:]], define_flags))
    except UsageError as e:
        stderr_line(f"conspo sweep: error: {e}")
        return 2
    except KeyboardInterrupt:
        stderr_line("conspo sweep: interrupted")
        return 130
