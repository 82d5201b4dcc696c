"""Studies: grids of ``conspo train`` runs over methods, seeds and hyperparameters, with CI tables and figures.

It launches each run as a subprocess and never imports conspo_jax.train, so a study survives a crashed run
and runs in parallel on separate processes. See cli.py for the command, grid.py for sweep modules.
"""

from conspo_jax.sweep.grid import Point, load_sweep, train_command
from conspo_jax.sweep.report import write_report
from conspo_jax.sweep.runner import run_state, run_sweep
from conspo_jax.sweep.stats import MeanCI, mean_ci, paired_difference

__all__ = [
    "MeanCI",
    "Point",
    "load_sweep",
    "mean_ci",
    "paired_difference",
    "run_state",
    "run_sweep",
    "train_command",
    "write_report",
]
