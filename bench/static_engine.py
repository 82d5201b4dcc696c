"""The static-batch decode loop that conspo-jax's engine used before continuous batching (issue 13),
kept verbatim for bench/sampler.py's comparison: one jitted while_loop over all rows, attention over
every cache slot, sort-based top-p and `jax.random.categorical` sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conspo_jax.rollout.engine import FINISH_LENGTH, FINISH_STOP, Rollouts, SamplingParams
from conspo_jax.rollout.sampling import truncate_sorted

_MAX_STOP_IDS = 8


def sample_tokens(logits_RxV, key, temperature, top_p, top_k):
    """The old sampler: full-vocabulary sort for top-k/top-p, categorical draw, argmax for greedy."""
    logits_RxV = logits_RxV.astype(jnp.float32)
    greedy = temperature <= 0.0
    scaled_RxV = logits_RxV / jnp.where(greedy, 1.0, temperature)
    logp_RxV = jax.nn.log_softmax(scaled_RxV, axis=-1)
    needs_trunc = (top_p < 1.0) | (top_k > 0)
    filtered_RxV = jax.lax.cond(needs_trunc, truncate_sorted, lambda x, p, k: x, scaled_RxV, top_p, top_k)
    sampled_R = jax.random.categorical(key, filtered_RxV, axis=-1)
    tokens_R = jnp.where(greedy, jnp.argmax(logits_RxV, axis=-1), sampled_R).astype(jnp.int32)
    logprobs_R = jnp.take_along_axis(logp_RxV, tokens_R[:, None], axis=-1)[:, 0]
    return tokens_R, logprobs_R


def _decode(
    graphdef,
    state,
    prompt_RxQ,
    prompt_mask_RxQ,
    key,
    temperature,
    top_p,
    top_k,
    stop_ids,
    *,
    max_new,
    pad_id,
    cache_dtype,
):
    from conspo_jax.models import forward_cached, init_kv_cache, policy_logits

    policy = nnx.merge(graphdef, state)
    rows, plen = prompt_RxQ.shape
    slots = plen + max_new
    cache = init_kv_cache(policy.config, rows, slots, dtype=cache_dtype)
    kv_mask_RxS = jnp.zeros((rows, slots), bool).at[:, :plen].set(prompt_mask_RxQ.astype(bool))
    positions_RxQ = jnp.maximum(jnp.cumsum(prompt_mask_RxQ, axis=-1) - 1, 0).astype(jnp.int32)
    h_RxQxD, cache = forward_cached(policy, prompt_RxQ, positions_RxQ, cache, jnp.int32(0), kv_mask_RxS)
    logits_RxV = policy_logits(policy, h_RxQxD[:, -1:])[:, 0]
    next_pos_R = positions_RxQ[:, -1] + 1

    def cond(carry):
        i, *_, done_R, _ = carry
        return (i < max_new) & ~jnp.all(done_R)

    def body(carry):
        i, cache, logits_RxV, key, ids_RxC, logp_RxC, lens_R, kv_mask_RxS, pos_R, done_R, stopped_R = carry
        key, sub = jax.random.split(key)
        tok_R, logp_R = sample_tokens(logits_RxV, sub, temperature, top_p, top_k)
        tok_R = jnp.where(done_R, pad_id, tok_R)
        ids_RxC = jax.lax.dynamic_update_slice(ids_RxC, tok_R[:, None], (0, i))
        logp_RxC = jax.lax.dynamic_update_slice(logp_RxC, jnp.where(done_R, 0.0, logp_R)[:, None], (0, i))
        lens_R = lens_R + (~done_R).astype(jnp.int32)
        hit_R = jnp.any(tok_R[:, None] == stop_ids[None, :], axis=-1) & ~done_R
        stopped_R = stopped_R | hit_R
        done_R = done_R | hit_R
        kv_mask_RxS = jax.lax.dynamic_update_slice(kv_mask_RxS, jnp.ones((rows, 1), bool), (0, plen + i))
        h_Rx1xD, cache = forward_cached(policy, tok_R[:, None], pos_R[:, None], cache, plen + i, kv_mask_RxS)
        logits_RxV = policy_logits(policy, h_Rx1xD)[:, 0]
        return i + 1, cache, logits_RxV, key, ids_RxC, logp_RxC, lens_R, kv_mask_RxS, pos_R + 1, done_R, stopped_R

    carry = (
        jnp.int32(0),
        cache,
        logits_RxV,
        key,
        jnp.full((rows, max_new), pad_id, jnp.int32),
        jnp.zeros((rows, max_new), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
        kv_mask_RxS,
        next_pos_R,
        jnp.zeros((rows,), bool),
        jnp.zeros((rows,), bool),
    )
    out = jax.lax.while_loop(cond, body, carry)
    ids_RxC, logp_RxC, lens_R, stopped_R = out[4], out[5], out[6], out[10]
    return ids_RxC, logp_RxC, lens_R, stopped_R


class StaticEngine:
    """The old JaxEngine's generate over one policy (fp32 weights, cast every step), without a mesh."""

    def __init__(self, policy, *, eos_token_ids, pad_id=0, prompt_bucket=32, cache_dtype=jnp.bfloat16):
        self.graphdef, self.state = nnx.split(policy)
        self.eos_token_ids = tuple(int(t) for t in np.atleast_1d(eos_token_ids))
        self.pad_id, self.bucket, self.cache_dtype, self.version = pad_id, prompt_bucket, cache_dtype, 0
        self._compiled = {}

    def _fn(self, max_new):
        if max_new not in self._compiled:
            self._compiled[max_new] = jax.jit(
                functools.partial(
                    _decode, self.graphdef, max_new=max_new, pad_id=self.pad_id, cache_dtype=self.cache_dtype
                )
            )
        return self._compiled[max_new]

    def _place(self, x):
        return jnp.asarray(x)

    def generate(self, prompts, params: SamplingParams) -> Rollouts:
        prompts = [list(p) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("JaxEngine.generate: every prompt needs at least one token")
        stop = (*self.eos_token_ids, *params.stop_token_ids)[:_MAX_STOP_IDS]
        stop_ids = np.full((_MAX_STOP_IDS,), -1, np.int32)
        stop_ids[: len(stop)] = stop
        plen = -(-max(map(len, prompts)) // self.bucket) * self.bucket
        rows = len(prompts) * params.n
        prompt_RxQ = np.full((rows, plen), self.pad_id, np.int32)
        mask_RxQ = np.zeros((rows, plen), np.int32)
        for p, toks in enumerate(prompts):
            prompt_RxQ[p * params.n : (p + 1) * params.n, plen - len(toks) :] = toks
            mask_RxQ[p * params.n : (p + 1) * params.n, plen - len(toks) :] = 1
        ids, logp, lens, stopped = self._fn(params.max_new_tokens)(
            self.state,
            self._place(prompt_RxQ),
            self._place(mask_RxQ),
            jax.random.key(params.seed),
            jnp.float32(params.temperature),
            jnp.float32(params.top_p),
            jnp.int32(params.top_k),
            jnp.asarray(stop_ids),
        )
        ids, logp, lens, stopped = jax.device_get((ids, logp, lens, stopped))
        return Rollouts(
            completion_ids_RxC=np.asarray(ids, np.int32),
            completion_lens_R=np.asarray(lens, np.int32),
            logprobs_RxC=np.asarray(logp, np.float32),
            finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in stopped],
            group_ids_R=np.repeat(np.arange(len(prompts), dtype=np.int32), params.n),
            weight_version=self.version,
            pad_id=self.pad_id,
        )
