"""Token sampling from logits: temperature, top-k and top-p, as pure jittable functions.

The returned log-prob is that of the sampled token under the temperature-scaled distribution *before*
top-k/top-p truncation (at temperature 1 that is the policy's own log-prob, which is what importance
ratios and the trainer/engine mismatch metric compare against). Greedy decoding (temperature 0) returns
the raw policy log-prob.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _truncate(scaled_RxV, top_p, top_k):
    """Sets to -inf every logit outside the top-k set and outside the top-p nucleus."""
    vocab = scaled_RxV.shape[-1]
    sorted_RxV = -jnp.sort(-scaled_RxV, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_R = jnp.take_along_axis(sorted_RxV, jnp.broadcast_to(k - 1, sorted_RxV.shape[:-1] + (1,)), axis=-1)
    sorted_RxV = jnp.where(sorted_RxV < kth_R, -jnp.inf, sorted_RxV)
    probs_RxV = jax.nn.softmax(sorted_RxV, axis=-1)
    # Keep a token if the mass strictly before it is < top_p: the smallest set reaching top_p.
    mass_before_RxV = jnp.cumsum(probs_RxV, axis=-1) - probs_RxV
    keep_RxV = mass_before_RxV < top_p
    cutoff_R = jnp.min(jnp.where(keep_RxV, sorted_RxV, jnp.inf), axis=-1, keepdims=True)
    cutoff_R = jnp.maximum(cutoff_R, kth_R)
    return jnp.where(scaled_RxV < cutoff_R, -jnp.inf, scaled_RxV)


def sample_tokens(logits_RxV, key, temperature, top_p, top_k):
    """Samples one token per row. Returns (tokens_R int32, logprobs_R float32).

    temperature, top_p, top_k may be traced scalars, so one compiled program serves every setting.
    """
    logits_RxV = logits_RxV.astype(jnp.float32)
    greedy = temperature <= 0.0
    scaled_RxV = logits_RxV / jnp.where(greedy, 1.0, temperature)
    logp_RxV = jax.nn.log_softmax(scaled_RxV, axis=-1)
    needs_trunc = (top_p < 1.0) | (top_k > 0)
    filtered_RxV = jax.lax.cond(needs_trunc, _truncate, lambda x, p, k: x, scaled_RxV, top_p, top_k)
    sampled_R = jax.random.categorical(key, filtered_RxV, axis=-1)
    tokens_R = jnp.where(greedy, jnp.argmax(logits_RxV, axis=-1), sampled_R).astype(jnp.int32)
    logprobs_R = jnp.take_along_axis(logp_RxV, tokens_R[:, None], axis=-1)[:, 0]
    return tokens_R, logprobs_R
