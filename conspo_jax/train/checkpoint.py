"""Atomic, resumable checkpoints with Orbax: train state, data-iterator state and run metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; ``latest`` only ever sees finished steps.

Every process joins the one checkpoint. ``gather_data_states`` / ``local_data_state`` put every
process's data-iterator position into it and take this process's back out on resume.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from conspo_jax.base import distributed
from conspo_jax.base.configs import UsageError


class Checkpointer:
    """Saves and restores the train state, the data-iterator state, run metadata and, for objectives
    with a KL term, the frozen reference parameters (so a resumed run keeps the run's reference)."""

    def __init__(self, directory: str, *, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data", "meta", "ref"),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return self.manager.all_steps()

    def save(self, step: int, state, data_state: dict, meta: dict, ref_params=None) -> None:
        items = dict(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        if ref_params is not None:
            items["ref"] = ocp.args.StandardSave(ref_params)
        self.manager.save(step, args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state, abstract_ref=None):
        """Returns (state, data_state, meta, ref_params) placed as the abstract trees say (ref: None
        unless ``abstract_ref`` is given)."""

        def target(tree):
            return ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))

        items = dict(state=target(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        if abstract_ref is not None:
            items["ref"] = target(abstract_ref)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["data"], out["meta"], out["ref"] if abstract_ref is not None else None

    def close(self):
        self.manager.close()


def gather_data_states(data_state: dict) -> dict:
    """What a checkpoint stores for the data pipeline: this process's state, or every process's in order."""
    if distributed.multi_process():
        return {"processes": distributed.allgather(data_state)}
    return data_state


def local_data_state(data_state: dict) -> dict:
    """This process's data-iterator state from a checkpoint's; a resume with another process count is
    a ``UsageError`` (each process's prompts would change)."""
    if "processes" in data_state:
        states = data_state["processes"]
        if len(states) != jax.process_count():
            raise UsageError(
                f"the checkpoint was written by {len(states)} processes; resume it with as many, "
                f"not {jax.process_count()}"
            )
        return states[jax.process_index()]
    if distributed.multi_process():
        raise UsageError("the checkpoint was written by one process; resume it with one process")
    return data_state
