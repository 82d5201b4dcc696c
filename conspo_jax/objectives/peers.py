"""Named presets that make a GRPO-family objective follow a peer library's defaults instead of the paper's.

    hp = peer_hparams("verl", "grpo")       # {'std_estimator': 'unbiased', 'std_eps': 1e-06, ...}
    apply_peer_preset(config, "trl")        # sets config.objective.<config.objective.name>.<key>

The paper (the default, preset "paper"): population std, no epsilon (all-equal groups get A = 0 exactly),
one-rollout groups get A = 0, no dual clip.
verl (compute_grpo_outcome_advantage; compute_policy_loss): torch.std (unbiased), (r - mean) / (std + 1e-6);
a one-rollout group takes mean 0 and std 1, so A = r / (1 + 1e-6); dual clip with clip_ratio_c = 3.
TRL (GRPOTrainer, scale_rewards="group"): unbiased std, (r - mean) / (std + 1e-4); TRL rejects fewer than 2
generations per prompt, so a one-rollout group never reaches its formula (here: 0, checked via rollout.n);
no dual clip.
Only keys an objective accepts are set (Dr. GRPO has no std, DAPO drops one-rollout groups).
"""

from __future__ import annotations

from typing import Any

from conspo_jax.objectives.registry import get_objective

PEER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"std_estimator": "population", "std_eps": 0.0, "singleton": "zero", "clip_ratio_c": 0.0},
    "verl": {"std_estimator": "unbiased", "std_eps": 1e-6, "singleton": "reward", "clip_ratio_c": 3.0},
    "trl": {"std_estimator": "unbiased", "std_eps": 1e-4, "singleton": "zero", "clip_ratio_c": 0.0},
}


def peer_hparams(peer: str, objective: str) -> dict[str, Any]:
    """The preset's hyperparameters that ``objective`` accepts; ValueError for an unknown peer."""
    if peer not in PEER_PRESETS:
        raise ValueError(f"unknown peer preset {peer!r}; known: {sorted(PEER_PRESETS)}")
    accepted = get_objective(objective).defaults
    return {k: v for k, v in PEER_PRESETS[peer].items() if k in accepted}


def apply_peer_preset(config, peer: str, objective: str | None = None):
    """Sets ``config.objective.<objective>.<key>`` (default: the config's objective) from the preset.

    Returns the hyperparameters set. TRL needs at least 2 rollouts per prompt: checked on rollout.n.
    """
    name = objective or config.objective.name
    hp = peer_hparams(peer, name)
    if not hp:
        raise ValueError(f"peer preset {peer!r} sets nothing on objective {name!r} (it is not GRPO-family)")
    if peer == "trl" and "rollout" in config and int(config.rollout.n) < 2:
        raise ValueError(f"peer preset 'trl': TRL needs rollout.n >= 2 generations per prompt, got {config.rollout.n}")
    for key, value in hp.items():
        config.objective[name][key] = value
    return hp
