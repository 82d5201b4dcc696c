"""Host-side pieces of the trainer's collect stage: DAPO's dynamic sampling over generation rounds and its
overlong reward shaping, usable with any objective (``rollout.dynamic_sampling``, ``rollout.overlong_buffer``).

Dynamic sampling (DAPO, arXiv 2503.14476, Sec. 3.2; verl's ``algorithm.filter_groups``): a step generates
rounds of prompts drawn from the data iterator (``rollout.oversample`` batches of ``prompts_per_step``
prompts per round; verl's ``gen_batch_size / train_batch_size``), keeps the groups whose *verifier*
rewards are not all equal (verl's ``metric: acc``: the raw accuracy, before overlong shaping), and stops
once ``prompts_per_step`` groups are kept or after ``rollout.max_sampling_rounds`` rounds. Kept groups past
the target are discarded, as verl does. Where verl raises an error at its round cap, this trainer pads
the batch with dropped (all-equal) groups whose ``rollout_mask`` is 0: every objective ignores masked
rows, shapes stay fixed, and a study run does not die on one hard step (``rollout/padded_groups`` counts
them).

Seeds: round 0 samples with the seed a step always had (so a run without dynamic sampling is unchanged);
round k > 0 folds k into the step's key, so every round of every step has its own fixed seed and a resumed
run regenerates exactly the same rounds.

``Collector`` is the stage itself (generation rounds, verification, shaping); ``RolloutBatch`` (what it
hands on) and ``rollout_metrics`` (its per-step scalars) live here too.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from conspo_jax.base import distributed
from conspo_jax.objectives import check_rewards, fill_batch_with_varied_groups, shape_overlong_rewards
from conspo_jax.rollout import Rollouts, SamplingParams


@dataclasses.dataclass
class Round:
    """One generation round: its prompts' records, token ids, rollouts, raw verifier rewards and the
    seconds its engine call took."""

    records: list[dict]
    prompts: list[list[int]]
    rollouts: Rollouts
    rewards_R: np.ndarray
    generate_s: float = 0.0


def round_seed(rng_key_data, step: int, round_index: int) -> int:
    """The sampling seed of generation round ``round_index`` of RL step ``step`` (see the module doc)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng_key_data), step)
    if round_index:
        key = jax.random.fold_in(key, round_index)
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def gather_groups(rounds: list[Round], picks: list[tuple[int, int]], n: int):
    """(records, prompts, Rollouts, rewards_R) of the ``picks`` = (round, group) pairs, in that order.

    Groups are renumbered 0..len(picks)-1; completions are right-padded to the widest round.
    """
    width = max(rd.rollouts.completion_ids_RxC.shape[1] for rd in rounds)
    pad_id = rounds[0].rollouts.pad_id
    rows_by_pick = [(rounds[r], np.arange(g * n, (g + 1) * n)) for r, g in picks]
    ids = np.full((len(picks) * n, width), pad_id, np.int32)
    logp = np.zeros((len(picks) * n, width), np.float32)
    for i, (rd, rows) in enumerate(rows_by_pick):
        w = rd.rollouts.completion_ids_RxC.shape[1]
        ids[i * n : (i + 1) * n, :w] = rd.rollouts.completion_ids_RxC[rows]
        logp[i * n : (i + 1) * n, :w] = rd.rollouts.logprobs_RxC[rows]
    lens = np.concatenate([rd.rollouts.completion_lens_R[rows] for rd, rows in rows_by_pick]).astype(np.int32)
    reasons = [rd.rollouts.finish_reasons[k] for rd, rows in rows_by_pick for k in rows]
    rewards = np.concatenate([rd.rewards_R[rows] for rd, rows in rows_by_pick]).astype(np.float32)
    rollouts = Rollouts(
        ids,
        lens,
        logp,
        reasons,
        np.repeat(np.arange(len(picks), dtype=np.int32), n),
        weight_version=rounds[0].rollouts.weight_version,
        pad_id=pad_id,
        rewards_R=rewards,
    )
    records = [rounds[r].records[g] for r, g in picks]
    prompts = [rounds[r].prompts[g] for r, g in picks]
    return records, prompts, rollouts, rewards


def dynamic_batch(rounds: list[Round], *, target_groups: int, n: int):
    """The step's batch from the rounds generated so far: (picks, rollout_mask_R, stats).

    picks: ``target_groups`` (round, group) pairs, the varied groups first, then (only when the round
    cap left the batch short) padding groups taken from the dropped ones in generation order, masked 0.
    """
    fill = fill_batch_with_varied_groups([rd.rewards_R.reshape(-1, n) for rd in rounds], target_groups)
    picks = list(fill.selected)
    short = target_groups - len(picks)
    if short:
        chosen = set(picks)
        spare = [(r, g) for r in range(fill.rounds) for g in range(len(rounds[r].prompts)) if (r, g) not in chosen]
        picks += spare[:short]
    mask = np.repeat((np.arange(target_groups) < len(fill.selected)).astype(np.float32), n)
    stats = {
        "rollout/sampling_rounds": float(fill.rounds),
        "rollout/dropped_frac": float(fill.dropped_frac),
        "rollout/padded_groups": float(short),
    }
    return picks, mask, stats


def shape_rewards(rewards_R, lengths_R, *, max_len: int, buffer: int, penalty: float, rollout_mask_R=None):
    """(shaped rewards, stats): DAPO's overlong punishment (Eq. 13) added when ``buffer`` > 0; the stat
    ``rollout/overlong_penalty_mean`` averages the added term over real (unmasked) rows."""
    rewards = np.asarray(rewards_R, np.float32)
    if not buffer:
        return rewards, {}
    shaped = shape_overlong_rewards(rewards, lengths_R, max_len=max_len, buffer=buffer, penalty=penalty)
    real = np.ones_like(rewards) if rollout_mask_R is None else np.asarray(rollout_mask_R, np.float32)
    mean = float(np.sum((shaped - rewards) * real) / max(float(np.sum(real)), 1.0))
    return shaped, {"rollout/overlong_penalty_mean": mean}


@dataclasses.dataclass
class RolloutBatch:
    """What ``collect`` returns: a step's prompts and their verified rollouts.

    rewards_R:      the rewards the objective trains on (overlong shaping applied when it is on).
    rollout_mask_R: 0 on padding groups (dynamic sampling that hit its round cap), or None: all real.
    stats:          the collect stage's metrics (rollout/sampling_rounds, rollout/dropped_frac, ...).
    step:           the RL step (0-based) the batch was collected for.
    """

    records: list[dict]
    prompts: list[list[int]]
    rollouts: Rollouts
    rewards_R: np.ndarray
    generate_s: float
    rollout_mask_R: np.ndarray | None = None
    stats: dict = dataclasses.field(default_factory=dict)
    step: int = -1  # the RL step these rollouts are for


def rollout_metrics(rb: RolloutBatch, row: dict, t0: float) -> dict:
    """Per-step scalars about the rollouts themselves, over the global batch (every process's rows)."""
    rows_Rx3 = np.stack(
        [
            rb.rewards_R.astype(np.float64),
            rb.rollouts.completion_lens_R.astype(np.float64),
            np.asarray([f == "length" for f in rb.rollouts.finish_reasons], np.float64),
        ],
        axis=1,
    )
    rows_Rx3 = distributed.gather_rows(rows_Rx3)
    stats = distributed.allgather(rb.stats)
    return {
        "reward/mean": float(np.mean(rows_Rx3[:, 0])),
        "response_len/mean": float(np.mean(rows_Rx3[:, 1])),
        "rollout/truncated_frac": float(np.mean(rows_Rx3[:, 2])),
        "margin": row.get("objective/margin", 0.0),
        "time/generate_s": rb.generate_s,
        "rollout/staleness": float(rb.step - rb.rollouts.weight_version),
        "time/step_s": time.time() - t0,
        # reward/mean of the first draw, overlong shaping, dynamic sampling's rounds ...: per-process means
        # over equal numbers of groups, so their mean over processes is the global batch's.
        **{k: float(np.mean([st[k] for st in stats])) for k in sorted(rb.stats)},
    }


class Collector:
    """The collect stage: a step's prompts from the data iterator, sampled, verified and shaped.

    It holds what a collect reads (the rollout config, the task, the tokenizer, the data iterator, the host
    copy of the rollout seed key) and takes the engine per call, since the trainer owns (and may swap) it.
    With ``rollout.async_steps=1`` it runs on the producer thread, so it touches no device train state.
    """

    def __init__(
        self,
        rollout,
        *,
        task,
        tokenizer,
        data_iter,
        rng_host,
        stop_ids,
        dynamic_sampling: bool,
        overlong_buffer: int,
        batches_per_round: int,
    ):
        self.rollout, self.task, self.tokenizer, self.data_iter = rollout, task, tokenizer, data_iter
        self.rng_host, self.stop_ids = rng_host, stop_ids
        self.dynamic_sampling, self.overlong_buffer = dynamic_sampling, overlong_buffer
        self.batches_per_round = batches_per_round

    def collect(self, engine, step: int) -> RolloutBatch:
        """Generates the step's rollouts with ``engine`` and verifies them (unless the engine already did).

        With dynamic sampling, generates rounds of fresh prompts until ``prompts_per_step`` groups with
        varied rewards are found or ``rollout.max_sampling_rounds`` is reached; overlong shaping then adds
        DAPO's length penalty to the rewards (see the module doc).

        """
        r = self.rollout
        t0 = time.time()
        rounds = [self._generate_round(engine, step, 0)]
        stats, mask = {}, None
        if self.dynamic_sampling:
            while True:
                picks, mask, stats = dynamic_batch(rounds, target_groups=r.prompts_per_step, n=r.n)
                if not stats["rollout/padded_groups"] or len(rounds) >= r.max_sampling_rounds:
                    break
                rounds.append(self._generate_round(engine, step, len(rounds)))
            records, prompts, rollouts, raw = gather_groups(rounds, picks, r.n)
        else:
            records, prompts, rollouts, raw = (
                rounds[0].records,
                rounds[0].prompts,
                rounds[0].rollouts,
                rounds[0].rewards_R,
            )
        rewards, shaping = shape_rewards(
            raw,
            rollouts.completion_lens_R,
            max_len=r.max_new_tokens,
            buffer=self.overlong_buffer,
            penalty=r.overlong_penalty,
            rollout_mask_R=mask,
        )
        stats.update(shaping)
        # reward/mean: the policy's accuracy on the step's first draw of prompts, comparable across objectives
        # (the trained batch is biased towards mixed groups when dynamic sampling is on).
        stats["reward/mean"] = float(np.mean(rounds[0].rewards_R))
        if self.dynamic_sampling or self.overlong_buffer:
            real = np.ones_like(rewards) if mask is None else mask
            stats["reward/trained_mean"] = float(np.sum(rewards * real) / max(np.sum(real), 1.0))
        stats["time/collect_s"] = time.time() - t0  # all rounds, verification and shaping included
        generate_s = sum(rd.generate_s for rd in rounds)  # the engine calls alone, as before dynamic sampling
        return RolloutBatch(records, prompts, rollouts, rewards, generate_s, mask, stats, step)

    def _generate_round(self, engine, step: int, index: int) -> Round:
        """Generation round ``index`` of ``step``: the next data batch(es), sampled and verified."""
        r = self.rollout
        records = [rec for _ in range(self.batches_per_round) for rec in next(self.data_iter)]  # {id, problem, answer}
        prompts = [self.task.encode(rec) for rec in records]
        sampling = SamplingParams(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=round_seed(self.rng_host, step, index),
        )
        answers = [rec["answer"] for rec in records]
        ids = [str(rec.get("id", i)) for i, rec in enumerate(records)]
        t0 = time.time()
        rollouts = engine.generate(prompts, sampling, answers=answers, prompt_ids=ids)
        generate_s = time.time() - t0
        rewards = rollouts.rewards_R
        if rewards is None:
            texts = self.tokenizer.batch_decode(rollouts.completions(), skip_special_tokens=True)
            rewards = self.task.reward(texts, [answers[g] for g in rollouts.group_ids_R])
        check_rewards(rewards)  # a non-finite reward is an error naming the rollout, for every objective
        return Round(records, prompts, rollouts, np.asarray(rewards, np.float32), generate_s)
