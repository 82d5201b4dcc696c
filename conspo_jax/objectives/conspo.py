"""ConSPO (paper Sec. 4.2-4.3) and its Table 6 ablations.

ConSPO scores each rollout by its length-normalised log-likelihood and, within every valid group,
contrasts each positive against all of the group's negatives with a margin-shifted InfoNCE (Eq. 15):

    J(q) = (1/N+) sum_i tau * log( e^{(s_i+ - m_t)/tau} / (e^{(s_i+ - m_t)/tau} + sum_j e^{s_j-/tau}) )

The batch objective is the mean of J(q) over *valid* groups (N+ >= 1 and N- >= 1); other groups add
nothing to the value or the gradient. Per positive, the denominator is ``logaddexp`` of the positive's
own logit and one per-group logsumexp over the negatives, so a group costs O(G_q), not O(N+ N-).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conspo_jax.objectives.advantages import GroupSplit, split_groups
from conspo_jax.objectives.registry import (
    ObjectiveInputs,
    check_nonnegative,
    check_positive,
    register_objective,
)
from conspo_jax.objectives.segments import as_bool, group_logsumexp, group_sum, mean_over_groups, safe_div
from conspo_jax.objectives.sequences import clipped_ratio_scores, sequence_scores

# Paper Sec. 5.1 / Table 7.
DEFAULT_TAU = 10.0
DEFAULT_MAX_MARGIN = 0.01
DEFAULT_WARMUP_RATIO = 0.3


def margin_schedule(progress, *, max_margin: float, warmup_ratio: float) -> jax.Array:
    """Eq. 16: m_t = (M/2)(1 - cos(pi * min(lambda_t / alpha, 1))).

    Args:
      progress: lambda_t, training progress in [0, 1] (Python float or traced scalar; finite values
        outside [0, 1] are clamped). A concrete NaN or +-inf raises ValueError; a traced NaN cannot
        raise inside jit and propagates (m_t and J become NaN, which the trainer's non-finite guard
        counts), so compute progress on the host.
      max_margin: the target margin M >= 0.
      warmup_ratio: alpha in (0, 1], the fraction of training over which the margin rises from 0 to M.
    """
    check_nonnegative("margin_schedule", max_margin=max_margin)
    check_positive("margin_schedule", warmup_ratio=warmup_ratio)
    if isinstance(warmup_ratio, (int, float)) and warmup_ratio > 1:
        raise ValueError(f"margin_schedule: warmup_ratio must be in (0, 1], got {warmup_ratio!r}")
    if not isinstance(progress, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(progress, dtype=np.float64))):
        raise ValueError(f"margin_schedule: progress must be a finite number in [0, 1], got {progress!r}")
    progress = jnp.clip(jnp.asarray(progress, dtype=jnp.result_type(float)), 0.0, 1.0)
    rho = jnp.minimum(progress / warmup_ratio, 1.0)
    return 0.5 * max_margin * (1.0 - jnp.cos(jnp.pi * rho))


def infonce(
    scores_R: jax.Array,
    split: GroupSplit,
    group_ids_R: jax.Array,
    num_groups: int,
    *,
    tau,
    margin,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 15 averaged over valid groups, with diagnostics. ``margin=0`` is Eq. 10."""
    real_R = split.is_pos_R | split.is_neg_R
    # Padding rollouts may carry junk scores; a finite placeholder keeps every gradient finite.
    s_R = jnp.where(real_R, scores_R, 0.0)
    logit_R = s_R / tau
    neg_lse_G, _ = group_logsumexp(logit_R, split.is_neg_R, group_ids_R, num_groups)
    neg_lse_R = neg_lse_G[group_ids_R]
    shifted_R = (s_R - margin) / tau
    log_p_margin_R = shifted_R - jnp.logaddexp(shifted_R, neg_lse_R)
    counted_R = split.is_pos_R & split.valid_G[group_ids_R]
    term_R = jnp.where(counted_R, tau * log_p_margin_R, 0.0)
    per_group_G = safe_div(group_sum(term_R, group_ids_R, num_groups), split.n_pos_G)
    value, n_valid = mean_over_groups(per_group_G, split.valid_G)

    # Diagnostics: P_i+ of Eq. 11 (margin-free), the margin-shifted one that sets the gradient
    # coefficient (1 - P_i+), and the mean positive-minus-negative score gap, all per valid group.
    log_p_R = logit_R - jnp.logaddexp(logit_R, neg_lse_R)

    def per_positive_mean(x_R):
        summed = group_sum(jnp.where(counted_R, x_R, 0.0), group_ids_R, num_groups)
        return mean_over_groups(safe_div(summed, split.n_pos_G), split.valid_G)[0]

    neg_counted_R = split.is_neg_R & split.valid_G[group_ids_R]
    mean_neg_G = safe_div(group_sum(jnp.where(neg_counted_R, s_R, 0.0), group_ids_R, num_groups), split.n_neg_G)
    n_nonempty = jnp.sum(split.nonempty_G.astype(s_R.dtype))
    aux = {
        "normalizer": n_valid,
        "valid_group_frac": safe_div(n_valid, n_nonempty),
        "p_plus": per_positive_mean(jnp.exp(log_p_R)),
        "p_plus_margin": per_positive_mean(jnp.exp(log_p_margin_R)),
        "score_gap": per_positive_mean(s_R - mean_neg_G[group_ids_R]),
        "margin": jnp.asarray(margin, s_R.dtype),
    }
    return value, aux


def conspo_objective(
    scores,
    rewards,
    group_ids,
    num_groups: int,
    *,
    tau,
    margin,
    rollout_mask=None,
    reward_threshold: float = 0.5,
) -> jax.Array:
    """ConSPO's Eq. 15 on precomputed scores, averaged over valid groups (a value to maximise).

    Args:
      scores: [R] rollout scores (``sequence_scores`` for ConSPO).
      rewards: [R]; a rollout is positive when reward > ``reward_threshold``.
      group_ids: [R] int, in [0, num_groups).
      num_groups: static number of groups.
      tau: contrastive temperature (> 0).
      margin: m_t >= 0, subtracted from each positive's score (Python float or traced scalar).
      rollout_mask: optional [R], 0 on padding rollouts.
    """
    check_positive("conspo_objective", tau=tau)
    split = split_groups(
        rewards,
        group_ids,
        num_groups,
        rollout_mask_R=rollout_mask,
        reward_threshold=reward_threshold,
        dtype=scores.dtype,
    )
    value, _ = infonce(scores, split, group_ids, num_groups, tau=tau, margin=margin)
    return value


def linear_discriminative(
    scores_R: jax.Array, split: GroupSplit, group_ids_R: jax.Array, num_groups: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 8: sqrt(p(1-p)) (mean_i s_i+ - mean_j s_j-) with empirical p = N+/(N+ + N-), over valid groups.

    With GRPO's clipped-ratio scores (Eq. 7) this *is* GRPO's clipped surrogate on binary rewards
    (Proposition 1 / Lemma 1, exact per group); with log-likelihood scores it is the
    "w/o contrastive objective" ablation.
    """
    real_R = split.is_pos_R | split.is_neg_R
    s_R = jnp.where(real_R, scores_R, 0.0)
    pos_R = split.is_pos_R & split.valid_G[group_ids_R]
    neg_R = split.is_neg_R & split.valid_G[group_ids_R]
    mean_pos_G = safe_div(group_sum(jnp.where(pos_R, s_R, 0.0), group_ids_R, num_groups), split.n_pos_G)
    mean_neg_G = safe_div(group_sum(jnp.where(neg_R, s_R, 0.0), group_ids_R, num_groups), split.n_neg_G)
    p_hat_G = safe_div(split.n_pos_G, split.n_G)
    weight_G = jnp.sqrt(p_hat_G * (1.0 - p_hat_G))
    gap_G = mean_pos_G - mean_neg_G
    value, n_valid = mean_over_groups(weight_G * gap_G, split.valid_G)
    n_nonempty = jnp.sum(split.nonempty_G.astype(s_R.dtype))
    aux = {
        "normalizer": n_valid,
        "valid_group_frac": safe_div(n_valid, n_nonempty),
        "score_gap": mean_over_groups(gap_G, split.valid_G)[0],
    }
    return value, aux


def _split(inputs: ObjectiveInputs, num_groups: int, reward_threshold: float) -> GroupSplit:
    return split_groups(
        inputs.rewards,
        inputs.group_ids,
        num_groups,
        rollout_mask_R=inputs.rollout_mask,
        reward_threshold=reward_threshold,
        dtype=inputs.token_logp.dtype,
    )


def _token_mask(inputs: ObjectiveInputs, split: GroupSplit) -> jax.Array:
    """Completion tokens of real rollouts: padding rollouts may hold junk that must never reach an exp."""
    return as_bool(inputs.mask) & (split.is_pos_R | split.is_neg_R)[:, None]


def _scheduled_margin(name: str, progress, max_margin, warmup_ratio):
    if progress is None:
        raise ValueError(
            f"objective {name!r} schedules its margin on training progress: pass progress=<float in [0, 1]>"
        )
    return margin_schedule(progress, max_margin=max_margin, warmup_ratio=warmup_ratio)


def _loglik_infonce(inputs: ObjectiveInputs, num_groups: int, reward_threshold: float, *, tau, margin):
    """Eq. 15 on length-normalised log-likelihood scores: the core shared by ConSPO and its margin ablations."""
    split = _split(inputs, num_groups, reward_threshold)
    scores = sequence_scores(inputs.token_logp, _token_mask(inputs, split))
    return infonce(scores, split, inputs.group_ids, num_groups, tau=tau, margin=margin)


@register_objective("conspo", uses_old_logp=False)
def conspo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    tau: float = DEFAULT_TAU,
    max_margin: float = DEFAULT_MAX_MARGIN,
    warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    reward_threshold: float = 0.5,
):
    """ConSPO (this paper, Eq. 15-16): InfoNCE over length-normalised log-likelihood scores with a
    cosine-scheduled margin m_t driven by ``progress``. Defaults tau=10, M=0.01, alpha=0.3 (Sec. 5.1).
    Normaliser: number of valid groups."""
    check_positive("conspo", tau=tau)
    margin = _scheduled_margin("conspo", progress, max_margin, warmup_ratio)
    return _loglik_infonce(inputs, num_groups, reward_threshold, tau=tau, margin=margin)


@register_objective("conspo_no_margin", uses_old_logp=False)
def conspo_no_margin(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    tau: float = DEFAULT_TAU,
    reward_threshold: float = 0.5,
):
    """Table 6 "w/o scheduled margin": Eq. 10 (m_t = 0). Normaliser: number of valid groups."""
    del progress
    check_positive("conspo_no_margin", tau=tau)
    return _loglik_infonce(inputs, num_groups, reward_threshold, tau=tau, margin=0.0)


@register_objective("conspo_fixed_margin", uses_old_logp=False)
def conspo_fixed_margin(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    tau: float = DEFAULT_TAU,
    margin: float = DEFAULT_MAX_MARGIN,
    reward_threshold: float = 0.5,
):
    """Table 6 "w/ fixed margin": Eq. 15 with a constant m_t = ``margin`` from step 0.
    Normaliser: number of valid groups."""
    del progress
    check_positive("conspo_fixed_margin", tau=tau)
    check_nonnegative("conspo_fixed_margin", margin=margin)
    return _loglik_infonce(inputs, num_groups, reward_threshold, tau=tau, margin=margin)


@register_objective("conspo_no_loglik", uses_old_logp=True)
def conspo_no_loglik(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    tau: float = DEFAULT_TAU,
    max_margin: float = DEFAULT_MAX_MARGIN,
    warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    reward_threshold: float = 0.5,
):
    """Table 6 "w/o log-likelihood scores": Eq. 15-16 on GRPO's clipped-ratio scores of Eq. 7
    (s+ = mean_t min(rho, 1+eps_high) for positives, s- = mean_t max(rho, 1-eps_low) for negatives).
    Normaliser: number of valid groups."""
    check_positive("conspo_no_loglik", tau=tau)
    check_nonnegative("conspo_no_loglik", eps_low=eps_low, eps_high=eps_high)
    margin = _scheduled_margin("conspo_no_loglik", progress, max_margin, warmup_ratio)
    split = _split(inputs, num_groups, reward_threshold)
    scores = clipped_ratio_scores(
        inputs.token_logp,
        inputs.old_logp,
        _token_mask(inputs, split),
        split.is_pos_R,
        eps_low=eps_low,
        eps_high=eps_high,
    )
    return infonce(scores, split, inputs.group_ids, num_groups, tau=tau, margin=margin)


@register_objective("conspo_no_contrastive", uses_old_logp=False)
def conspo_no_contrastive(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    reward_threshold: float = 0.5,
):
    """Table 6 "w/o contrastive objective": Eq. 8's linear, pass-rate-weighted score difference on
    log-likelihood scores. A margin would only shift the value by a constant, so there is none.
    Normaliser: number of valid groups."""
    del progress
    split = _split(inputs, num_groups, reward_threshold)
    scores = sequence_scores(inputs.token_logp, _token_mask(inputs, split))
    return linear_discriminative(scores, split, inputs.group_ids, num_groups)
