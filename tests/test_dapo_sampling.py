"""DAPO's collect-stage helpers: dynamic sampling over generation rounds and overlong reward shaping."""

import numpy as np
import pytest

from conspo_jax.objectives import fill_batch_with_varied_groups, resolve_dapo_rollout, shape_overlong_rewards
from conspo_jax.objectives.dapo_sampling import varied_groups

nan = float("nan")


def test_varied_groups_drops_all_equal_and_single_rollout_groups():
    r = [[1, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.2], [1, nan, nan], [1, 1, nan], [0, nan, 1]]
    assert varied_groups(r).tolist() == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match=r"\[groups, n\]"):
        varied_groups([1, 0])


def test_fill_batch_takes_varied_groups_in_order_until_full():
    round0 = [[1, 1], [0, 1], [0, 0], [1, 0]]  # 2 varied of 4
    round1 = [[0, 0], [1, 0], [1, 1], [0, 1]]  # 2 varied of 4
    round2 = [[0, 1], [1, 0]]
    fill = fill_batch_with_varied_groups([round0], target_groups=3)
    assert fill.selected == [(0, 1), (0, 3)] and not fill.full and fill.rounds == 1
    assert (fill.generated, fill.dropped, fill.dropped_frac) == (4, 2, 0.5)
    fill = fill_batch_with_varied_groups([round0, round1, round2], target_groups=3)
    # Full after round 1 (its group 1); round 2 was not needed and is not counted.
    assert fill.selected == [(0, 1), (0, 3), (1, 1)] and fill.full
    assert (fill.rounds, fill.generated, fill.dropped) == (2, 8, 4)
    assert fill_batch_with_varied_groups([], target_groups=1) == ([], False, 0, 0, 0, 0.0)
    with pytest.raises(ValueError, match="target_groups"):
        fill_batch_with_varied_groups([round0], target_groups=0)


def test_dapo_options_are_on_by_default_only_for_dapo():
    assert resolve_dapo_rollout("dapo", dynamic_sampling="auto", overlong_buffer=-1, max_new_tokens=20480) == (
        True,
        4096,
    )
    assert resolve_dapo_rollout("grpo", dynamic_sampling="auto", overlong_buffer=-1, max_new_tokens=20480) == (
        False,
        0,
    )
    assert resolve_dapo_rollout("grpo", dynamic_sampling="on", overlong_buffer=512, max_new_tokens=4096) == (True, 512)
    assert resolve_dapo_rollout("dapo", dynamic_sampling="off", overlong_buffer=0, max_new_tokens=8) == (False, 0)
    with pytest.raises(ValueError, match="rollout.dynamic_sampling"):
        resolve_dapo_rollout("dapo", dynamic_sampling="yes", overlong_buffer=0, max_new_tokens=8)
    with pytest.raises(ValueError, match="rollout.overlong_buffer"):
        resolve_dapo_rollout("dapo", dynamic_sampling="on", overlong_buffer=9, max_new_tokens=8)


def test_overlong_shaping_is_dapo_eq_13():
    lengths = [100, 16384, 16385, 18432, 20480]
    shaped = shape_overlong_rewards([1, 1, 0, 1, 1], lengths, max_len=20480, buffer=4096)
    np.testing.assert_allclose(shaped, [1, 1, -1 / 4096, 0.5, 0.0], rtol=1e-6)
    half = shape_overlong_rewards([1, 1, 0, 1, 1], lengths, max_len=20480, buffer=4096, penalty=0.5)
    np.testing.assert_allclose(half, [1, 1, -0.5 / 4096, 0.75, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(shape_overlong_rewards([1, 0], [8, 8], max_len=8, buffer=0), [1, 0])
