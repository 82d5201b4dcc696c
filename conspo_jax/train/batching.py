"""Turns prompts and verified rollouts into the fixed-shape, typed batches the jitted update consumes.

Every rollout row is ``[left-padded prompt | right-padded completion]`` with the prompt padded to
``prompt_len`` and the completion to ``completion_len``, so one compiled program serves every step.
Rows stay prompt-major (the n samples of a prompt are adjacent), which lets micro-batches take whole
groups as contiguous slices.
"""

from __future__ import annotations

import flax
import jax
import numpy as np

from conspo_jax.base.configs import UsageError


@flax.struct.dataclass
class RLBatch:
    """One batch of rollout rows (R = groups x group_size), or micro-batches stacked as [M, R, ...].

    input_ids, attention_mask: [R, T] int32, T = prompt_len + completion_len.
    completion_mask:           [R, C] float32, 1 on completion tokens.
    engine_logp:               [R, C] the engine's log-probs of the sampled tokens (0 on padding).
    rewards, rollout_mask:     [R] float32 verifier rewards; 1 on real rows.
    group_ids:                 [R] int32 prompt index of each row, from 0 within a (micro-)batch.
    old_logp:                  [R, C] log-probs under the policy before this step's updates, or None
                               when the objective needs none (the update then uses its own, stopped).
    group_size:                samples per prompt (static: part of the compiled program's shape).
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    completion_mask: jax.Array
    engine_logp: jax.Array
    rewards: jax.Array
    group_ids: jax.Array
    rollout_mask: jax.Array
    old_logp: jax.Array | None = None
    group_size: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[-1] // self.group_size


def build_rl_batch(
    prompts, rollouts, rewards_R, *, prompt_len: int, completion_len: int, pad_id: int, group_size: int
) -> RLBatch:
    """The batch of ``len(prompts)`` prompts x ``group_size`` samples; ``rollouts`` is a ``Rollouts``."""
    rows = rollouts.num_rows
    if rows != len(prompts) * group_size:
        raise ValueError(f"build_rl_batch: {rows} rollout rows for {len(prompts)} prompts x {group_size} samples")
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
    return RLBatch(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=cmask,
        engine_logp=engine_logp,
        rewards=np.asarray(rewards_R, np.float32),
        group_ids=rollouts.group_ids_R.astype(np.int32),
        rollout_mask=np.ones((rows,), np.float32),
        group_size=group_size,
    )


def micro_batch_layout(groups: int, *, mini_batches: int, micro_batch_groups: int) -> tuple[int, int]:
    """(micro-batches per update, groups per micro-batch) for ``groups`` prompt groups a step."""
    if groups % mini_batches:
        raise UsageError(f"train.mini_batches={mini_batches} does not divide rollout.prompts_per_step={groups}")
    per_mini = groups // mini_batches
    g_micro = micro_batch_groups or per_mini
    if per_mini % g_micro:
        raise UsageError(f"train.micro_batch_groups={g_micro} does not divide the {per_mini} groups of a mini-batch")
    return per_mini // g_micro, g_micro


def split_micro_batches(batch: RLBatch, *, mini_batches: int, micro_batch_groups: int) -> list[RLBatch]:
    """Splits a step's batch into ``mini_batches`` updates, each stacked as [M, rows, ...] micro-batches.

    Group ids are renumbered to start at 0 inside each micro-batch, whose static group count is
    ``micro_batch_groups``.
    """
    n = batch.group_size
    num_micro, g_micro = micro_batch_layout(
        batch.num_groups, mini_batches=mini_batches, micro_batch_groups=micro_batch_groups
    )
    out = []
    for m in range(mini_batches):
        micro = []
        for k in range(num_micro):
            g0 = (m * num_micro + k) * g_micro
            rows = slice(g0 * n, (g0 + g_micro) * n)
            mb = jax.tree.map(lambda v, rows=rows: v[rows], batch)
            micro.append(mb.replace(group_ids=mb.group_ids - g0))
        out.append(jax.tree.map(lambda *xs: np.stack(xs), *micro))
    return out


def process_layout(rollout, train, *, dynamic_sampling: bool) -> tuple[int, int]:
    """(micro-batches per step, groups each process adds to a micro-batch) of a run on every process.

    With P processes each global micro-batch takes g_micro / P whole groups from every process
    (the pipeline hands each process its slice of every micro-batch, ``num_chunks``)."""
    r, t = rollout, train
    num_micro, g_micro = micro_batch_layout(
        r.prompts_per_step, mini_batches=t.mini_batches, micro_batch_groups=t.micro_batch_groups
    )
    procs = jax.process_count()
    if procs > 1:
        # Each of these would have the processes issue collectives (the sampler's per-round agreement,
        # metric gathers) in orders that can differ between processes, and hang.
        single = {
            "rollout.async_steps": r.async_steps,  # a producer thread beside the main thread
            "train.diagnostics_every": t.diagnostics_every,
        }
        if dynamic_sampling:  # each process would draw its own number of rounds
            single["rollout.dynamic_sampling"] = r.dynamic_sampling
        for key, value in single.items():
            if value:
                raise UsageError(f"{key}={value!r} runs on one process only for now, not {procs}")
    if g_micro % procs:
        raise UsageError(
            f"rollout.prompts_per_step={r.prompts_per_step}: the {g_micro} groups of a micro-batch do not "
            f"split over {procs} processes (every prompt group stays inside one process)"
        )
    return t.mini_batches * num_micro, g_micro // procs
