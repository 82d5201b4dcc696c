"""The ConSPO objective, its ablations and every baseline, behind one registry and one signature.

    from conspo_jax.objectives import ObjectiveInputs, get_objective
    J, aux = get_objective("conspo")(inputs, num_groups=G, progress=p, **hparams)

``J`` is a scalar to maximise; ``aux["normalizer"]`` is the stop-gradient count it averages over, so
micro-batches of whole groups combine exactly as sum_m J_m n_m / sum_m n_m. Everything is built from
segment reductions over a flat batch (no Python loop over groups) and runs under ``jax.jit``.

Registered names: conspo, conspo_no_contrastive, conspo_no_loglik, conspo_no_margin,
conspo_fixed_margin, grpo, dapo, dr_grpo, disco, gmpo, cispo, sapo, gspo.

Non-finite rewards are an error for every objective: ``check_rewards(rewards_R)`` (called by each
objective on concrete inputs, and by the trainer on the host before its jitted step) raises ValueError
naming the rollout row and value.
"""

# Imported for their registrations.
from conspo_jax.objectives import disco as _disco  # noqa: F401  pylint: disable=unused-import
from conspo_jax.objectives import ratio_family as _ratio_family  # noqa: F401  pylint: disable=unused-import
from conspo_jax.objectives.advantages import group_advantages, split_groups
from conspo_jax.objectives.conspo import (
    conspo_objective,
    infonce,
    linear_discriminative,
    margin_schedule,
)
from conspo_jax.objectives.correction import logprob_mismatch, mismatch_metrics, tis_weights
from conspo_jax.objectives.dapo_sampling import (
    BatchFill,
    fill_batch_with_varied_groups,
    resolve_dapo_rollout,
    shape_overlong_rewards,
)
from conspo_jax.objectives.grpo import (
    dapo_dynamic_sampling_filter,
    dapo_overlong_penalty,
    grpo_surrogate,
)
from conspo_jax.objectives.peers import PEER_PRESETS, apply_peer_preset, peer_hparams
from conspo_jax.objectives.registry import (
    Objective,
    ObjectiveInputs,
    check_rewards,
    get_objective,
    list_objectives,
    register_objective,
)
from conspo_jax.objectives.sequences import clipped_ratio_scores, sequence_scores

__all__ = [
    "logprob_mismatch",
    "mismatch_metrics",
    "tis_weights",
    "BatchFill",
    "Objective",
    "ObjectiveInputs",
    "PEER_PRESETS",
    "check_rewards",
    "apply_peer_preset",
    "clipped_ratio_scores",
    "conspo_objective",
    "dapo_dynamic_sampling_filter",
    "dapo_overlong_penalty",
    "fill_batch_with_varied_groups",
    "get_objective",
    "group_advantages",
    "grpo_surrogate",
    "infonce",
    "linear_discriminative",
    "list_objectives",
    "margin_schedule",
    "peer_hparams",
    "register_objective",
    "resolve_dapo_rollout",
    "sequence_scores",
    "shape_overlong_rewards",
    "split_groups",
]
