"""Peer presets: GRPO-family advantages and losses as verl and TRL define them, against numpy written from
each project's documented formula (verl compute_grpo_outcome_advantage / compute_policy_loss with dual
clip; TRL GRPOTrainer with scale_rewards="group", loss_type="grpo"), and the paper's defaults unchanged."""

import numpy as np
import pytest

from conspo_jax.objectives import ObjectiveInputs, apply_peer_preset, get_objective, group_advantages, peer_hparams

ADV_KEYS = ("std_estimator", "std_eps", "singleton")


def verl_advantages(scores, index, eps=1e-6):
    """verl: per uid, one score -> mean 0, std 1; else mean and torch.std (Bessel); (s - mean) / (std + eps)."""
    out = np.zeros_like(scores)
    for g in np.unique(index):
        s = scores[index == g]
        mean, std = (0.0, 1.0) if s.size == 1 else (s.mean(), s.std(ddof=1))
        out[index == g] = (s - mean) / (std + eps)
    return out


def trl_advantages(rewards, num_generations, eps=1e-4):
    """TRL: rewards.view(-1, G); mean and std (unbiased) per row; (r - mean) / (std + eps)."""
    r = rewards.reshape(-1, num_generations)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)).reshape(-1)


def paper_advantages(rewards, index):
    out = np.zeros_like(rewards)
    for g in np.unique(index):
        s = rewards[index == g]
        if s.max() > s.min():
            out[index == g] = (s - s.mean()) / s.std()  # population std, Eq. 1
    return out


def ppo_token_loss(log_ratio, adv, eps_low=0.2, eps_high=0.2, clip_ratio_c=None):
    """-min(rho A, clip(rho) A); verl's dual clip: for A < 0, min(that, -A c)."""
    ratio = np.exp(log_ratio)
    a = adv[:, None]
    loss = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if clip_ratio_c is not None:
        loss = np.where(a < 0, np.minimum(loss, -a * clip_ratio_c), loss)
    return loss


REWARDS = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0.5, 0.2, 0.9, 0.0, 1, 0, 0, 0], np.float32)
INDEX = np.repeat(np.arange(4), 4).astype(np.int32)


def _adv(peer, rewards, index, num_groups, **kw):
    hp = {k: v for k, v in peer_hparams(peer, "grpo").items() if k in ADV_KEYS}
    return np.asarray(group_advantages(rewards, index, num_groups, **hp, **kw))


def test_verl_advantages_including_a_one_rollout_group_and_padding():
    rewards = np.concatenate([REWARDS, [1.0, 0.0, 0.7]]).astype(np.float32)
    index = np.concatenate([INDEX, [4, 5, 5]]).astype(np.int32)
    mask = np.ones(19, bool)
    mask[-1] = False  # padding: group 5 has one real rollout
    got = _adv("verl", rewards, index, 6, rollout_mask=mask)
    want = np.zeros(19, np.float32)
    want[mask] = verl_advantages(rewards[mask].astype(np.float64), index[mask])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[16] == pytest.approx(1 / (1 + 1e-6)) and got[17] == 0.0 and got[18] == 0.0
    # the paper gives one-rollout groups 0
    assert _adv("paper", rewards, index, 6, rollout_mask=mask)[16] == 0.0


def test_trl_and_paper_advantages():
    np.testing.assert_allclose(
        _adv("trl", REWARDS, INDEX, 4), trl_advantages(REWARDS.astype(np.float64), 4), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(_adv("paper", REWARDS, INDEX, 4), paper_advantages(REWARDS, INDEX), rtol=1e-5)
    # The estimators differ by sqrt(G / (G - 1)) on a binary group (apart from the epsilon).
    ratio = _adv("paper", REWARDS, INDEX, 4)[0] / _adv("trl", REWARDS, INDEX, 4)[0]
    assert ratio == pytest.approx(np.sqrt(4 / 3) * (1 + 1e-4 / np.std(REWARDS[:4], ddof=1)), rel=1e-5)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((16, 5), np.float32)
    mask[::3, 3:] = 0  # unequal lengths
    old = rng.normal(-1.0, 0.3, (16, 5)).astype(np.float32)
    log_ratio = rng.choice([-2.0, -0.5, 0.0, 0.1, 0.5, 1.5], size=(16, 5)).astype(np.float32)  # rho up to 4.5
    inp = ObjectiveInputs(
        token_logp=old + log_ratio, old_logp=old, mask=mask, rewards=REWARDS, group_ids=INDEX, rollout_mask=None
    )
    return inp, (log_ratio * mask).astype(np.float64), mask.astype(bool)


def _seq_mean_token_mean(loss, mask):
    return np.mean((loss * mask).sum(1) / mask.sum(1))


def test_grpo_loss_with_verl_preset_equals_verl_dual_clip_loss():
    inp, log_ratio, mask = _inputs()
    j, aux = get_objective("grpo")(inp, num_groups=4, **peer_hparams("verl", "grpo"))
    adv = verl_advantages(REWARDS.astype(np.float64), INDEX)
    want = _seq_mean_token_mean(ppo_token_loss(log_ratio, adv, clip_ratio_c=3.0), mask)  # verl seq-mean-token-mean
    assert float(j) == pytest.approx(-want, rel=1e-5)
    no_dual = _seq_mean_token_mean(ppo_token_loss(log_ratio, adv), mask)
    assert abs(no_dual - want) > 1e-3, "the fixture must make the dual clip bind"
    # DAPO's token mean over the groups it keeps (not all-equal) is verl's token-mean
    j, _ = get_objective("dapo")(inp, num_groups=4, **peer_hparams("verl", "dapo"))
    keep = np.isin(INDEX, [0, 2, 3])
    loss = ppo_token_loss(log_ratio, adv, eps_high=0.28, clip_ratio_c=3.0)[keep]
    assert float(j) == pytest.approx(-(loss * mask[keep]).sum() / mask[keep].sum(), rel=1e-5)


def test_grpo_loss_with_trl_preset_and_paper_default():
    inp, log_ratio, mask = _inputs(1)
    j, _ = get_objective("grpo")(inp, num_groups=4, **peer_hparams("trl", "grpo"))
    want = _seq_mean_token_mean(ppo_token_loss(log_ratio, trl_advantages(REWARDS.astype(np.float64), 4)), mask)
    assert float(j) == pytest.approx(-want, rel=1e-5)
    j, _ = get_objective("grpo")(inp, num_groups=4)  # defaults: the paper
    want = _seq_mean_token_mean(ppo_token_loss(log_ratio, paper_advantages(REWARDS, INDEX)), mask)
    assert float(j) == pytest.approx(-want, rel=1e-5)


def test_presets_become_config_keys_and_bad_values_are_named():
    from conspo_jax.train.config_base import base_config

    c = base_config()
    assert c.objective.grpo.std_estimator == "population" and c.objective.grpo.clip_ratio_c == 0.0
    c.objective.name = "grpo"
    assert apply_peer_preset(c, "verl") == {
        "std_estimator": "unbiased",
        "std_eps": 1e-6,
        "singleton": "reward",
        "clip_ratio_c": 3.0,
    }
    assert c.objective.grpo.singleton == "reward"
    assert set(peer_hparams("verl", "dr_grpo")) == {"singleton", "clip_ratio_c"}
    c.rollout.n = 1
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        apply_peer_preset(c, "trl")
    with pytest.raises(ValueError, match="not GRPO-family"):
        apply_peer_preset(c, "verl", "conspo")
    with pytest.raises(ValueError, match="unknown peer preset 'openrlhf'"):
        peer_hparams("openrlhf", "grpo")
    inp, _, _ = _inputs()
    with pytest.raises(ValueError, match="std_estimator must be one of"):
        get_objective("grpo")(inp, num_groups=4, std_estimator="sample")
    with pytest.raises(ValueError, match="clip_ratio_c must be 0"):
        get_objective("grpo")(inp, num_groups=4, clip_ratio_c=0.5)
