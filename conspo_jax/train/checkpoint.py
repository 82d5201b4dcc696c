"""Atomic, resumable checkpoints with Orbax: train state, data-iterator state and run metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; ``latest`` only ever sees finished steps.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """Returns (state, data_state, meta) with the state placed as ``abstract_state`` says."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"], out["meta"]

    def close(self):
        self.manager.close()


def _manager_dir(path: str) -> tuple[str, int | None]:
    """Accepts a trainer workdir, its checkpoints/ dir, or one step dir; returns (dir, step or None)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(base)
    return path, None


def load_policy_for_eval(config, checkpoint: str, *, tokenizer, mesh):
    """The policy of a trainer checkpoint (latest step unless a step dir is given), built from config."""
    from flax import nnx

    from conspo_jax.configs import UsageError
    from conspo_jax.train import setup
    from conspo_jax.train.step import init_train_state, make_optimizer

    directory, step = _manager_dir(checkpoint)
    if not os.path.isdir(directory):
        raise UsageError(f"--checkpoint: no such directory {checkpoint!r}")
    ckpt = Checkpointer(directory)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise UsageError(f"--checkpoint: no finished checkpoint in {directory!r}")
    policy = setup.build_policy(config, tokenizer, mesh, seed=config.seed)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    optimizer = make_optimizer(**config.optim)
    # A concrete target gives Orbax every leaf's sharding; the optimizer moments are dropped at return.
    state, _, _ = ckpt.restore(step, init_train_state(params, optimizer, jax.random.key(0), mesh))
    ckpt.close()
    return nnx.merge(graphdef, state.params, rest)
