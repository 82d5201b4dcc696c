"""Group (segment) primitives every objective is built from.

A batch is flat: R rollouts, each with a group id below a static ``num_groups``. Group sizes vary and
groups may be empty (padding, or a micro-batch that holds a subset of the groups), so every reduction
here is a masked segment reduction with a safe value for empty groups. Nothing loops over groups in
Python, so everything traces once under ``jax.jit`` for fixed shapes.

The "double where" idiom recurs: an entry that is masked out is first replaced by a harmless value
*before* the nonlinear op (exp, log, divide), then masked again after it. A single ``where`` after the op
is not enough: its backward pass multiplies a zero cotangent by an inf/NaN partial and yields NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_bool(mask: jax.Array) -> jax.Array:
    """Accepts bool or numeric 0/1 masks."""
    return mask if mask.dtype == jnp.bool_ else mask != 0


def rollout_validity(rewards_R: jax.Array, rollout_mask_R: jax.Array | None) -> jax.Array:
    """Bool [R]: which rollouts are real (not padding)."""
    if rollout_mask_R is None:
        return jnp.ones(rewards_R.shape, dtype=jnp.bool_)
    return as_bool(rollout_mask_R)


def group_sum(x_R: jax.Array, group_ids_R: jax.Array, num_groups: int) -> jax.Array:
    """[G] sums; the caller masks x (entries outside any valid set must already be zero)."""
    return jax.ops.segment_sum(x_R, group_ids_R, num_segments=num_groups)


def group_count(mask_R: jax.Array, group_ids_R: jax.Array, num_groups: int, dtype=jnp.float32) -> jax.Array:
    """[G] number of rollouts with ``mask_R`` true, as ``dtype`` (float so it divides without casts)."""
    return group_sum(as_bool(mask_R).astype(dtype), group_ids_R, num_groups)


def group_max(x_R: jax.Array, mask_R: jax.Array, group_ids_R: jax.Array, num_groups: int) -> jax.Array:
    """[G] masked max; -inf for groups with no selected entry."""
    filled = jnp.where(mask_R, x_R, -jnp.inf)
    return jax.ops.segment_max(filled, group_ids_R, num_segments=num_groups)


def group_min(x_R: jax.Array, mask_R: jax.Array, group_ids_R: jax.Array, num_groups: int) -> jax.Array:
    """[G] masked min; +inf for groups with no selected entry."""
    filled = jnp.where(mask_R, x_R, jnp.inf)
    return jax.ops.segment_min(filled, group_ids_R, num_segments=num_groups)


def group_logsumexp(
    x_R: jax.Array, mask_R: jax.Array, group_ids_R: jax.Array, num_groups: int
) -> tuple[jax.Array, jax.Array]:
    """Masked per-group logsumexp, stable and NaN-free in value and gradient.

    Returns ``(lse_G, nonempty_G)``. For a group with no selected entry ``lse_G`` is 0 (a finite
    placeholder, never -inf) and ``nonempty_G`` is False: callers must mask such groups out, which keeps
    the gradient of every unselected entry exactly zero.
    """
    mask_R = as_bool(mask_R)
    shift_G = group_max(x_R, mask_R, group_ids_R, num_groups)
    # The shift only conditions the exponent; its gradient contribution cancels analytically.
    shift_G = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift_G), shift_G, 0.0))
    centred_R = jnp.where(mask_R, x_R - shift_G[group_ids_R], 0.0)
    exp_R = jnp.where(mask_R, jnp.exp(centred_R), 0.0)
    sum_G = group_sum(exp_R, group_ids_R, num_groups)
    nonempty_G = group_count(mask_R, group_ids_R, num_groups) > 0
    lse_G = jnp.where(nonempty_G, jnp.log(jnp.where(nonempty_G, sum_G, 1.0)) + shift_G, 0.0)
    return lse_G, nonempty_G


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0 (with a gradient that is 0, not NaN, where den == 0)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def mean_over_groups(value_G: jax.Array, include_G: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean of ``value_G`` over the included groups and that count (stop-gradient).

    Returns ``(mean, count)``; the mean is 0 when no group is included. ``count`` is the normaliser the
    trainer uses to combine micro-batches exactly.
    """
    count = jnp.sum(include_G.astype(value_G.dtype))
    total = jnp.sum(jnp.where(include_G, value_G, 0.0))
    return safe_div(total, count), jax.lax.stop_gradient(count)
