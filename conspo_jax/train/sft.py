"""Supervised warm start: a short next-token phase on (prompt, target) pairs before RL.

The synthetic demo starts from random weights, where every rollout fails and no group has both a
correct and an incorrect rollout, so a contrastive (or any group-relative) objective has nothing to
learn from. A brief, deliberately incomplete supervised phase brings the pass rate strictly between 0
and 1; RL then has to do the rest. Real checkpoints skip this (``sft.steps = 0``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conspo_jax.models import token_logprobs


def _sft_loss(params, graphdef, rest, ids, attn, target_mask):
    model = nnx.merge(graphdef, params, rest)
    logp = token_logprobs(model, ids, attn)
    return -jnp.sum(logp * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)


@functools.partial(jax.jit, static_argnums=(2, 5), donate_argnums=(0, 1))
def _sft_step(params, opt_state, graphdef, rest, batch, optimizer):
    loss, grads = jax.value_and_grad(_sft_loss)(params, graphdef, rest, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def encode_sft(records, encode, target, tokenizer, width: int):
    """[N, width] ids / attention / target-token masks (targets end with EOS)."""
    n = len(records)
    ids = np.full((n, width), tokenizer.pad_token_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    tmask = np.zeros((n, width - 1), np.float32)
    for i, r in enumerate(records):
        p = encode(r)
        t = tokenizer(target(r))["input_ids"] + [tokenizer.eos_token_id]
        seq = (p + t)[:width]
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        tmask[i, len(p) - 1 : len(seq) - 1] = 1.0  # logp index j predicts token j+1
    return ids, attn, tmask


def warm_start(
    graphdef,
    params,
    rest,
    records,
    encode,
    target,
    tokenizer,
    *,
    steps,
    lr,
    batch_size,
    warmup_steps,
    seed,
    width,
    mesh=None,
    log=None,
):
    """Runs ``steps`` AdamW steps of supervised training; returns the new params."""
    ids, attn, tmask = encode_sft(records, encode, target, tokenizer, width)
    from conspo_jax.train.step import warmup_then_constant

    optimizer = optax.adamw(warmup_then_constant(lr, max(warmup_steps, 1)), weight_decay=0.0)
    opt_state = jax.jit(optimizer.init)(params)
    if mesh is not None:  # commit every leaf to the mesh so the donated step never recompiles
        from conspo_jax.train.step import state_shardings

        opt_state = jax.device_put(opt_state, state_shardings(opt_state, mesh))
    rng = np.random.default_rng(seed)
    for s in range(steps):
        idx = rng.choice(len(records), size=batch_size, replace=False)
        batch = (jnp.asarray(ids[idx]), jnp.asarray(attn[idx]), jnp.asarray(tmask[idx]))
        params, opt_state, loss = _sft_step(params, opt_state, graphdef, rest, batch, optimizer)
        if log is not None and (s + 1) % 25 == 0:
            log(s + 1, float(loss))
    return params
