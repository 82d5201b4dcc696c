"""The math answer verifier: last-``\\boxed{}`` extraction and math-verify comparison in worker processes.

Public API:
  math_reward(response, ground_truth) -> float            one pair, 1.0 or 0.0
  math_reward_batch(responses, ground_truths) -> ndarray  a batch, verified in parallel
  RewardPool                                              reusable worker pool (context manager)
  Verdict                                                 score + extracted answer + how it was decided
  extract_boxed(text) -> str | None                       content of the last \\boxed{} / \\fbox{}

Bounds, whatever the response: box extraction and the in-process checks are linear in its length
(a megabyte of look-alike commands or braces costs at most ~0.1 s of CPU); integers of any length compare as
digit strings (no int-conversion limit); answers over MAX_ANSWER_CHARS that those checks do not
decide score 0.0; everything else runs in a worker with a CPU budget (default 1.5 s). No call (one
response's verification) returns later than 2 s after it started (the deadline ``max_wall_s`` fires at 1.8 s), queueing included:
past that it scores 0.0 and a worker still on it is killed. Concurrent callers share every worker.
bench/verifier.py measures it.
"""

from conspo_jax.rewards.api import default_pool, math_reward, math_reward_batch, shutdown_default_pool
from conspo_jax.rewards.extract import MAX_ANSWER_CHARS, extract_boxed, normalize_answer
from conspo_jax.rewards.pool import RewardPool
from conspo_jax.rewards.verdict import Verdict

__all__ = [
    "MAX_ANSWER_CHARS",
    "RewardPool",
    "Verdict",
    "default_pool",
    "extract_boxed",
    "math_reward",
    "math_reward_batch",
    "normalize_answer",
    "shutdown_default_pool",
]
