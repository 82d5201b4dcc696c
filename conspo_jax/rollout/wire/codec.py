"""Conversions between the engine's typed values (SamplingParams, Rollouts) and the wire messages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conspo_jax.rollout.engine import FINISH_LENGTH, FINISH_STOP, Rollouts, SamplingParams
from conspo_jax.rollout.wire import rollout_pb2 as pb

_FINISH_TO_PB = {FINISH_STOP: pb.FINISH_REASON_STOP, FINISH_LENGTH: pb.FINISH_REASON_LENGTH}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_new_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        seed=params.seed,
    )


def params_from_proto(msg: pb.SamplingParams, n: int) -> SamplingParams:
    """Raises ValueError naming the field and value (SamplingParams validates every field)."""
    # float32 on the wire: round top_p=1.0000001 style artefacts back into range before validating.
    top_p = 1.0 if abs(msg.top_p - 1.0) < 1e-6 else float(msg.top_p)
    return SamplingParams(
        n=int(n),
        temperature=float(msg.temperature),
        top_p=top_p,
        top_k=int(msg.top_k),
        max_new_tokens=int(msg.max_new_tokens),
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        seed=int(msg.seed),
    )


def groups_from_rollouts(rollouts: Rollouts, prompt_ids: Sequence[str], n: int) -> list[pb.Group]:
    """One Group per prompt (rewards unset); rows of ``rollouts`` are prompt-major."""
    if rollouts.num_rows != len(prompt_ids) * n:
        raise ValueError(f"engine returned {rollouts.num_rows} rows for {len(prompt_ids)} prompts x n={n}")
    groups = []
    for p, pid in enumerate(prompt_ids):
        samples = []
        for r in range(p * n, (p + 1) * n):
            length = int(rollouts.completion_lens_R[r])
            samples.append(
                pb.Sample(
                    completion_ids=rollouts.completion_ids_RxC[r, :length].tolist(),
                    token_logprobs=rollouts.logprobs_RxC[r, :length].tolist(),
                    finish_reason=_FINISH_TO_PB[rollouts.finish_reasons[r]],
                )
            )
        groups.append(pb.Group(prompt_id=pid, samples=samples, weight_version=int(rollouts.weight_version)))
    return groups


def rollouts_from_groups(groups: Sequence[pb.Group], n: int, *, pad_id: int = 0) -> Rollouts:
    """Stacks groups (already in prompt order) into prompt-major Rollouts with ``rewards_R`` attached
    when every sample carries a reward, None when none does."""
    samples = [s for g in groups for s in g.samples]
    if len(samples) != len(groups) * n:
        raise ValueError(f"expected {len(groups) * n} samples ({len(groups)} groups x n={n}), got {len(samples)}")
    width = max([1, *(len(s.completion_ids) for s in samples)])
    ids = np.full((len(samples), width), pad_id, np.int32)
    logp = np.zeros((len(samples), width), np.float32)
    lens = np.zeros(len(samples), np.int32)
    for i, s in enumerate(samples):
        k = len(s.completion_ids)
        if len(s.token_logprobs) != k:
            raise ValueError(f"sample {i}: {k} completion ids but {len(s.token_logprobs)} log-probs")
        ids[i, :k] = s.completion_ids
        logp[i, :k] = s.token_logprobs
        lens[i] = k
    has = [s.HasField("reward") for s in samples]
    if any(has) and not all(has):
        raise ValueError("some samples carry a reward and some do not")
    rewards = np.array([s.reward for s in samples], np.float32) if samples and all(has) else None
    try:
        reasons = [_FINISH_FROM_PB[s.finish_reason] for s in samples]
    except KeyError as e:
        raise ValueError(f"sample has finish_reason={e.args[0]}, expected STOP or LENGTH") from None
    return Rollouts(
        completion_ids_RxC=ids,
        completion_lens_R=lens,
        logprobs_RxC=logp,
        finish_reasons=reasons,
        group_ids_R=np.repeat(np.arange(len(groups), dtype=np.int32), n),
        weight_version=min((int(g.weight_version) for g in groups), default=0),
        pad_id=pad_id,
        rewards_R=rewards,
    )
