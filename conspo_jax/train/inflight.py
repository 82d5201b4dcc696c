"""The in-flight store: the rollout batch of an overlapped run (``rollout.async_steps=1``) that was collected
for the next step and not yet trained on, held between steps and saved beside each checkpoint.

With one step of overlap, the checkpoint taken after step k already has step k+1's rollouts generated
(from the weights of step k), and the data iterator has moved past their prompts. Resuming exactly means
training on those very rollouts, so they are written to ``<dir>/step_<k>.p<process>.npz`` before the
checkpoint itself: atomically (a temporary file, then a rename), one file per process (each process
generates for its own prompts), and pruned to the checkpoints Orbax keeps.

A batch is any dataclass whose fields are numpy arrays, nested dataclasses of them (``Rollouts``), or
JSON values (records, prompts, finish reasons), so fields added to ``RolloutBatch`` travel without
changes here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re

import jax
import numpy as np

from conspo_jax.rollout import Rollouts

_NAME = re.compile(r"step_(\d+)\.p(\d+)\.npz$")


def _flatten(obj, prefix: str, arrays: dict, meta: dict) -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            meta[key] = {"__dataclass__": type(value).__name__}
            _flatten(value, key + ".", arrays, meta)
        elif isinstance(value, np.ndarray):
            arrays[key] = value
        else:
            meta[key] = value


def _unflatten(cls, prefix: str, arrays: dict, meta: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if key in arrays:
            kwargs[f.name] = arrays[key]
        elif isinstance(meta.get(key), dict) and "__dataclass__" in meta[key]:
            nested = {Rollouts.__name__: Rollouts}[meta[key]["__dataclass__"]]
            kwargs[f.name] = _unflatten(nested, key + ".", arrays, meta)
        elif key in meta:
            kwargs[f.name] = meta[key]
    return cls(**kwargs)


def path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step}.p{jax.process_index()}.npz")


def save(directory: str, step: int, batch) -> None:
    """Writes ``batch`` (the rollouts step ``step`` will train on) atomically."""
    os.makedirs(directory, exist_ok=True)
    arrays, meta = {}, {}
    _flatten(batch, "", arrays, meta)
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    final = path(directory, step)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def load(directory: str, step: int, cls):
    """The batch saved for ``step``, or None when the checkpoint was taken by a synchronous run."""
    p = path(directory, step)
    if not os.path.exists(p):
        return None
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(z["__meta__"].tobytes().decode())
    return _unflatten(cls, "", arrays, meta)


def prune(directory: str, keep_steps) -> None:
    """Deletes this process's saved batches whose checkpoint Orbax has deleted."""
    if not os.path.isdir(directory):
        return
    keep = {int(s) for s in keep_steps}
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m and int(m.group(2)) == jax.process_index() and int(m.group(1)) not in keep:
            os.remove(os.path.join(directory, name))


class InflightStore:
    """The batch in flight between two steps (``pending``), and its copies beside the checkpoints.

    The producer's result goes in with ``put`` after each update; the next step ``take``s it (None: a
    synchronous run, or the first step, collects its own). ``save`` writes it before a checkpoint,
    ``restore`` reads it back on resume.
    """

    def __init__(self, directory: str, cls):
        self.directory, self.cls = directory, cls
        self.pending = None

    def restore(self, step: int) -> None:
        """Takes up the batch saved with checkpoint ``step`` (none for a synchronous run's checkpoint)."""
        self.pending = load(self.directory, step, self.cls)

    def take(self):
        batch, self.pending = self.pending, None
        return batch

    def put(self, batch) -> None:
        self.pending = batch

    def save(self, step: int) -> None:
        """Written before checkpoint ``step`` itself: a checkpoint never lacks the batch it expects."""
        if self.pending is not None:
            save(self.directory, step, self.pending)

    def prune(self, keep_steps) -> None:
        prune(self.directory, keep_steps)
