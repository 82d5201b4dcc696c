"""The jitted RL update: gradient accumulation over whole-group micro-batches, one optimizer step.

Group-contrastive objectives couple the rollouts of a group, so micro-batches always hold whole
groups. Each objective reports the count its value is averaged over (``aux['normalizer']``: valid
groups, or tokens for token-level aggregation); micro-batch values are recombined with those counts,
which makes the accumulated gradient exactly that of the whole mini-batch. The train state is donated.
A non-finite loss or gradient leaves parameters and optimizer state untouched (``optax.apply_if_finite``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from conspo_jax.models import token_logprobs
from conspo_jax.objectives import ObjectiveInputs, tis_weights
from conspo_jax.train.batching import RLBatch, build_rl_batch

_SCHEDULE_KEYS = ("margin",)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so it checkpoints like any array


def warmup_then_constant(lr, warmup_steps):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then constant (the paper's RL schedule)."""
    warm = max(int(warmup_steps), 0)
    if not warm:
        return lr
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])


def make_optimizer(lr, *, warmup_steps, weight_decay, b1, b2, eps, grad_clip):
    """AdamW on ``warmup_then_constant`` with global-norm clipping; non-finite updates are skipped."""
    chain = optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.adamw(warmup_then_constant(lr, warmup_steps), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
    return optax.apply_if_finite(chain, max_consecutive_errors=2**30)


def completion_logprobs(graphdef, params, rest, input_ids, attention_mask, prompt_len):
    """Trainer log-probs of the completion tokens: [R, T - prompt_len]."""
    model = nnx.merge(graphdef, params, rest)
    logp_RxT1 = token_logprobs(model, input_ids, attention_mask)
    return logp_RxT1[:, prompt_len - 1 :]


def _micro_objective(
    params, mb: RLBatch, progress, rest, ref_params, *, graphdef, objective, num_groups, prompt_len, tis_cap
):
    logp_RxC = completion_logprobs(graphdef, params, rest, mb.input_ids, mb.attention_mask, prompt_len)
    if tis_cap > 0:
        # Truncated importance sampling for engine/trainer mismatch: scale each token's gradient by
        # min(pi_trainer / pi_engine, cap) while leaving every value (and so every metric) unchanged.
        sg = jax.lax.stop_gradient(logp_RxC)
        w = jax.lax.stop_gradient(tis_weights(sg, mb.engine_logp, mb.completion_mask, tis_cap))
        logp_RxC = sg + w * (logp_RxC - sg)
    old = mb.old_logp if mb.old_logp is not None else jax.lax.stop_gradient(logp_RxC)
    ref = None
    if ref_params is not None:
        ref = jax.lax.stop_gradient(
            completion_logprobs(graphdef, ref_params, rest, mb.input_ids, mb.attention_mask, prompt_len)
        )
    inputs = ObjectiveInputs(
        token_logp=logp_RxC,
        old_logp=old,
        mask=mb.completion_mask,
        rewards=mb.rewards,
        group_ids=mb.group_ids,
        rollout_mask=mb.rollout_mask,
        ref_logp=ref,
    )
    value, aux = objective(inputs, num_groups=num_groups, progress=progress)
    n = jax.lax.stop_gradient(aux["normalizer"]).astype(jnp.float32)
    mask = mb.completion_mask
    mismatch = jnp.sum(jnp.abs(jax.lax.stop_gradient(logp_RxC) - mb.engine_logp) * mask)
    aux = {k: v for k, v in aux.items() if k != "normalizer"}
    return -value * n, (value, n, aux, mismatch, jnp.sum(mask))


def train_step(
    state: TrainState,
    micro_batches,
    progress,
    rest,
    ref_params=None,
    *,
    graphdef,
    objective,
    num_groups,
    prompt_len,
    optimizer,
    tis_cap=0.0,
):
    """One optimizer update over micro-batches stacked on a leading axis [M, rows, ...].

    ``rest`` is the policy's non-parameter state; ``ref_params`` the frozen reference policy (KL terms).
    """
    loss_fn = functools.partial(
        _micro_objective,
        graphdef=graphdef,
        objective=objective,
        num_groups=num_groups,
        prompt_len=prompt_len,
        tis_cap=tis_cap,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, mb):
        (_, (value, n, aux, mismatch, ntok)), grads = grad_fn(state.params, mb, progress, rest, ref_params)
        g_acc, v_acc, n_acc, aux_acc, mm_acc, tok_acc = acc
        g_acc = jax.tree.map(jnp.add, g_acc, grads)
        aux_acc = jax.tree.map(lambda a, b: a + b * n, aux_acc, aux)
        return (g_acc, v_acc + value * n, n_acc + n, aux_acc, mm_acc + mismatch, tok_acc + ntok), {
            k: aux[k] for k in _SCHEDULE_KEYS if k in aux
        }

    first = jax.tree.map(lambda x: x[0], micro_batches)
    aux_shape = jax.eval_shape(lambda: loss_fn(state.params, first, progress, rest, ref_params)[1][2])
    init = (
        jax.tree.map(jnp.zeros_like, state.params),
        jnp.float32(0),
        jnp.float32(0),
        jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape),
        jnp.float32(0),
        jnp.float32(0),
    )
    (g_sum, v_sum, n_sum, aux_sum, mm_sum, tok_sum), aux_all = jax.lax.scan(body, init, micro_batches)
    aux_last = {k: v[-1] for k, v in aux_all.items()}
    denom = jnp.maximum(n_sum, 1e-9)
    grads = jax.tree.map(lambda g: g / denom, g_sum)  # d(-J)/dtheta of the whole mini-batch
    value = jnp.where(n_sum > 0, v_sum / denom, 0.0)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(value) & jnp.isfinite(optax.global_norm(grads))
    metrics = {
        f"objective/{k}": jnp.where(n_sum > 0, v / denom, 0.0) for k, v in aux_sum.items() if k not in _SCHEDULE_KEYS
    }
    # Schedule values (the margin) are the same in every micro-batch, valid groups or not.
    metrics.update({f"objective/{k}": v for k, v in aux_last.items()})
    metrics.update(
        {
            "loss": -value,
            "objective/value": value,
            "objective/normalizer": n_sum,
            "grad_norm": optax.global_norm(grads),
            "nonfinite": (~finite).astype(jnp.int32),
            "rollout/logp_mismatch": mm_sum / jnp.maximum(tok_sum, 1.0),
        }
    )
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def init_train_state(params, optimizer, rng_key, mesh) -> TrainState:
    """The initial state, every leaf committed to ``mesh`` (params keep their shardings, the rest is
    replicated), so the donated state and the step's outputs always agree and nothing recompiles."""
    opt_state = jax.jit(optimizer.init)(params)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=jax.random.key_data(rng_key))
    return jax.device_put(state, state_shardings(state, mesh))


def state_shardings(state, mesh):
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        sharding = getattr(x, "sharding", None)
        return sharding if isinstance(sharding, NamedSharding) and sharding.mesh == mesh else replicated

    return jax.tree.map(one, state)


def micro_batch_shardings(batch, mesh):
    """[M, rows, ...] arrays (or their ShapeDtypeStructs): rows over the data axes when they divide
    evenly, else replicated."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in axes)

    def one(x):
        ok = axes and x.shape[1] % shards == 0
        return NamedSharding(mesh, PartitionSpec(None, axes) if ok else PartitionSpec())

    return jax.tree.map(one, batch)


def make_train_step(state, example_batch, mesh, *, rest, ref_params=None, **static):
    """``jit(train_step)`` with explicit in/out shardings, the graph, objective and optimizer closed
    over, and the state donated. Call it as ``step(state, micro_batches, progress, rest, ref_params)``.

    ``example_batch`` fixes the input shardings: an ``RLBatch`` of [M, rows, ...] arrays or of
    ``jax.ShapeDtypeStruct``s (the trainer builds it from the config before the first rollout)."""
    s_shard = state_shardings(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(train_step, **static),
        donate_argnums=0,
        in_shardings=(
            s_shard,
            micro_batch_shardings(example_batch, mesh),
            replicated,
            state_shardings(rest, mesh),
            state_shardings(ref_params, mesh),
        ),
        out_shardings=(s_shard, replicated),
    )


def make_logprob_fn(graphdef, prompt_len):
    """Jitted ``f(params, rest, ids, mask)``: completion log-probs (old-policy log-probs before updates)."""
    return jax.jit(lambda params, rest, ids, mask: completion_logprobs(graphdef, params, rest, ids, mask, prompt_len))


def trainer_logprobs(policy, prompts, rollouts) -> np.ndarray:
    """Log-probs of every completion token under ``policy`` [R, C], computed exactly as the update does:
    left-padded prompts through ``build_rl_batch`` and ``completion_logprobs`` (0 on padding).

    Compare with ``rollouts.logprobs_RxC`` to measure an engine's mismatch with the trainer.
    """
    prompt_len = max(map(len, prompts))
    batch = build_rl_batch(
        prompts,
        rollouts,
        np.zeros(rollouts.num_rows, np.float32),
        prompt_len=prompt_len,
        completion_len=rollouts.completion_ids_RxC.shape[1],
        pad_id=rollouts.pad_id,
        group_size=rollouts.num_rows // len(prompts),
    )
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    logp = jax.jit(completion_logprobs, static_argnums=(0, 5))(
        graphdef, params, rest, batch.input_ids, batch.attention_mask, prompt_len
    )
    return np.asarray(logp) * batch.completion_mask
