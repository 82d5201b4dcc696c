"""Figure 1 (left) from real training: per-rollout credit against the positive-negative score gap.

``train.diagnostics_every=K`` makes the trainer write ``<workdir>/diagnostics/step_<s>.npz`` every K RL
steps, from the batch that step trains on and the parameters it starts from (the policy that sampled
it). Every rollout is scored as ConSPO scores it, s = (1/|o|) sum_t log pi(o_t | q, o_<t) (Sec. 4.2), and
gets the credit dJ/ds each objective assigns it *per group* (the derivative of one group's objective):

* GRPO, Lemma 1 / Eq. 9: +sqrt(p(1-p))/N+ for every positive, -sqrt(p(1-p))/N- for every negative;
* ConSPO, Lemma 2 / Eq. 12 with the scheduled margin m_t: (1 - P_i+)/N+ for a positive and
  -sum_i P_ij-/N+ for a negative.

Both come from ``jax.grad`` of the library's own group objectives (``linear_discriminative``,
``conspo_objective``), which average over the valid groups; the dump multiplies by that count so the
numbers are per-group credits, as in the paper. The score gap is s_i+ minus the mean negative score of
its group for a positive, and s_j- minus the mean positive score for a negative (the notebook's axes).
Rollouts outside valid groups (no positive or no negative, or padding) have ``valid_R`` False, credit 0
and gap NaN.

Fields (R = rows of the step's batch): step, objective, progress, tau, margin, scores_R, rewards_R,
group_ids_R, is_pos_R, valid_R, gap_R, credit_grpo_R, credit_conspo_R.
"""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np

from conspo_jax.objectives import conspo_objective, linear_discriminative, margin_schedule, sequence_scores
from conspo_jax.objectives.advantages import split_groups

DUMP_FIELDS = (
    "step",
    "objective",
    "progress",
    "tau",
    "margin",
    "scores_R",
    "rewards_R",
    "group_ids_R",
    "is_pos_R",
    "valid_R",
    "gap_R",
    "credit_grpo_R",
    "credit_conspo_R",
)


def credits(scores_R, rewards_R, group_ids_R, rollout_mask_R, num_groups: int, *, tau, margin, reward_threshold=0.5):
    """dict of numpy [R] arrays: is_pos_R, valid_R, gap_R, credit_grpo_R, credit_conspo_R (module doc)."""
    scores = jnp.asarray(scores_R, jnp.float32)
    rewards = jnp.asarray(rewards_R, jnp.float32)
    gids = jnp.asarray(group_ids_R, jnp.int32)
    mask = jnp.asarray(rollout_mask_R, jnp.float32)
    split = split_groups(rewards, gids, num_groups, rollout_mask_R=mask, reward_threshold=reward_threshold)
    n_valid = float(jnp.sum(split.valid_G))
    grpo = jax.grad(lambda s: linear_discriminative(s, split, gids, num_groups)[0])(scores)
    conspo = jax.grad(
        lambda s: conspo_objective(
            s, rewards, gids, num_groups, tau=tau, margin=margin, rollout_mask=mask, reward_threshold=reward_threshold
        )
    )(scores)
    is_pos = np.asarray(split.is_pos_R)
    valid = np.asarray(split.valid_G)[np.asarray(gids)] & (is_pos | np.asarray(split.is_neg_R))
    s = np.asarray(scores, np.float64)
    g = np.asarray(gids)
    mean_pos = np.array(
        [
            s[(g == k) & is_pos & valid].mean() if ((g == k) & is_pos & valid).any() else np.nan
            for k in range(num_groups)
        ]
    )
    mean_neg = np.array(
        [
            s[(g == k) & ~is_pos & valid].mean() if ((g == k) & ~is_pos & valid).any() else np.nan
            for k in range(num_groups)
        ]
    )
    gap = np.where(is_pos, s - mean_neg[g], s - mean_pos[g])
    return {
        "is_pos_R": is_pos,
        "valid_R": valid,
        "gap_R": np.where(valid, gap, np.nan).astype(np.float32),
        "credit_grpo_R": np.where(valid, np.asarray(grpo) * n_valid, 0.0).astype(np.float32),
        "credit_conspo_R": np.where(valid, np.asarray(conspo) * n_valid, 0.0).astype(np.float32),
    }


def write_credit_dump(path: str, batch, logp_RxC, *, objective: str, conspo_hparams: dict, progress: float, step: int):
    """Writes ``path`` (npz, atomically) for one step's ``RLBatch`` and its log-probs [R, C] (module doc)."""
    scores = np.asarray(sequence_scores(jnp.asarray(logp_RxC), jnp.asarray(batch.completion_mask)))
    tau = float(conspo_hparams["tau"])
    margin = float(
        margin_schedule(progress, max_margin=conspo_hparams["max_margin"], warmup_ratio=conspo_hparams["warmup_ratio"])
    )
    out = credits(
        scores,
        batch.rewards,
        batch.group_ids,
        batch.rollout_mask,
        batch.num_groups,
        tau=tau,
        margin=margin,
        reward_threshold=float(conspo_hparams.get("reward_threshold", 0.5)),
    )
    out.update(
        step=np.int32(step),
        objective=np.str_(objective),
        progress=np.float32(progress),
        tau=np.float32(tau),
        margin=np.float32(margin),
        scores_R=scores.astype(np.float32),
        rewards_R=np.asarray(batch.rewards, np.float32),
        group_ids_R=np.asarray(batch.group_ids, np.int32),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **out)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
