"""The jitted programs of a training run, built from the config's shapes before the first rollout.

- ``example_batch``: the ``RLBatch`` of ``jax.ShapeDtypeStruct``s every micro-batch stack has;
- ``build_step_fn``: the RL update (``conspo_jax.train.step.make_train_step``) with the run's objective,
  optimizer and reference policy closed over;
- ``build_old_logp_fn``: old-policy log-probs of a micro-batch stack (objectives that use them, with
  more than one mini-batch per step).

The trainer builds its programs here, and so does ``conspo profile`` (``conspo_jax.profiling.command``),
which can hand them abstract state (``jax.ShapeDtypeStruct`` leaves) to compile a GPU-sized run on a CPU
without allocating it: what is profiled is always what is trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from conspo_jax.objectives import get_objective
from conspo_jax.train.batching import RLBatch, micro_batch_layout
from conspo_jax.train.step import make_logprob_fn, make_train_step


def example_batch(config, *, needs_old_logp: bool) -> RLBatch:
    """The shapes every micro-batch stack has, fixed by the config before any rollout."""
    r, t = config.rollout, config.train
    num_micro, g_micro = micro_batch_layout(
        r.prompts_per_step, mini_batches=t.mini_batches, micro_batch_groups=t.micro_batch_groups
    )
    rows, width = g_micro * r.n, config.data.max_prompt_len + r.max_new_tokens
    f32, i32 = jnp.float32, jnp.int32

    def spec(*shape, dtype=f32):
        return jax.ShapeDtypeStruct((num_micro, rows, *shape), dtype)

    return RLBatch(
        input_ids=spec(width, dtype=i32),
        attention_mask=spec(width, dtype=i32),
        completion_mask=spec(r.max_new_tokens),
        engine_logp=spec(r.max_new_tokens),
        rewards=spec(),
        group_ids=spec(dtype=i32),
        rollout_mask=spec(),
        old_logp=spec(r.max_new_tokens) if needs_old_logp else None,
        group_size=r.n,
    )


def objective_of(config):
    """(the registered objective, its hyperparameters from ``config.objective.<name>``)."""
    name = config.objective.name
    return get_objective(name), dict(config.objective[name]) if name in config.objective else {}


def uses_old_logp(config) -> bool:
    """Whether micro-batches carry old-policy log-probs: objectives that use them, over several updates."""
    return get_objective(config.objective.name).uses_old_logp and config.train.mini_batches > 1


def build_step_fn(config, state, example: RLBatch, mesh, graphdef, rest, ref_params, optimizer):
    """``step(state, micro_batches, progress, rest, ref_params) -> (state, metrics)``, the state donated;
    the objective and its hyperparameters are the config's."""
    objective_fn, objective_kwargs = objective_of(config)
    return make_train_step(
        state,
        example,
        mesh,
        rest=rest,
        ref_params=ref_params,
        graphdef=graphdef,
        objective=lambda inputs, **kw: objective_fn(inputs, **kw, **objective_kwargs),
        num_groups=example.num_groups,
        prompt_len=config.data.max_prompt_len,
        optimizer=optimizer,
        tis_cap=float(config.rollout.tis_cap),
    )


def build_old_logp_fn(graphdef, prompt_len: int, out_sharding):
    """``f(params, rest, ids_MxRxT, mask_MxRxT) -> logp_MxRxC``, left on the devices ``out_sharding`` names."""
    flat_fn = make_logprob_fn(graphdef, prompt_len)

    def stacked(params, rest, ids_MxRxT, mask_MxRxT):
        m, rows, width = ids_MxRxT.shape
        flat = flat_fn(params, rest, ids_MxRxT.reshape(-1, width), mask_MxRxT.reshape(-1, width))
        return flat.reshape(m, rows, -1)

    return jax.jit(stacked, out_shardings=out_sharding)
