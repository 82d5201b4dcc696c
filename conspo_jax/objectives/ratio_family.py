"""Importance-ratio objectives that reshape how GRPO trusts off-policy tokens: GMPO, CISPO, SAPO, GSPO.

All use GRPO's advantages (Eq. 1, population std, 0 for all-equal groups) and read pi_old; each is
written from its own paper's formula (cited per function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from conspo_jax.objectives.advantages import group_advantages
from conspo_jax.objectives.grpo import _group_mean_of_rollouts, _token_diagnostics
from conspo_jax.objectives.registry import (
    ObjectiveInputs,
    check_nonnegative,
    check_positive,
    register_objective,
)
from conspo_jax.objectives.segments import as_bool, rollout_validity, safe_div
from conspo_jax.objectives.sequences import k3_kl, masked_token_mean, token_log_ratio


def _prepare(inputs: ObjectiveInputs, num_groups: int):
    real_R = rollout_validity(inputs.rewards, inputs.rollout_mask)
    tok_RxC = as_bool(inputs.mask) & real_R[:, None]
    adv_R = group_advantages(inputs.rewards, inputs.group_ids, num_groups, rollout_mask=real_R)
    log_ratio_RxC = token_log_ratio(inputs.token_logp, inputs.old_logp, tok_RxC)
    return real_R, tok_RxC, adv_R.astype(inputs.token_logp.dtype), log_ratio_RxC


@register_objective("gmpo", uses_old_logp=True)
def gmpo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
):
    """GMPO, "Geometric-Mean Policy Optimization" (arXiv 2507.20673), its objective J_GMPO.

    Maximises the geometric mean of token-level rewards: per rollout
    A_i * exp((1/|o_i|) sum_t c_t) with c_t the log-ratio clipped in log space, PPO-style by the sign of
    A_i: min(log rho, eps_high) for A_i > 0 and max(log rho, -eps_low) for A_i < 0 (the paper's
    clip(rho, e^-0.4, e^0.4) and its min/sgn(A) construction). Then (1/G) sum_i per group, averaged over
    non-empty groups. Normaliser: number of non-empty groups.
    """
    del progress
    check_nonnegative("gmpo", eps_low=eps_low, eps_high=eps_high)
    real_R, tok_RxC, adv_R, log_ratio_RxC = _prepare(inputs, num_groups)
    pos_RxC = (adv_R > 0)[:, None]
    clipped_log_RxC = jnp.where(pos_RxC, jnp.minimum(log_ratio_RxC, eps_high), jnp.maximum(log_ratio_RxC, -eps_low))
    binds_RxC = jnp.where(pos_RxC, log_ratio_RxC > eps_high, log_ratio_RxC < -eps_low) & (adv_R != 0)[:, None]
    geo_ratio_R = jnp.exp(masked_token_mean(clipped_log_RxC, tok_RxC))
    value, n_groups = _group_mean_of_rollouts(adv_R * geo_ratio_R, real_R, inputs.group_ids, num_groups)
    aux = _token_diagnostics(log_ratio_RxC, binds_RxC, tok_RxC)
    aux["normalizer"] = n_groups
    return value, aux


@register_objective("cispo", uses_old_logp=True)
def cispo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
):
    """CISPO, MiniMax-M1 (arXiv 2506.13585), Sec. 3.1, Eq. 4-5:

        (1/sum_i |o_i|) sum_i sum_t sg(clip(rho_it, 1 - eps_low, 1 + eps_high)) A_i log pi_theta(o_it)

    The clipped importance weight is *detached* (sg) as in the paper, so every token keeps a gradient
    A_i * w_it; it is not PPO's min(). The paper imposes no lower bound ("setting eps_low to a large
    value") and tunes only eps_high without reporting it: the default ``eps_low=1.0`` puts the lower
    bound at 0, i.e. none, and eps_high defaults to 0.28, DAPO's clip-higher value (also Trinity-RFT's
    CISPO default). Some implementations additionally mask tokens PPO would clip; the paper's main
    objective does not.
    The value is the paper's surrogate (its gradient is the CISPO gradient; its level is not a
    return). Normaliser: number of completion tokens. Diagnostics: clip_frac (weights truncated),
    approx_kl.
    """
    del progress
    check_nonnegative("cispo", eps_low=eps_low, eps_high=eps_high)
    _, tok_RxC, adv_R, log_ratio_RxC = _prepare(inputs, num_groups)
    ratio_RxC = jnp.exp(log_ratio_RxC)
    lower = jnp.maximum(1.0 - eps_low, 0.0)
    weight_RxC = jax.lax.stop_gradient(jnp.clip(ratio_RxC, lower, 1.0 + eps_high))
    truncated_RxC = (ratio_RxC > 1.0 + eps_high) | (ratio_RxC < lower)
    logp_RxC = jnp.where(tok_RxC, inputs.token_logp, 0.0)
    term_RxC = jnp.where(tok_RxC, weight_RxC * adv_R[:, None] * logp_RxC, 0.0)
    n_tok = jnp.sum(tok_RxC.astype(term_RxC.dtype))
    value = safe_div(jnp.sum(term_RxC), n_tok)
    aux = _token_diagnostics(log_ratio_RxC, truncated_RxC, tok_RxC)
    aux["normalizer"] = jax.lax.stop_gradient(n_tok)
    return value, aux


@register_objective("sapo", uses_old_logp=True)
def sapo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
):
    """SAPO, "Soft Adaptive Policy Optimization" (arXiv 2511.20347), its objective J_SAPO and soft gate f.

    Replaces the hard clip by a smooth gate f(rho) = (4/tau) sigmoid(tau (rho - 1)), with tau = tau_pos
    for A_i > 0 and tau_neg for A_i < 0 (paper defaults 1.0 and 1.05; a larger tau_neg damps negative
    updates faster): (1/G) sum_i (1/|o_i|) sum_t f(rho_it) A_i per group, averaged over non-empty
    groups. The token gradient weight 4 sigmoid(1 - sigmoid) * rho peaks at 1 on-policy.
    Normaliser: number of non-empty groups. Diagnostics: approx_kl, soft_gate_weight (mean token
    gradient weight 4 s (1 - s)).
    """
    del progress
    check_positive("sapo", tau_pos=tau_pos, tau_neg=tau_neg)
    real_R, tok_RxC, adv_R, log_ratio_RxC = _prepare(inputs, num_groups)
    tau_R = jnp.where(adv_R > 0, tau_pos, tau_neg).astype(adv_R.dtype)
    gate_RxC = jax.nn.sigmoid(tau_R[:, None] * (jnp.exp(log_ratio_RxC) - 1.0))
    term_RxC = (4.0 / tau_R[:, None]) * gate_RxC * adv_R[:, None]
    value, n_groups = _group_mean_of_rollouts(
        masked_token_mean(term_RxC, tok_RxC), real_R, inputs.group_ids, num_groups
    )
    n_tok = jnp.sum(tok_RxC.astype(term_RxC.dtype))
    aux = {
        "normalizer": n_groups,
        "approx_kl": safe_div(jnp.sum(jnp.where(tok_RxC, k3_kl(log_ratio_RxC), 0.0)), n_tok),
        "soft_gate_weight": safe_div(jnp.sum(jnp.where(tok_RxC, 4.0 * gate_RxC * (1.0 - gate_RxC), 0.0)), n_tok),
    }
    return value, aux


@register_objective("gspo", uses_old_logp=True)
def gspo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
):
    """GSPO, "Group Sequence Policy Optimization" (arXiv 2507.18071), Eq. 5 with s_i(theta) of Eq. 7.

    Sequence-level, length-normalised ratio s_i = exp((1/|o_i|) sum_t log rho_it) clipped per sequence:
    (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) per group, averaged over
    non-empty groups, with the paper's clip range (3e-4, 4e-4). Normaliser: number of non-empty groups.
    Diagnostics: clip_frac (fraction of real rollouts whose sequence clip binds), approx_kl (token k3).
    """
    del progress
    check_nonnegative("gspo", eps_low=eps_low, eps_high=eps_high)
    real_R, tok_RxC, adv_R, log_ratio_RxC = _prepare(inputs, num_groups)
    seq_ratio_R = jnp.exp(masked_token_mean(log_ratio_RxC, tok_RxC))
    unclipped_R = seq_ratio_R * adv_R
    clipped_R = jnp.clip(seq_ratio_R, 1.0 - eps_low, 1.0 + eps_high) * adv_R
    value, n_groups = _group_mean_of_rollouts(jnp.minimum(unclipped_R, clipped_R), real_R, inputs.group_ids, num_groups)
    n_real = jnp.sum(real_R.astype(adv_R.dtype))
    n_tok = jnp.sum(tok_RxC.astype(adv_R.dtype))
    aux = {
        "normalizer": n_groups,
        "clip_frac": safe_div(jnp.sum((real_R & (clipped_R < unclipped_R)).astype(adv_R.dtype)), n_real),
        "approx_kl": safe_div(jnp.sum(jnp.where(tok_RxC, k3_kl(log_ratio_RxC), 0.0)), n_tok),
    }
    return value, aux
