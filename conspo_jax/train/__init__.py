"""Training: the RLVR loop as stages (``Trainer``), the jitted update, batching, checkpoints, metrics.

    from conspo_jax.train import train
    train(config, workdir)  # what `conspo train` runs; re-running it resumes

This is the top layer: it builds through ``conspo_jax.run.build`` and evaluates through ``conspo_jax.evals``;
nothing below it imports it.
"""

from conspo_jax.train.collect import RolloutBatch
from conspo_jax.train.trainer import Trainer, train

__all__ = ["RolloutBatch", "Trainer", "train"]
