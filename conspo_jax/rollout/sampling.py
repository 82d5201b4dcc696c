"""Token sampling from logits: temperature, top-k and top-p, as pure jittable functions.

The returned log-prob is that of the sampled token under the temperature-scaled distribution *before*
top-k/top-p truncation (at temperature 1 that is the policy's own log-prob, which is what importance
ratios and the trainer/engine mismatch metric compare against). Greedy decoding (temperature 0) returns
the raw policy log-prob.

Nothing here sorts the vocabulary: the top-k value and the top-p cutoff are found by bisection over the
order-preserving int32 keys of the fp32 logits (32 masked reductions over the vocabulary, exact), and a
token is drawn by Gumbel-max as a max followed by a first-index search (no fused value+index argmax).
`truncate_sorted` is the sort-based reference the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sortable_keys(x_RxV):
    """int32 keys ordered exactly as the fp32 values (-0.0 folded into +0.0; no NaNs expected)."""
    bits = jax.lax.bitcast_convert_type(x_RxV.astype(jnp.float32) + 0.0, jnp.int32)
    # Negative floats order backwards as ints: flipping their 31 value bits restores the order.
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _smallest_key_below(keys_RxV, weights_RxV, limit_R1):
    """Per row, the smallest key t with sum(weights where key > t) < limit, by bisection over int32.

    The weighted count above t only changes at keys present in the row, so the answer is one of them
    (the row's k-th largest value for unit weights and limit k; the nucleus cutoff for probabilities).
    """
    lo = jnp.min(keys_RxV, axis=-1, keepdims=True) - 1  # predicate false here (total >= limit)
    hi = jnp.max(keys_RxV, axis=-1, keepdims=True)  # predicate true here (nothing above the max)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        ok = jnp.sum(jnp.where(keys_RxV > mid, weights_RxV, 0), axis=-1, keepdims=True) < limit_R1
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    # Keys span < 2**32, so 32 halvings leave hi - lo == 1: hi is the answer.
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return hi


def _truncate(scaled_RxV, top_p, top_k):
    """Sets to -inf every logit outside the top-k set and outside the top-p nucleus (ties kept)."""
    vocab = scaled_RxV.shape[-1]
    keys_RxV = _sortable_keys(scaled_RxV)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_R1 = jax.lax.cond(
        top_k > 0,
        lambda: _smallest_key_below(keys_RxV, jnp.int32(1), jnp.full((scaled_RxV.shape[0], 1), k, jnp.int32)),
        lambda: jnp.min(keys_RxV, axis=-1, keepdims=True),
    )
    scaled_RxV = jnp.where(keys_RxV < kth_R1, -jnp.inf, scaled_RxV)
    keys_RxV = jnp.where(keys_RxV < kth_R1, _sortable_keys(jnp.float32(-jnp.inf)), keys_RxV)

    def nucleus():
        probs_RxV = jax.nn.softmax(scaled_RxV, axis=-1)
        # Keep a token if the mass strictly above its value is < top_p: the smallest set reaching top_p.
        limit_R1 = jnp.full((scaled_RxV.shape[0], 1), top_p, jnp.float32)
        return _smallest_key_below(keys_RxV, probs_RxV, limit_R1)

    cut_R1 = jax.lax.cond(top_p < 1.0, nucleus, lambda: kth_R1)
    return jnp.where(keys_RxV < jnp.maximum(cut_R1, kth_R1), -jnp.inf, scaled_RxV)


def truncate_sorted(scaled_RxV, top_p, top_k):
    """Reference top-k/top-p by a full descending sort of the vocabulary (the pre-bisection version)."""
    vocab = scaled_RxV.shape[-1]
    sorted_RxV = -jnp.sort(-scaled_RxV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_R = jnp.take_along_axis(sorted_RxV, jnp.broadcast_to(k - 1, sorted_RxV.shape[:-1] + (1,)), axis=-1)
    sorted_RxV = jnp.where(sorted_RxV < kth_R, -jnp.inf, sorted_RxV)
    probs_RxV = jax.nn.softmax(sorted_RxV, axis=-1)
    mass_before_RxV = jnp.cumsum(probs_RxV, axis=-1) - probs_RxV
    keep_RxV = mass_before_RxV < top_p
    cutoff_R = jnp.min(jnp.where(keep_RxV, sorted_RxV, jnp.inf), axis=-1, keepdims=True)
    cutoff_R = jnp.maximum(cutoff_R, kth_R)
    return jnp.where(scaled_RxV < cutoff_R, -jnp.inf, scaled_RxV)


def first_max_index(z_RxV):
    """Index of the first maximum per row: a max, then a min over the matching positions."""
    vocab = z_RxV.shape[-1]
    m_R1 = jnp.max(z_RxV, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, z_RxV.shape, z_RxV.ndim - 1)
    return jnp.min(jnp.where(z_RxV == m_R1, iota, vocab), axis=-1).astype(jnp.int32)


def sample_tokens(logits_RxV, key, temperature, top_p, top_k):
    """Samples one token per row. Returns (tokens_R int32, logprobs_R float32).

    temperature, top_p, top_k may be traced scalars, so one compiled program serves every setting.
    """
    logits_RxV = logits_RxV.astype(jnp.float32)
    greedy = temperature <= 0.0
    scaled_RxV = logits_RxV / jnp.where(greedy, 1.0, temperature)

    def gumbel_scores():
        needs_trunc = (top_p < 1.0) | (top_k > 0)
        filtered_RxV = jax.lax.cond(needs_trunc, _truncate, lambda x, p, k: x, scaled_RxV, top_p, top_k)
        return filtered_RxV + jax.random.gumbel(key, filtered_RxV.shape, jnp.float32)

    # Greedy takes the raw logits' first maximum (= argmax); sampling the perturbed logits' (= a draw).
    tokens_R = first_max_index(jax.lax.cond(greedy, lambda: logits_RxV, gumbel_scores))
    lse_R = jax.nn.logsumexp(scaled_RxV, axis=-1)
    logprobs_R = jnp.take_along_axis(scaled_RxV, tokens_R[:, None], axis=-1)[:, 0] - lse_R
    return tokens_R, logprobs_R
