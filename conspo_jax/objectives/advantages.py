"""Group statistics: positive/negative splits, valid groups and group-relative advantages (Eq. 1).

All outputs here are functions of rewards and masks only, so they are stop-gradient by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from conspo_jax.objectives.segments import (
    group_count,
    group_max,
    group_min,
    group_sum,
    rollout_validity,
    safe_div,
)


class GroupSplit(NamedTuple):
    """Which rollouts are positive/negative and which groups can be contrasted.

    is_pos_R / is_neg_R: bool [R], only real (non-padding) rollouts.
    n_pos_G / n_neg_G:   float [G] counts N+ and N-.
    n_G:                 float [G] real rollouts per group (G_q).
    valid_G:             bool [G], N+ >= 1 and N- >= 1 (a group that can be contrasted).
    nonempty_G:          bool [G], at least one real rollout.
    """

    is_pos_R: jax.Array
    is_neg_R: jax.Array
    n_pos_G: jax.Array
    n_neg_G: jax.Array
    n_G: jax.Array
    valid_G: jax.Array
    nonempty_G: jax.Array


def split_groups(
    rewards_R: jax.Array,
    group_ids_R: jax.Array,
    num_groups: int,
    *,
    rollout_mask_R: jax.Array | None = None,
    reward_threshold: float = 0.5,
    dtype=jnp.float32,
) -> GroupSplit:
    """Positives are real rollouts with reward > ``reward_threshold``; negatives the other real ones."""
    valid_R = rollout_validity(rewards_R, rollout_mask_R)
    is_pos_R = valid_R & (rewards_R > reward_threshold)
    is_neg_R = valid_R & ~is_pos_R
    n_pos_G = group_count(is_pos_R, group_ids_R, num_groups, dtype)
    n_neg_G = group_count(is_neg_R, group_ids_R, num_groups, dtype)
    n_G = n_pos_G + n_neg_G
    return GroupSplit(
        is_pos_R=is_pos_R,
        is_neg_R=is_neg_R,
        n_pos_G=n_pos_G,
        n_neg_G=n_neg_G,
        n_G=n_G,
        valid_G=(n_pos_G > 0) & (n_neg_G > 0),
        nonempty_G=n_G > 0,
    )


STD_ESTIMATORS = ("population", "unbiased")
SINGLETON_RULES = ("zero", "reward")


def check_advantage_options(owner: str, *, std_estimator: str, singleton: str, std_eps=0.0) -> None:
    """One clear error for a bad advantage option (they are static Python values)."""
    if std_estimator not in STD_ESTIMATORS:
        raise ValueError(f"{owner}: std_estimator must be one of {STD_ESTIMATORS}, got {std_estimator!r}")
    if singleton not in SINGLETON_RULES:
        raise ValueError(f"{owner}: singleton must be one of {SINGLETON_RULES}, got {singleton!r}")
    if isinstance(std_eps, (int, float)) and not std_eps >= 0:
        raise ValueError(f"{owner}: std_eps must be >= 0, got {std_eps!r}")


def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    num_groups: int,
    *,
    rollout_mask: jax.Array | None = None,
    normalize_std: bool = True,
    std_estimator: str = "population",
    std_eps: float = 0.0,
    singleton: str = "zero",
) -> jax.Array:
    """Group-relative advantages.

    ``normalize_std=True`` is Eq. 1: A_i = (r_i - mean_q) / (std_q + std_eps). The paper's choice (the
    default) is the *population* std (1/G) with std_eps = 0: torch.std's default Bessel correction would
    break Proposition 1's identity. ``std_estimator="unbiased"`` divides by G - 1 instead, as verl and TRL
    do (with std_eps 1e-6 and 1e-4; see objectives/peers.py).
    ``normalize_std=False`` is Dr. GRPO's A_i = r_i - mean_q.

    A group whose rewards are all equal gets A = 0 exactly; padding rollouts get 0. The all-equal test
    uses max == min rather than std == 0, since the float std of equal non-binary rewards can come out
    as 1e-17 and dividing by it would produce garbage advantages. Deviations below sqrt(float tiny)
    (~1e-19 in float32) also count as equal: XLA may fuse the divisions below into one by a product
    that would underflow (on CPU, to zero, as subnormals are flushed) and turn the advantage into inf.

    A one-rollout group is all-equal, so ``singleton="zero"`` (the paper) gives it A = 0;
    ``singleton="reward"`` is verl's rule (mean 0, std 1): A = r / (1 + std_eps), or r without std.
    """
    check_advantage_options("group_advantages", std_estimator=std_estimator, singleton=singleton, std_eps=std_eps)
    dtype = jnp.result_type(rewards.dtype, jnp.float32)
    rewards = rewards.astype(dtype)
    valid_R = rollout_validity(rewards, rollout_mask)
    n_G = group_count(valid_R, group_ids, num_groups, dtype)
    mean_G = safe_div(group_sum(jnp.where(valid_R, rewards, 0.0), group_ids, num_groups), n_G)
    centred_R = jnp.where(valid_R, rewards - mean_G[group_ids], 0.0)
    spread_G = group_max(rewards, valid_R, group_ids, num_groups) > group_min(rewards, valid_R, group_ids, num_groups)
    dev_G = group_max(jnp.abs(centred_R), valid_R, group_ids, num_groups)
    active_G = spread_G & (dev_G > jnp.sqrt(jnp.finfo(dtype).tiny))
    if normalize_std:
        safe_dev_G = jnp.where(active_G, dev_G, 1.0)
        unit_R = centred_R / safe_dev_G[group_ids]  # |unit| <= 1, max |unit| == 1
        dof_G = n_G if std_estimator == "population" else n_G - 1.0  # an active group has n_G >= 2
        var_G = safe_div(group_sum(unit_R**2, group_ids, num_groups), dof_G)  # >= 1/G_q where active
        # (r - mean) / (std + eps) = unit / (std / dev + eps / dev), with std / dev = sqrt(var of unit)
        denom_G = jnp.sqrt(jnp.where(active_G, var_G, 1.0)) + std_eps / safe_dev_G
        adv_R = unit_R / denom_G[group_ids]
    else:
        adv_R = centred_R
    active_R = valid_R & active_G[group_ids]
    adv_R = jnp.where(active_R, adv_R, 0.0)
    if singleton == "reward":
        single_R = valid_R & (n_G == 1)[group_ids]
        adv_R = jnp.where(single_R, rewards / (1.0 + std_eps) if normalize_std else rewards, adv_R)
    return jax.lax.stop_gradient(adv_R)
