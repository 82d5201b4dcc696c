"""Rollout generation: the engine interface, its typed output, and the engines behind it."""

from conspo_jax.rollout.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    MockEngine,
    RolloutEngine,
    Rollouts,
    SamplingParams,
)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "MockEngine",
    "RolloutEngine",
    "Rollouts",
    "SamplingParams",
]
