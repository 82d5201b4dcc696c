"""GRPO and its two best-known refinements, DAPO and Dr. GRPO: PPO-style clipped token surrogates on
group-relative advantages, differing in advantage scaling and in how token terms are averaged.

    GRPO      (1/G) sum_i (1/|o_i|) sum_t f(rho_it, A_i)       per group, mean over groups
    Dr. GRPO  (1/G) sum_i (1/L)     sum_t f(rho_it, A_i)       A_i = r_i - mean, L a constant
    DAPO      (1/sum_i |o_i|) sum_i sum_t f(rho_it, A_i)       token mean over the whole batch

with f(rho, A) = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) (paper Eq. 4).

Peer options (defaults = the paper's; named presets in objectives/peers.py): ``std_estimator``,
``std_eps`` and ``singleton`` choose the advantage's std (see group_advantages), and ``clip_ratio_c > 1``
adds verl's dual clip (Ye et al. 2020, arXiv 1912.09729): for A < 0, f = max(f, c A), bounding how hard a
negative token with a large ratio is pushed down. 0 (default) turns it off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from conspo_jax.objectives.advantages import check_advantage_options, group_advantages
from conspo_jax.objectives.registry import (
    ObjectiveInputs,
    check_nonnegative,
    register_objective,
)
from conspo_jax.objectives.segments import (
    as_bool,
    group_count,
    group_max,
    group_min,
    group_sum,
    mean_over_groups,
    rollout_validity,
    safe_div,
)
from conspo_jax.objectives.sequences import k3_kl, masked_token_mean, masked_token_sum, token_log_ratio


def clipped_surrogate_terms(log_ratio_RxC, adv_R, *, eps_low, eps_high, clip_ratio_c=0.0):
    """Per-token f(rho, A) of Eq. 4 and where a clip binds (those tokens get no gradient).

    ``clip_ratio_c > 0``: dual clip, f = max(f, c A) where A < 0 (verl's clip_ratio_c, there 3.0)."""
    ratio_RxC = jnp.exp(log_ratio_RxC)
    adv_RxC = adv_R[:, None]
    unclipped = ratio_RxC * adv_RxC
    clipped = jnp.clip(ratio_RxC, 1.0 - eps_low, 1.0 + eps_high) * adv_RxC
    f_RxC, binds_RxC = jnp.minimum(unclipped, clipped), clipped < unclipped
    if isinstance(clip_ratio_c, (int, float)) and clip_ratio_c == 0:
        return f_RxC, binds_RxC
    dual_RxC = clip_ratio_c * adv_RxC
    dual_binds_RxC = (adv_RxC < 0) & (clip_ratio_c > 0) & (dual_RxC > f_RxC)
    return jnp.where(dual_binds_RxC, dual_RxC, f_RxC), binds_RxC | dual_binds_RxC


def check_dual_clip(objective: str, clip_ratio_c) -> None:
    """verl requires c > 1 (c A must lie below the clipped term); 0 means off."""
    if isinstance(clip_ratio_c, (int, float)) and not (clip_ratio_c == 0 or clip_ratio_c > 1):
        raise ValueError(f"objective {objective!r}: clip_ratio_c must be 0 (off) or > 1, got {clip_ratio_c!r}")


def token_mask(inputs_mask_RxC, rewards_R, rollout_mask_R):
    """[R, C] completion tokens of real rollouts."""
    return as_bool(inputs_mask_RxC) & rollout_validity(rewards_R, rollout_mask_R)[:, None]


def _group_mean_of_rollouts(per_rollout_R, real_R, group_ids_R, num_groups):
    """(1/G_q) sum_i x_i per group, then the mean over non-empty groups; returns (J, n_groups)."""
    n_G = group_count(real_R, group_ids_R, num_groups, per_rollout_R.dtype)
    per_group_G = safe_div(group_sum(jnp.where(real_R, per_rollout_R, 0.0), group_ids_R, num_groups), n_G)
    return mean_over_groups(per_group_G, n_G > 0)


def _token_diagnostics(log_ratio_RxC, clipped_RxC, tok_RxC):
    n_tok = jnp.sum(tok_RxC.astype(log_ratio_RxC.dtype))
    return {
        "clip_frac": safe_div(jnp.sum(clipped_RxC & tok_RxC).astype(n_tok.dtype), n_tok),
        "approx_kl": safe_div(jnp.sum(jnp.where(tok_RxC, k3_kl(log_ratio_RxC), 0.0)), n_tok),
    }


def _clipped_objective(
    inputs: ObjectiveInputs,
    num_groups: int,
    *,
    eps_low,
    eps_high,
    normalize_std: bool,
    aggregation: str,
    length_normalizer=None,
    beta=0.0,
    keep_R=None,
    clip_ratio_c=0.0,
    std_estimator: str = "population",
    std_eps=0.0,
    singleton: str = "zero",
):
    """Shared body of GRPO / Dr. GRPO / DAPO. ``keep_R`` further restricts the real rollouts."""
    real_R = rollout_validity(inputs.rewards, inputs.rollout_mask)
    if keep_R is not None:
        real_R = real_R & keep_R
    tok_RxC = as_bool(inputs.mask) & real_R[:, None]
    adv_R = group_advantages(
        inputs.rewards,
        inputs.group_ids,
        num_groups,
        rollout_mask=real_R,
        normalize_std=normalize_std,
        std_estimator=std_estimator,
        std_eps=std_eps,
        singleton=singleton,
    ).astype(inputs.token_logp.dtype)
    log_ratio_RxC = token_log_ratio(inputs.token_logp, inputs.old_logp, tok_RxC)
    f_RxC, clipped_RxC = clipped_surrogate_terms(
        log_ratio_RxC, adv_R, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c
    )
    aux = _token_diagnostics(log_ratio_RxC, clipped_RxC, tok_RxC)
    if inputs.ref_logp is not None and not (isinstance(beta, (int, float)) and beta == 0):
        # DeepSeekMath's k3 penalty pi_ref/pi - log(pi_ref/pi) - 1 sits inside the token average.
        ref_RxC = jax.lax.stop_gradient(jnp.where(tok_RxC, inputs.ref_logp, 0.0))
        kl_RxC = k3_kl(jnp.where(tok_RxC, ref_RxC - inputs.token_logp, 0.0))
        f_RxC = f_RxC - beta * kl_RxC
        n_tok = jnp.sum(tok_RxC.astype(f_RxC.dtype))
        aux["ref_kl"] = safe_div(jnp.sum(jnp.where(tok_RxC, kl_RxC, 0.0)), n_tok)

    if aggregation == "token":
        n_tok = jnp.sum(tok_RxC.astype(f_RxC.dtype))
        value = safe_div(jnp.sum(jnp.where(tok_RxC, f_RxC, 0.0)), n_tok)
        aux["normalizer"] = jax.lax.stop_gradient(n_tok)
        return value, aux
    if length_normalizer is None:
        per_rollout_R = masked_token_mean(f_RxC, tok_RxC)
    else:
        per_rollout_R = masked_token_sum(f_RxC, tok_RxC) / length_normalizer
    value, n_groups = _group_mean_of_rollouts(per_rollout_R, real_R, inputs.group_ids, num_groups)
    aux["normalizer"] = n_groups
    return value, aux


def grpo_surrogate(
    new_logp,
    old_logp,
    mask,
    rewards,
    group_ids,
    num_groups: int,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    rollout_mask=None,
) -> jax.Array:
    """Paper Eq. 3 without KL: mean over non-empty groups of (1/G_q) sum_i (1/|o_i|) sum_t f(rho_it, A_i).

    A_i is Eq. 1 with the population std, and 0 in groups whose rewards are all equal.
    """
    inputs = ObjectiveInputs(
        token_logp=new_logp,
        old_logp=old_logp,
        mask=mask,
        rewards=rewards,
        group_ids=group_ids,
        rollout_mask=rollout_mask,
    )
    value, _ = _clipped_objective(
        inputs, num_groups, eps_low=eps_low, eps_high=eps_high, normalize_std=True, aggregation="group"
    )
    return value


@register_objective("grpo", uses_old_logp=True, uses_ref_logp=True, requires_ref=lambda h: h["beta"] != 0)
def grpo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    std_estimator: str = "population",
    std_eps: float = 0.0,
    singleton: str = "zero",
    clip_ratio_c: float = 0.0,
):
    """GRPO, DeepSeekMath (arXiv 2402.03300) Eq. 3 / this paper's Eq. 3-4.

    (1/G) sum_i (1/|o_i|) sum_t [min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta D_KL,t] per group,
    averaged over non-empty groups; A_i from Eq. 1 (population std). D_KL,t is the k3 estimator
    pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (DeepSeekMath Eq. 4), read from ``inputs.ref_logp`` only
    when ``beta != 0`` (default 0: no reference model, as in the ConSPO paper's baselines).
    Normaliser: number of non-empty groups. Diagnostics: clip_frac, approx_kl (k3 of pi_old vs pi_theta),
    ref_kl when beta != 0. Peer options (std_estimator, std_eps, singleton, clip_ratio_c): module doc.
    """
    del progress
    check_nonnegative("grpo", eps_low=eps_low, eps_high=eps_high, beta=beta)
    check_advantage_options("grpo", std_estimator=std_estimator, singleton=singleton, std_eps=std_eps)
    check_dual_clip("grpo", clip_ratio_c)
    return _clipped_objective(
        inputs,
        num_groups,
        eps_low=eps_low,
        eps_high=eps_high,
        normalize_std=True,
        aggregation="group",
        beta=beta,
        clip_ratio_c=clip_ratio_c,
        std_estimator=std_estimator,
        std_eps=std_eps,
        singleton=singleton,
    )


@register_objective("dr_grpo", uses_old_logp=True)
def dr_grpo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    length_normalizer: float = 0.0,
    singleton: str = "zero",
    clip_ratio_c: float = 0.0,
):
    """Dr. GRPO, "Understanding R1-Zero-Like Training" (arXiv 2503.20783), Sec. 3.2.

    Removes both of GRPO's biases: advantages are A_i = r_i - mean_q (no std division), and a rollout's
    token sum is divided by a *constant* L instead of its own length |o_i|:
    (1/G) sum_i (1/L) sum_t f(rho_it, A_i) per group, averaged over non-empty groups. The paper's
    objective has no 1/L at all; its reference code (oat) divides by the generation budget, which only
    rescales the step. ``length_normalizer=0`` (default) uses T, the padded response length of the batch:
    pass the max response length explicitly when micro-batches may be padded to different T.
    Normaliser: number of non-empty groups (L is a constant, not part of it).
    Peer options (singleton, clip_ratio_c; there is no std): module doc.
    """
    del progress
    check_nonnegative("dr_grpo", eps_low=eps_low, eps_high=eps_high)
    check_nonnegative("dr_grpo", length_normalizer=length_normalizer)
    check_advantage_options("dr_grpo", std_estimator="population", singleton=singleton)
    check_dual_clip("dr_grpo", clip_ratio_c)
    if isinstance(length_normalizer, (int, float)) and length_normalizer == 0:
        length_normalizer = inputs.token_logp.shape[1]
    return _clipped_objective(
        inputs,
        num_groups,
        eps_low=eps_low,
        eps_high=eps_high,
        normalize_std=False,
        aggregation="group",
        length_normalizer=length_normalizer,
        clip_ratio_c=clip_ratio_c,
        singleton=singleton,
    )


@register_objective("dapo", uses_old_logp=True)
def dapo(
    inputs: ObjectiveInputs,
    *,
    num_groups: int,
    progress=None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dynamic_sampling: bool = True,
    std_estimator: str = "population",
    std_eps: float = 0.0,
    clip_ratio_c: float = 0.0,
):
    """DAPO (arXiv 2503.14476) Eq. 8: clip-higher (eps_low=0.2, eps_high=0.28) and a token-level mean over
    all tokens of the batch, (1/sum_i |o_i|) sum_i sum_t f(rho_it, A_i), no KL; A_i from Eq. 1.

    ``dynamic_sampling=True`` drops groups whose rewards are all equal (DAPO's constraint
    0 < |{correct}| < G) from the batch, so their tokens do not dilute the token mean. DAPO proper also
    re-samples to refill the batch: do that upstream with :func:`dapo_dynamic_sampling_filter`, and add
    :func:`dapo_overlong_penalty` to the rewards for its soft overlong punishment.
    Normaliser: number of completion tokens kept. Diagnostics: clip_frac, approx_kl.
    Peer options (std_estimator, std_eps, clip_ratio_c): module doc. A one-rollout group is all-equal and
    DAPO drops those, so there is no singleton option.
    """
    del progress
    check_nonnegative("dapo", eps_low=eps_low, eps_high=eps_high)
    check_advantage_options("dapo", std_estimator=std_estimator, singleton="zero", std_eps=std_eps)
    check_dual_clip("dapo", clip_ratio_c)
    keep_R = None
    if dynamic_sampling:
        keep_R = dapo_dynamic_sampling_filter(
            inputs.rewards, inputs.group_ids, num_groups, rollout_mask=inputs.rollout_mask
        )
    return _clipped_objective(
        inputs,
        num_groups,
        eps_low=eps_low,
        eps_high=eps_high,
        normalize_std=True,
        aggregation="token",
        keep_R=keep_R,
        clip_ratio_c=clip_ratio_c,
        std_estimator=std_estimator,
        std_eps=std_eps,
    )


def dapo_dynamic_sampling_filter(rewards, group_ids, num_groups: int, *, rollout_mask=None) -> jax.Array:
    """DAPO's dynamic sampling (arXiv 2503.14476, Eq. 8 constraint): bool [R], True for real rollouts
    whose group's rewards are not all equal (so 0 < accuracy < 1 for binary rewards)."""
    real_R = rollout_validity(rewards, rollout_mask)
    spread_G = group_max(rewards, real_R, group_ids, num_groups) > group_min(rewards, real_R, group_ids, num_groups)
    return real_R & spread_G[group_ids]


def dapo_overlong_penalty(lengths, *, max_len: int, cache_len: int, penalty_factor: float = 1.0) -> jax.Array:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), to be *added* to the rewards.

    0 for |y| <= max_len - cache_len; ((max_len - cache_len) - |y|) / cache_len, falling linearly to -1,
    inside the cache; -1 beyond max_len; all times ``penalty_factor`` (verl's overlong_buffer.penalty_factor,
    1 in DAPO). DAPO uses max_len=20480, cache_len=4096.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"dapo_overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    if not penalty_factor >= 0:
        raise ValueError(f"dapo_overlong_penalty: penalty_factor must be >= 0, got {penalty_factor!r}")
    lengths = jnp.asarray(lengths).astype(jnp.result_type(float))
    expected = max_len - cache_len
    soft = (expected - lengths) / cache_len
    return penalty_factor * jnp.where(lengths <= expected, 0.0, jnp.where(lengths <= max_len, soft, -1.0))
