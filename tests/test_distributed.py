"""conspo_jax.base.distributed in one process: when start-up is asked for, its bad inputs, and the global /
local array helpers (the two-process behaviour is tests/test_multiprocess.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conspo_jax.base import distributed
from conspo_jax.base.configs import UsageError
from conspo_jax.train.config_base import base_config

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_not_asked_is_a_no_op(clean_env):
    assert distributed.initialize(base_config()) is False
    assert distributed.initialize(None) is False
    assert distributed.process_count() == 1 and distributed.is_primary()


@pytest.mark.parametrize(
    "env, overrides, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES must be an"),
        ({}, {"coordinator": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, r"process_id=2 must be in \[0, 2\)"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_PROCESS_ID": "x"}, {}, "JAX_PROCESS_ID must be an integer"),
    ],
)
def test_bad_start_up_values_name_the_field(clean_env, env, overrides, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    c = base_config()
    c.distributed.update(overrides)
    with pytest.raises(UsageError, match=message):
        distributed.initialize(c)


def test_global_and_local_round_trip_in_one_process():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    x_RxC = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    sharded = distributed.to_global(x_RxC, NamedSharding(mesh, PartitionSpec("data")))
    replicated = distributed.to_global(x_RxC, NamedSharding(mesh, PartitionSpec()))
    assert sharded.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(distributed.to_local(sharded), x_RxC)
    np.testing.assert_array_equal(distributed.to_local(replicated), x_RxC)
    np.testing.assert_array_equal(distributed.allgather_ints([3, 4]), [[3, 4]])
    assert distributed.allgather({"a": 1}) == [{"a": 1}]
    np.testing.assert_array_equal(distributed.gather_rows(x_RxC), x_RxC)
