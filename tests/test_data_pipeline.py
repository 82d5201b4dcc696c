"""The grain prompt pipeline: deterministic per-epoch shuffles, sharding, and checkpointable position."""

import json

import pytest

from conspo_jax.data.pipeline import make_prompt_dataset, prompt_batches

RECS = [{"id": str(i), "problem": f"p{i}", "answer": str(i)} for i in range(24)]


def ids(batches):
    return [[r["id"] for r in b] for b in batches]


def test_epochs_shuffle_determinism_and_drop_remainder():
    ds = prompt_batches(RECS, batch_size=6, seed=7, num_epochs=3, shard_index=0, shard_count=1)
    assert len(ds) == 12
    batches = ids(ds)
    assert all(len(b) == 6 for b in batches) and isinstance(ds[0], list) and ds[0][0] in RECS
    epochs = [sum(batches[4 * e : 4 * e + 4], []) for e in range(3)]
    for e in epochs:
        assert sorted(e, key=int) == [r["id"] for r in RECS]  # each epoch is a permutation
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # reshuffled every epoch
    assert epochs[0] != [r["id"] for r in RECS]
    # Same seed, same stream; other seed, other stream.
    assert ids(prompt_batches(RECS, batch_size=6, seed=7, num_epochs=3, shard_index=0, shard_count=1)) == batches
    assert ids(prompt_batches(RECS, batch_size=6, seed=8, num_epochs=3, shard_index=0, shard_count=1)) != batches
    # No shuffle keeps the file order; drop_remainder drops the short last batch.
    plain = prompt_batches(RECS, batch_size=5, num_epochs=1, shuffle=False, shard_index=0, shard_count=1)
    assert ids(plain) == [[str(i) for i in range(j, j + 5)] for j in range(0, 20, 5)]
    kept = prompt_batches(
        RECS, batch_size=5, num_epochs=1, shuffle=False, drop_remainder=False, shard_index=0, shard_count=1
    )
    assert ids(kept)[-1] == ["20", "21", "22", "23"]
    # Default sharding comes from jax (one process here).
    assert ids(prompt_batches(RECS, batch_size=6, seed=7, num_epochs=3)) == batches


def test_sharding_partitions_each_global_batch():
    full = ids(prompt_batches(RECS, batch_size=8, seed=1, num_epochs=2, shard_index=0, shard_count=1))
    shards = [
        ids(prompt_batches(RECS, batch_size=8, seed=1, num_epochs=2, shard_index=h, shard_count=4)) for h in range(4)
    ]
    assert all(len(s) == len(full) == 6 for s in shards)  # every process yields the same number of steps
    for step, global_batch in enumerate(full):
        assert sum((s[step] for s in shards), []) == global_batch
    # Uneven totals still give equal step counts (incomplete global batches are dropped).
    odd = [len(prompt_batches(RECS[:23], batch_size=4, seed=1, shard_index=h, shard_count=2)) for h in range(2)]
    assert odd == [5, 5]


def test_iterator_state_roundtrip_through_json():
    kw = dict(batch_size=4, seed=3, num_epochs=2, shard_index=0, shard_count=1)
    it = make_prompt_dataset(RECS, **kw)
    first = [next(it) for _ in range(3)]  # k batches
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (Orbax JsonSave)
    expected = [next(it) for _ in range(5)]  # m more
    fresh = make_prompt_dataset(RECS, **kw)
    fresh.set_state(state)
    assert ids(fresh_next := [next(fresh) for _ in range(5)]) == ids(expected)
    assert fresh_next == expected
    assert ids(first) == ids(prompt_batches(RECS, **kw)[i] for i in range(3))
    # Exhaustion after the last epoch.
    assert len(list(fresh)) == 12 - 8


def test_iterator_state_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    kw = dict(batch_size=4, seed=5, num_epochs=None, shard_index=0, shard_count=1)
    it = make_prompt_dataset(RECS, **kw)
    for _ in range(7):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(
            7,
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), state=ocp.args.JsonSave(it.get_state())),
        )
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        fresh = make_prompt_dataset(RECS, **kw)
        restored = mngr.restore(
            7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh), state=ocp.args.JsonRestore())
        )
    assert [next(restored.data) for _ in range(3)] == expected
    other = make_prompt_dataset(RECS, **kw)
    other.set_state(restored.state)
    assert [next(other) for _ in range(3)] == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(batch_size=6, shard_count=4, shard_index=0), "batch_size=6 must be divisible by shard_count=4"),
        (dict(batch_size=4, shard_count=2, shard_index=2), r"shard_index must be in \[0, shard_count\), got 2 of 2"),
        (dict(batch_size=4, num_epochs=0), "num_epochs must be >= 1 or None, got 0"),
        (dict(batch_size=4, seed=-1), "seed must be in"),
        (dict(batch_size=100), "24 records x 1 epochs is less than one batch of 100"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"shard_index": 0, "shard_count": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        prompt_batches(RECS, **kwargs)


def test_bad_records():
    with pytest.raises(ValueError, match="records is empty"):
        prompt_batches([], batch_size=1, shard_index=0, shard_count=1)
    with pytest.raises(TypeError, match="records must be a sequence of dicts"):
        prompt_batches("abc", batch_size=1, shard_index=0, shard_count=1)


def test_num_chunks_gives_each_process_its_slice_of_every_micro_batch():
    full = ids(prompt_batches(RECS, batch_size=8, seed=1, num_epochs=2, shard_index=0, shard_count=1))
    shards = [
        ids(prompt_batches(RECS, batch_size=8, seed=1, num_epochs=2, shard_index=h, shard_count=2, num_chunks=2))
        for h in range(2)
    ]
    for step, global_batch in enumerate(full):
        # chunk c of the global batch = process 0's half c + process 1's half c
        for c in range(2):
            assert (
                shards[0][step][2 * c : 2 * c + 2] + shards[1][step][2 * c : 2 * c + 2]
                == global_batch[4 * c : 4 * c + 4]
            )
    with pytest.raises(ValueError, match="num_chunks=3"):
        prompt_batches(RECS, batch_size=8, shard_index=0, shard_count=2, num_chunks=3)
