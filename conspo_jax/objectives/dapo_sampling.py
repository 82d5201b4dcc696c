"""DAPO's two data-side techniques as pure host functions for the trainer's collect stage.

Dynamic sampling (arXiv 2503.14476, Sec. 3.2): over-sample, drop groups whose rewards are all equal
(accuracy 0 or 1: zero advantage, no gradient), and keep generating rounds until the batch holds
``target_groups`` groups, with a cap on rounds. Overlong reward shaping (Sec. 3.4, Eq. 13): add
:func:`~conspo_jax.objectives.grpo.dapo_overlong_penalty` to the rewards.

Proposed config keys (``rollout.*``; any objective may use them, on by default only for DAPO):

    dynamic_sampling    'auto'  'auto' = on for objective dapo only; 'on' / 'off'
    max_sampling_rounds 10      generation rounds per step at most, the first included (DAPO's recipe: 10)
    overlong_buffer     -1      L_cache in tokens; -1 = auto (max_new_tokens // 5 for dapo, DAPO's 4096 of
                                20480; 0 otherwise); 0 = off. L_max is rollout.max_new_tokens.
    overlong_penalty    1.0     the penalty factor: the punishment falls to -overlong_penalty at L_max

Usage in the collect stage::

    on, buffer = resolve_dapo_rollout(config.objective.name, dynamic_sampling=r.dynamic_sampling, ...)
    rounds = []
    while True:
        rollouts = engine.generate(...)                 # one round of prompts
        rounds.append(rewards_GxN)                      # [G_r, n], NaN where a rollout is missing
        fill = fill_batch_with_varied_groups(rounds, target_groups=r.prompts_per_step)
        if not on or fill.full or len(rounds) >= r.max_sampling_rounds:
            break
    # train on fill.selected (round, group) pairs; log fill.rounds and fill.dropped_frac
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from conspo_jax.objectives.grpo import dapo_overlong_penalty

DYNAMIC_SAMPLING_MODES = ("auto", "on", "off")


class BatchFill(NamedTuple):
    """The groups selected for one training batch from several generation rounds.

    selected:     (round, group) pairs in generation order, at most target_groups of them.
    full:         whether target_groups varied groups were found.
    rounds:       rounds actually needed (the last round is the one that filled the batch, or the last given).
    generated:    groups generated in those rounds.
    dropped:      all-equal groups among them (what dynamic sampling throws away).
    dropped_frac: dropped / generated (0 when nothing was generated).
    """

    selected: list[tuple[int, int]]
    full: bool
    rounds: int
    generated: int
    dropped: int
    dropped_frac: float


def varied_groups(rewards_GxN) -> np.ndarray:
    """bool [G]: the group has at least two real (non-NaN) rollouts whose rewards are not all equal."""
    r = np.asarray(rewards_GxN, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards_GxN must be [groups, n], got shape {r.shape}")
    real = ~np.isnan(r)
    hi = np.where(real, r, -np.inf).max(axis=1)
    lo = np.where(real, r, np.inf).min(axis=1)
    return (real.sum(axis=1) >= 2) & (hi > lo)


def fill_batch_with_varied_groups(round_rewards: Sequence, target_groups: int) -> BatchFill:
    """DAPO dynamic sampling: the first ``target_groups`` varied groups over the rounds, in order.

    ``round_rewards[r]`` is round r's rewards as [G_r, n] (NaN marks a missing rollout). Pure: call it
    again with one more round until ``full`` or the round cap; the rounds after the filling one are
    not counted (they should not have been generated).
    """
    if isinstance(target_groups, bool) or not isinstance(target_groups, (int, np.integer)) or target_groups < 1:
        raise ValueError(f"target_groups must be a positive int, got {target_groups!r}")
    selected: list[tuple[int, int]] = []
    generated = dropped = rounds = 0
    for r, rewards in enumerate(round_rewards):
        if len(selected) >= target_groups:
            break
        keep = varied_groups(rewards)
        rounds, generated, dropped = r + 1, generated + keep.size, dropped + int((~keep).sum())
        selected += [(r, int(g)) for g in np.flatnonzero(keep)][: target_groups - len(selected)]
    return BatchFill(
        selected=selected,
        full=len(selected) >= target_groups,
        rounds=rounds,
        generated=generated,
        dropped=dropped,
        dropped_frac=dropped / generated if generated else 0.0,
    )


def resolve_dapo_rollout(
    objective: str, *, dynamic_sampling: str, overlong_buffer: int, max_new_tokens: int
) -> tuple[bool, int]:
    """(dynamic sampling on?, overlong buffer L_cache in tokens) from the config keys above."""
    if dynamic_sampling not in DYNAMIC_SAMPLING_MODES:
        raise ValueError(f"rollout.dynamic_sampling must be one of {DYNAMIC_SAMPLING_MODES}, got {dynamic_sampling!r}")
    on = dynamic_sampling == "on" or (dynamic_sampling == "auto" and objective == "dapo")
    if overlong_buffer == -1:
        overlong_buffer = max(1, max_new_tokens // 5) if objective == "dapo" else 0
    if not 0 <= overlong_buffer <= max_new_tokens:
        raise ValueError(
            f"rollout.overlong_buffer must be -1 (auto) or in [0, rollout.max_new_tokens={max_new_tokens}], "
            f"got {overlong_buffer!r}"
        )
    return on, int(overlong_buffer)


def shape_overlong_rewards(rewards_R, lengths_R, *, max_len: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
    """rewards + DAPO's soft overlong punishment (Eq. 13) with L_max = max_len, L_cache = buffer; 0 = off."""
    rewards = np.asarray(rewards_R, dtype=np.float32)
    if buffer == 0:
        return rewards
    return rewards + np.asarray(
        dapo_overlong_penalty(lengths_R, max_len=max_len, cache_len=buffer, penalty_factor=penalty)
    )
