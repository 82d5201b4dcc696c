"""The functional verifier API, backed by one lazily created ``RewardPool`` per process."""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from conspo_jax.rewards import extract as ex
from conspo_jax.rewards.pool import DEFAULT_TIMEOUT_S, RewardPool

_DEFAULT: RewardPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool(num_workers: int | None = None) -> RewardPool:
    """The process-wide pool behind ``math_reward``; rebuilt only if ``num_workers`` asks for another size."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        stale = _DEFAULT is None or _DEFAULT._closed or _DEFAULT._owner != os.getpid()
        if stale or (num_workers is not None and _DEFAULT.num_workers != num_workers):
            if _DEFAULT is not None:
                _DEFAULT.close()
            _DEFAULT = RewardPool(num_workers)
        return _DEFAULT


def shutdown_default_pool() -> None:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is not None:
            _DEFAULT.close()
            _DEFAULT = None


atexit.register(shutdown_default_pool)


def math_reward(response: str, ground_truth, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last ``\\boxed{}`` answer in ``response`` equals ``ground_truth``, else 0.0.

    Easy cases (no box, identical answers, integers of any length) never leave this process and cost
    time linear in ``len(response)``; an answer or ground truth over ``MAX_ANSWER_CHARS`` that they do
    not decide scores 0.0; the rest go to a shared worker pool, so a pathological answer costs at most
    ``timeout_s`` of CPU once the pool is warm, and no call returns later than 2 s (the pool's ``max_wall_s``, 1.8 s, plus
    reaping) after it started, queueing for a busy worker included (see ``conspo_jax.rewards.pool``).
    Calls from many threads at once are spread over all workers.
    """
    started = time.monotonic()
    if not isinstance(response, str):
        raise TypeError(f"math_reward: response must be str, got {type(response).__name__}")
    box = ex.extract_boxed(response)
    if box is None:
        return 0.0
    pred, gold = ex.normalize_answer(box), ex.ground_truth_answer(ground_truth)
    quick = ex.quick_verdict(pred, gold)
    if quick is not None:
        return quick[0]
    if max(len(pred), len(gold)) > ex.MAX_ANSWER_CHARS:
        return 0.0
    (v,) = default_pool().verify([response], [ground_truth], timeout_s=timeout_s, started=started)
    return v.score


def math_reward_batch(
    responses: Sequence[str],
    ground_truths: Sequence,
    *,
    num_workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: RewardPool | None = None,
) -> np.ndarray:
    """Rewards for a batch as float32 1.0 / 0.0, verified in parallel (``pool`` or the shared pool)."""
    pool = pool if pool is not None else default_pool(num_workers)
    return pool.score(responses, ground_truths, timeout_s=timeout_s)
