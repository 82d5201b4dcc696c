"""Turns prompts and verified rollouts into the fixed-shape arrays the jitted update consumes.

Every rollout row is ``[left-padded prompt | right-padded completion]`` with the prompt padded to
``prompt_len`` and the completion to ``completion_len``, so one compiled program serves every step.
Rows stay prompt-major (the n samples of a prompt are adjacent), which lets micro-batches take whole
groups as contiguous slices.
"""

from __future__ import annotations

import numpy as np

from conspo_jax.configs import UsageError


def build_rl_batch(prompts, rollouts, rewards_R, *, prompt_len: int, completion_len: int, pad_id: int) -> dict:
    """Arrays for ``P`` prompts x ``n`` samples; ``rollouts`` is a ``conspo_jax.rollout.Rollouts``."""
    rows = rollouts.num_rows
    n = rows // len(prompts)
    width = prompt_len + completion_len
    ids = np.full((rows, width), pad_id, np.int32)
    attn = np.zeros((rows, width), np.int32)
    cmask = np.zeros((rows, completion_len), np.float32)
    engine_logp = np.zeros((rows, completion_len), np.float32)
    for r in range(rows):
        prompt = prompts[rollouts.group_ids_R[r]]
        if len(prompt) > prompt_len:
            raise UsageError(f"data.max_prompt_len={prompt_len} is shorter than a prompt of {len(prompt)} tokens")
        m = min(int(rollouts.completion_lens_R[r]), completion_len)
        ids[r, prompt_len - len(prompt) : prompt_len] = prompt
        attn[r, prompt_len - len(prompt) : prompt_len + m] = 1
        ids[r, prompt_len : prompt_len + m] = rollouts.completion_ids_RxC[r, :m]
        cmask[r, :m] = 1.0
        engine_logp[r, :m] = rollouts.logprobs_RxC[r, :m]
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": cmask,
        "engine_logp": engine_logp,
        "rewards": np.asarray(rewards_R, np.float32),
        "group_ids": rollouts.group_ids_R.astype(np.int32),
        "rollout_mask": np.ones((rows,), np.float32),
        "_n": n,
    }


def split_micro_batches(batch: dict, *, mini_batches: int, micro_batch_groups: int) -> list[dict]:
    """Splits a step's batch into ``mini_batches`` updates, each stacked as [M, rows, ...] micro-batches.

    Group ids are renumbered to start at 0 inside each micro-batch, whose static group count is
    ``micro_batch_groups``.
    """
    n = batch["_n"]
    groups = batch["rewards"].shape[0] // n
    if groups % mini_batches:
        raise UsageError(f"train.mini_batches={mini_batches} does not divide rollout.prompts_per_step={groups}")
    per_mini = groups // mini_batches
    g_micro = micro_batch_groups or per_mini
    if per_mini % g_micro:
        raise UsageError(f"train.micro_batch_groups={g_micro} does not divide the {per_mini} groups of a mini-batch")
    out = []
    for m in range(mini_batches):
        micro = []
        for k in range(per_mini // g_micro):
            g0 = m * per_mini + k * g_micro
            rows = slice(g0 * n, (g0 + g_micro) * n)
            mb = {key: v[rows] for key, v in batch.items() if not key.startswith("_")}
            mb["group_ids"] = mb["group_ids"] - g0
            micro.append(mb)
        out.append({key: np.stack([mb[key] for mb in micro]) for key in micro[0]})
    return out
