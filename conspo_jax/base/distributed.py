"""Multi-process (multi-host) runs: start-up, global arrays from process-local rows, and gathers.

JAX's multi-controller runtime runs one process per host; every process runs the same program on
its own share of the data. This module is the one place that knows about it:

- ``initialize(config)`` calls ``jax.distributed.initialize`` when the run asks for it
  (``distributed.*`` config keys, ``conspo train --distributed``, or JAX's ``JAX_COORDINATOR_ADDRESS``
  environment variables). A single process needs none of it, and nothing here changes its numbers.
- ``to_global(tree, shardings)`` builds global arrays from each process's local rows (leading or
  given axis sharded over the data axes); ``to_local(tree)`` reads this process's rows back from the
  addressable shards. The trainer (micro-batches) and the sampler (prompts, outputs) both use them.
- ``allgather(obj)`` gathers any picklable host value from every process (metrics, eval verdicts,
  the data-iterator states of a checkpoint), in process order; ``allgather_ints`` a few integers
  (the sampler's per-round agreement on shapes).

Layout: the mesh's data axes run over processes in order (``jax.devices()`` lists process 0's
devices first), so process p's local rows are the p-th contiguous block of every global batch.
"""

from __future__ import annotations

import logging
import os
import pickle

import jax
import numpy as np

from conspo_jax.base.configs import UsageError

log = logging.getLogger(__name__)

_ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {value!r}") from None


def initialize(config=None, *, enabled: bool = False) -> bool:
    """Starts the multi-process runtime if asked; returns True when it did.

    Asked means any of: ``enabled`` (the CLI's bare ``--distributed``), ``config.distributed.enabled``,
    ``config.distributed.coordinator``, or ``JAX_COORDINATOR_ADDRESS`` in the environment. Explicit
    config values win over ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
    what neither gives is left to JAX's cluster detection (SLURM, Cloud TPU, ...). Must run before
    anything touches a device.
    """
    d = config.get("distributed") if config is not None else None
    coordinator = (d.coordinator if d is not None else "") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = d.num_processes if d is not None and d.num_processes > 0 else _env_int("JAX_NUM_PROCESSES")
    pid = d.process_id if d is not None and d.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    asked = enabled or (d is not None and d.enabled) or coordinator is not None
    if not asked:
        return False
    if num is not None and num < 1:
        raise UsageError(f"distributed.num_processes must be >= 1, got {num}")
    if pid is not None and num is not None and not 0 <= pid < num:
        raise UsageError(f"distributed.process_id={pid} must be in [0, {num})")
    kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    timeout = int(d.init_timeout_s) if d is not None and d.init_timeout_s else None
    if timeout:
        kwargs["initialization_timeout"] = timeout
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    log.info(
        f"distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices"
    )
    return True


def is_primary() -> bool:
    """True on the process that writes the run's files (process 0)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def to_global(tree, shardings):
    """Global arrays from this process's local rows: ``shardings`` (a tree of ``NamedSharding``s
    matching ``tree``) says how the global array is laid out; each leaf holds this process's block.

    One process: a plain ``device_put`` (the local rows are the global array). Many: the global
    shape is the local one times the number of processes along the sharded axis, built with
    ``jax.make_array_from_process_local_data``; a leaf that is not sharded across processes must be
    the same on every process.
    """

    def one(x, sharding):
        if x is None:
            return None
        if not multi_process():
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


def to_local(tree):
    """This process's rows of every global array in ``tree`` as numpy (the addressable shards in
    index order, replicas dropped); fully replicated or single-process arrays come back whole."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        shards = {}
        for s in x.addressable_shards:
            key = tuple((i.start or 0) for i in s.index)
            shards.setdefault(key, s)
        axes = [a for a in range(x.ndim) if len({k[a] for k in shards}) > 1]
        if len(axes) > 1:
            raise ValueError(f"to_local: array sharded on several axes {axes} within a process")
        if not axes:
            return np.asarray(next(iter(shards.values())).data)
        ordered = [shards[k] for k in sorted(shards)]
        return np.concatenate([np.asarray(s.data) for s in ordered], axis=axes[0])

    return jax.tree.map(one, tree)


def allgather(obj) -> list:
    """``obj`` (any picklable value) from every process, in process order; ``[obj]`` for one process.

    A collective: every process must call it, in the same order.
    """
    if not multi_process():
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    width = 1 << int(max(int(np.max(sizes)), 1) - 1).bit_length()  # powers of two bound recompiles
    padded = np.zeros((width,), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded[None], tiled=True)
    return [pickle.loads(rows[i, : int(sizes[i])].tobytes()) for i in range(rows.shape[0])]


def allgather_ints(values) -> np.ndarray:
    """[process_count, len(values)] int32: a few host integers from every process, in process order
    (cheaper than ``allgather``; the sampler agrees shapes with it every round). A collective."""
    row = np.asarray(values, np.int32).reshape(1, -1)
    if not multi_process():
        return row
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row, tiled=True)).reshape(jax.process_count(), -1)


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Process-local rows of a host array concatenated over processes (the global batch's rows)."""
    parts = allgather(np.asarray(x))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op for one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
