"""The overlapped-rollout producer (``rollout.async_steps=1``): step t+1's rollouts are collected on a
thread while step t's update runs, one step off-policy as verl's one-step-off-policy trainer.

The producer only schedules: what it runs is the trainer's collect stage, handed in as a callable, so
the batch is exactly the one a synchronous run would have collected for that step, from the weights
of one version earlier. It also owns the two rules that make the overlap safe:

- the engine samples from a copy of the train state's parameters (``engine_weights``), since the next
  update donates, and so deletes, the buffers it was handed;
- a batch is trained on only at the step it was collected for, from weights at most
  ``async_steps + rollout.sidecar.max_staleness`` versions old (``check_staleness``).

With ``async_steps=0`` every method is a no-op that keeps the synchronous run's behaviour.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import jax
import jax.numpy as jnp

from conspo_jax.train.collect import RolloutBatch


class Producer:
    """Collects the next step's batch on one background thread (named ``rollouts``) when overlapped."""

    def __init__(self, async_steps: int, *, max_staleness: int = 0):
        self.async_steps = int(async_steps)
        self.max_staleness = int(max_staleness)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "rollouts") if self.async_steps else None

    def submit(self, collect: Callable[[int], RolloutBatch], step: int, total_steps: int):
        """Starts ``collect(step)`` on the thread (a future), or None when not overlapped or past the end."""
        if self._pool is None or step >= total_steps:
            return None
        return self._pool.submit(collect, step)

    @staticmethod
    def wait(future) -> RolloutBatch | None:
        """The batch ``future`` collected (None for no future): the next step's, held in flight meanwhile."""
        return future.result() if future is not None else None

    def engine_weights(self, params):
        """The parameters the engine samples from: the train state's own, or a copy when overlapped.

        An overlapped run's producer thread samples while the next update donates (and so deletes) the
        train state's buffers, from the very first step on.
        """
        if self.async_steps:
            return jax.tree.map(jnp.copy, params)
        return params

    def check_staleness(self, rb: RolloutBatch, step: int) -> RolloutBatch:
        """The rollouts trained on at ``step`` came from weights at most ``rollout.async_steps`` versions old."""
        if rb.step != step:
            raise RuntimeError(f"step {step} got the rollouts collected for step {rb.step}")
        staleness = step - int(rb.rollouts.weight_version)
        limit = self.async_steps + self.max_staleness
        if staleness > limit:
            raise RuntimeError(
                f"step {step} got rollouts from weight version {rb.rollouts.weight_version}: {staleness} "
                f"versions old, over the bound of {limit} (rollout.async_steps + rollout.sidecar.max_staleness)"
            )
        return rb

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
