"""Engine/trainer log-prob mismatch: the metric to log every step and truncated importance sampling.

The rollout engine (SGLang kernels, bf16 KV cache, a different batch layout) does not compute
exactly the trainer's log-probs for the same tokens. ``logprob_mismatch`` measures the gap;
``tis_weights`` gives per-token truncated importance weights ``min(pi_trainer / pi_engine, cap)`` that
re-weight the policy-gradient terms so that samples from the engine's distribution estimate the
trainer's (truncated IS, as in Yao et al., 2025, "Your efficient RL framework secretly brings you
off-policy RL training"). Both are jit-able and work on numpy or jax arrays of shape [R, C].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tis_weights(trainer_logp, engine_logp, mask, cap: float = 2.0):
    """Per-token ``min(exp(trainer_logp - engine_logp), cap)``, 0 where ``mask`` is False.

    The weights carry no gradient (they multiply the loss; they are not part of it). fp32 math.
    """
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    log_ratio = jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(engine_logp, jnp.float32)
    # Clip the log-ratio before exp so that a wild token cannot overflow to inf * 0 = nan.
    w = jnp.exp(jnp.minimum(log_ratio, jnp.log(jnp.float32(cap))))
    return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask, bool), w, 0.0))


def logprob_mismatch(trainer_logp, engine_logp, mask):
    """Mean |trainer_logp - engine_logp| over valid tokens (0 when there are none)."""
    mask = jnp.asarray(mask, jnp.float32)
    diff = jnp.abs(jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(engine_logp, jnp.float32))
    return jnp.sum(diff * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mismatch_metrics(trainer_logp, engine_logp, mask, cap: float | None = None) -> dict:
    """The per-step log line: mean and max |Δ logp|, and with ``cap`` the TIS clip fraction and mean weight."""
    m = jnp.asarray(mask, bool)
    diff = jnp.abs(jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(engine_logp, jnp.float32))
    out = {
        "rollout/logp_mismatch_mean": logprob_mismatch(trainer_logp, engine_logp, m),
        "rollout/logp_mismatch_max": jnp.max(jnp.where(m, diff, 0.0)),
    }
    if cap is not None:
        w = tis_weights(trainer_logp, engine_logp, m, cap)
        n = jnp.maximum(jnp.sum(m), 1)
        ratio = jnp.exp(jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(engine_logp, jnp.float32))
        out["rollout/tis_clip_frac"] = jnp.sum(m & (ratio > cap)) / n
        out["rollout/tis_mean_weight"] = jnp.sum(w) / n
    return out
