"""Token-level to sequence-level reductions: lengths, masked means, scores and importance ratios.

Padding tokens (mask 0) may hold anything, including -inf log-probs from a padded logit row; every
function here replaces them before any arithmetic, so they neither change a value nor receive a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from conspo_jax.objectives.segments import as_bool, safe_div


def response_lengths(mask_RxC: jax.Array, dtype=jnp.float32) -> jax.Array:
    """[R] number of completion tokens, |o_i|."""
    return jnp.sum(as_bool(mask_RxC), axis=-1).astype(dtype)


def masked_token_sum(x_RxC: jax.Array, mask_RxC: jax.Array) -> jax.Array:
    """[R] sum over completion tokens."""
    return jnp.sum(jnp.where(as_bool(mask_RxC), x_RxC, 0.0), axis=-1)


def masked_token_mean(x_RxC: jax.Array, mask_RxC: jax.Array) -> jax.Array:
    """[R] mean over completion tokens, (1/|o_i|) sum_t x_it; 0 for a zero-length response."""
    return safe_div(masked_token_sum(x_RxC, mask_RxC), response_lengths(mask_RxC, x_RxC.dtype))


def sequence_scores(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """ConSPO's likelihood-aligned score (Sec. 4.2): s(o) = (1/|o|) sum_t log pi(o_t | q, o_<t).

    Args:
      token_logp: [R, C] log-probs of the completion tokens under the policy being scored.
      mask: [R, C] 1 (or True) on completion tokens.

    Returns:
      [R] length-normalised log-probabilities; 0 (not NaN) for a zero-length response.
    """
    return masked_token_mean(token_logp, mask)


def token_log_ratio(new_logp_RxC: jax.Array, old_logp_RxC: jax.Array, mask_RxC: jax.Array) -> jax.Array:
    """[R, C] log rho_it = log pi_theta - log pi_old, with pi_old constant and 0 on padding."""
    old = jax.lax.stop_gradient(old_logp_RxC)
    mask = as_bool(mask_RxC)
    return jnp.where(mask, new_logp_RxC - jnp.where(mask, old, 0.0), 0.0)


def clipped_ratio_scores(
    new_logp_RxC: jax.Array,
    old_logp_RxC: jax.Array,
    mask_RxC: jax.Array,
    is_positive_R: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
) -> jax.Array:
    """GRPO's implicit discriminative scores, Eq. 7.

    A positive rollout is scored by s+ = mean_t min(rho_t, 1 + eps_high), any other rollout by
    s- = mean_t max(rho_t, 1 - eps_low). These are the scores that Proposition 1 shows GRPO's clipped
    surrogate separates, and that the "w/o log-likelihood scores" ablation feeds to InfoNCE.
    """
    ratio_RxC = jnp.exp(token_log_ratio(new_logp_RxC, old_logp_RxC, mask_RxC))
    pos_RxC = jnp.minimum(ratio_RxC, 1.0 + eps_high)
    neg_RxC = jnp.maximum(ratio_RxC, 1.0 - eps_low)
    clipped_RxC = jnp.where(is_positive_R[:, None], pos_RxC, neg_RxC)
    return masked_token_mean(clipped_RxC, mask_RxC)


def k3_kl(log_ratio_RxC: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(p || q) from samples of p, given log(q/p): e^x - 1 - x >= 0.

    Schulman's low-variance estimator; with x = log(pi_theta/pi_old) on pi_old samples it estimates
    KL(pi_old || pi_theta); with x = log(pi_ref/pi_theta) it is GRPO's Eq. 4 (DeepSeekMath) penalty.
    """
    return jnp.exp(log_ratio_RxC) - 1.0 - log_ratio_RxC
