"""The training prompt pipeline on grain: deterministic per-epoch shuffles, multi-host sharding, and an
iterator whose position checkpoints as a small JSON dict.

Layout of the global stream: ``records`` shuffled with ``seed`` for epoch 0, ``seed + 1`` for epoch 1
(grain's ``shuffle`` then ``repeat`` reseeds every epoch), and so on, cut into global batches of
``batch_size``. Process ``shard_index`` of ``shard_count`` takes the contiguous ``batch_size //
shard_count`` slice of every global batch, so all processes together see exactly the single-process
stream and every process yields the same number of batches (no host waits on another at the end).
With ``num_chunks`` > 1 (the trainer's micro-batches per step) every global batch is first cut into
that many equal chunks and the process takes its contiguous slice of each, so that local micro-batch
k of every process together make up exactly global micro-batch k of one process.
A batch may span an epoch boundary; with ``drop_remainder`` the incomplete final batch is dropped
(always, with several processes: every process must see the same number of full batches).

Checkpointing: ``it.get_state()`` is a JSON-serialisable dict such as ``{"next_index": 12}``. Save it
with ``orbax.checkpoint.args.JsonSave(it.get_state())`` and restore with ``it.set_state(json)`` on a
fresh iterator built with the same arguments, or hand the iterator to Orbax directly with
``grain.checkpoint.CheckpointSave(it)`` / ``grain.checkpoint.CheckpointRestore(it)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain


def _process_defaults(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    return int(shard_index), int(shard_count)


def prompt_batches(
    records: Sequence[dict],
    *,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    batch_fn: Callable[[list], object] = list,
    num_chunks: int = 1,
) -> grain.MapDataset:
    """Batches of this process's share of ``records`` as a grain ``MapDataset`` (random access, ``len``).

    batch_size:   GLOBAL batch size (prompts per step over all processes); each process gets
                  ``batch_size // shard_count`` records per batch.
    num_epochs:   passes over the data; None repeats forever.
    shard_index, shard_count: default to ``jax.process_index()`` / ``jax.process_count()``.
    batch_fn:     turns a list of records into a batch (default: the list itself).
    num_chunks:   with several processes, take this process's slice of each of ``num_chunks`` equal
                  chunks of a global batch (see the module docstring); one process ignores it.

    ``len(ds)`` is the number of batches this process will yield; ``ds[i]`` is batch i.
    """
    shard_index, shard_count = _process_defaults(shard_index, shard_count)
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise TypeError(f"records must be a sequence of dicts, got {type(records).__name__}")
    if len(records) == 0:
        raise ValueError("records is empty: nothing to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count), got {shard_index} of {shard_count}")
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by shard_count={shard_count}")
    if num_chunks < 1 or (shard_count > 1 and batch_size % (num_chunks * shard_count)):
        raise ValueError(
            f"batch_size={batch_size} must be divisible by num_chunks={num_chunks} x shard_count={shard_count}"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if drop_remainder and num_epochs is not None and len(records) * num_epochs < batch_size:
        raise ValueError(f"{len(records)} records x {num_epochs} epochs is less than one batch of {batch_size}")

    ds = grain.MapDataset.source(list(records))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)  # reseeds the shuffle every epoch
    if shard_count == 1:
        return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    # Whole global batches, then this process's rows of each: the same stream as one process.
    chunk = batch_size // num_chunks
    per = chunk // shard_count
    rows = [c * chunk + shard_index * per + j for c in range(num_chunks) for j in range(per)]
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
    return ds.map(lambda batch: batch_fn([batch[i] for i in rows]))


def make_prompt_dataset(records: Sequence[dict], **kwargs) -> grain.DatasetIterator:
    """The training iterator over ``prompt_batches(records, **kwargs)``: ``next(it)`` is a batch.

    It reads in the calling thread (records are in memory; reader threads would only contend for the
    GIL). ``it.get_state()`` / ``it.set_state()`` checkpoint its position (see the module docstring).
    """
    ds = prompt_batches(records, **kwargs)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


make_prompt_iterator = make_prompt_dataset
