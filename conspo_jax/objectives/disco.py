"""DisCO, "Reinforcing Large Reasoning Models with Discriminative Constrained Optimization"
(arXiv 2505.12366): a discriminative objective with a distributionally-robust treatment of negatives
and a squared-hinge KL trust region instead of clipping.

Per valid group (N+ >= 1, N- >= 1):

    J(q) = (1/N+) sum_i s(o_i+) - tau * log( (1/N-) sum_j exp(s(o_j-) / tau) )

minus beta * [KL(pi_old || pi_theta) - delta]_+^2, averaged over the batch's non-empty groups.
"""

from __future__ import annotations

import jax.numpy as jnp

from conspo_jax.objectives.advantages import split_groups
from conspo_jax.objectives.registry import (
    ObjectiveInputs,
    check_nonnegative,
    check_positive,
    register_objective,
)
from conspo_jax.objectives.segments import (
    as_bool,
    group_logsumexp,
    group_sum,
    mean_over_groups,
    safe_div,
)
from conspo_jax.objectives.sequences import (
    k3_kl,
    masked_token_mean,
    masked_token_sum,
    response_lengths,
    token_log_ratio,
)

_SCORES = ("logL", "Lratio")


@register_objective("disco", uses_old_logp=True)
def disco(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    score: str = "logL",
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
    kl_estimator: str = "k1",
    kl_scope: str = "group",
    reward_threshold: float = 0.5,
):
    """DisCO (arXiv 2505.12366): the log-sum-exp (distributionally robust) objective with the
    squared-hinge penalty; its DisCO-b variant would use the plain mean over negatives instead.

    Args (hyperparameters):
      score: "logL", the length-normalised log-likelihood (1/|o|) sum_t log pi_theta, or "Lratio", the
        unclipped mean token ratio (1/|o|) sum_t pi_theta/pi_old (the paper's two non-clipping scores).
      tau: temperature of the log-mean-exp over negatives; 10 is the authors' recommendation for
        logL; they recommend 1 for Lratio (set it explicitly).
      delta, beta: the trust region KL <= delta enforced by the penalty beta [KL - delta]_+^2 (paper
        values 1e-4 and 1e3). We differentiate the paper's squared hinge; the authors' code uses a
        detached-coefficient surrogate whose gradient is half of it.
      kl_estimator: "k1" (mean of log pi_old - log pi_theta, the paper's sample estimate and the
        authors' setting) or "k3" (low-variance e^x - 1 - x).
      kl_scope: "group" estimates KL on each group's tokens and penalises each group (so micro-batches
        of whole groups combine exactly through aux["normalizer"]); "batch" uses one token-mean KL over
        the (micro-)batch as the authors' code does per micro-batch, which then is not exactly
        decomposable across micro-batches.

    Normaliser: number of non-empty groups (the authors divide by all questions, so groups without both
    positives and negatives count but add no discriminative term). Diagnostics: valid_group_frac,
    score_gap, approx_kl (the batch KL estimate), kl_penalty, constraint_frac (fraction of groups, or
    1/0 for batch scope, where KL > delta).
    """
    del progress
    if score not in _SCORES:
        raise ValueError(f"objective 'disco': score must be one of {_SCORES}, got {score!r}")
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"objective 'disco': kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
    if kl_scope not in ("group", "batch"):
        raise ValueError(f"objective 'disco': kl_scope must be 'group' or 'batch', got {kl_scope!r}")
    check_positive("disco", tau=tau)
    check_nonnegative("disco", delta=delta, beta=beta)

    gids = inputs.group_ids
    split = split_groups(
        inputs.rewards,
        gids,
        num_groups,
        rollout_mask_R=inputs.rollout_mask,
        reward_threshold=reward_threshold,
        dtype=inputs.token_logp.dtype,
    )
    real_R = split.is_pos_R | split.is_neg_R
    tok_RxC = as_bool(inputs.mask) & real_R[:, None]
    log_ratio_RxC = token_log_ratio(inputs.token_logp, inputs.old_logp, tok_RxC)
    if score == "logL":
        s_R = masked_token_mean(inputs.token_logp, tok_RxC)
    else:
        s_R = masked_token_mean(jnp.exp(log_ratio_RxC), tok_RxC)
    s_R = jnp.where(real_R, s_R, 0.0)

    # Discriminative term: positives' mean score minus the tau-scaled log-MEAN-exp over negatives.
    pos_R = split.is_pos_R & split.valid_G[gids]
    mean_pos_G = safe_div(group_sum(jnp.where(pos_R, s_R, 0.0), gids, num_groups), split.n_pos_G)
    neg_lse_G, _ = group_logsumexp(s_R / tau, split.is_neg_R, gids, num_groups)
    log_n_neg_G = jnp.log(jnp.maximum(split.n_neg_G, 1.0))
    term_G = jnp.where(split.valid_G, mean_pos_G - tau * (neg_lse_G - log_n_neg_G), 0.0)

    kl_tok_RxC = -log_ratio_RxC if kl_estimator == "k1" else k3_kl(log_ratio_RxC)
    kl_sum_R = masked_token_sum(kl_tok_RxC, tok_RxC)
    n_tok_R = response_lengths(tok_RxC, s_R.dtype)
    kl_batch = safe_div(jnp.sum(kl_sum_R), jnp.sum(n_tok_R))
    n_nonempty = jnp.sum(split.nonempty_G.astype(s_R.dtype))
    if kl_scope == "group":
        kl_G = safe_div(group_sum(kl_sum_R, gids, num_groups), group_sum(n_tok_R, gids, num_groups))
        excess_G = jnp.maximum(kl_G - delta, 0.0)
        penalty_G = jnp.where(split.nonempty_G, beta * excess_G**2, 0.0)
        value, n_groups = mean_over_groups(term_G - penalty_G, split.nonempty_G)
        kl_penalty = safe_div(jnp.sum(penalty_G), n_nonempty)
        constraint_frac = safe_div(jnp.sum((split.nonempty_G & (excess_G > 0)).astype(s_R.dtype)), n_nonempty)
    else:
        disc, n_groups = mean_over_groups(term_G, split.nonempty_G)
        excess = jnp.maximum(kl_batch - delta, 0.0)
        kl_penalty = beta * excess**2
        value = disc - kl_penalty
        constraint_frac = (excess > 0).astype(s_R.dtype)

    neg_R = split.is_neg_R & split.valid_G[gids]
    mean_neg_G = safe_div(group_sum(jnp.where(neg_R, s_R, 0.0), gids, num_groups), split.n_neg_G)
    n_valid = jnp.sum(split.valid_G.astype(s_R.dtype))
    aux = {
        "normalizer": n_groups,
        "valid_group_frac": safe_div(n_valid, n_nonempty),
        "score_gap": mean_over_groups(mean_pos_G - mean_neg_G, split.valid_G)[0],
        "approx_kl": kl_batch,
        "kl_penalty": kl_penalty,
        "constraint_frac": constraint_frac,
    }
    return value, aux
