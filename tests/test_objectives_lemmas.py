"""The paper's gradient identities, checked against jax.grad in float64:

* Lemma 2 (Eq. 12-14): ConSPO's per-rollout credit (1 - P_i+) / N+ and -sum_i P_ij- / N+, the
  group-level balance, and the exp((s_j - s_k)/tau) ratio between negatives, with and without margin.
* Proposition 1 / Lemma 1 (Eq. 7-9): on binary rewards GRPO's token-level clipped surrogate equals the
  pass-rate-weighted discriminative form of Eq. 8 over Eq. 7's clipped-ratio scores, exactly per group,
  in value and in gradient w.r.t. token log-probs, with ratios clipped on both sides.
* Eq. 16's margin schedule and Sec. 4.2's sequence score.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conspo_jax.objectives import (
    ObjectiveInputs,
    clipped_ratio_scores,
    conspo_objective,
    get_objective,
    grpo_surrogate,
    linear_discriminative,
    margin_schedule,
    sequence_scores,
    split_groups,
)


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


# ------------------------------------------------------------------------------------ Lemma 2

# Group 0: 3 positives / 3 negatives; group 1: 1 positive / 2 negatives; group 2 all correct (invalid);
# the last rollout is padding in group 1 with a junk score.
SCORES = np.array([-0.3, -1.1, -0.7, -0.2, -0.9, -1.6, -0.5, -0.4, -1.3, -0.1, -0.6, 7.0])
REWARDS = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1.0])
GIDS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 1])
RMASK = np.array([True] * 11 + [False])
TAU = 0.7
N_VALID = 2


def _lemma2_expected(scores, margin):
    """Eq. 11-12 per group, from numpy; returns the expected d J / d s (batch mean over valid groups)."""
    grad = np.zeros_like(scores)
    for g in (0, 1):
        pos = [i for i in range(len(scores)) if GIDS[i] == g and RMASK[i] and REWARDS[i] > 0.5]
        neg = [j for j in range(len(scores)) if GIDS[j] == g and RMASK[j] and REWARDS[j] <= 0.5]
        for i in pos:
            denom = math.exp((scores[i] - margin) / TAU) + sum(math.exp(scores[k] / TAU) for k in neg)
            grad[i] += (1 - math.exp((scores[i] - margin) / TAU) / denom) / len(pos)
            for j in neg:
                grad[j] -= math.exp(scores[j] / TAU) / denom / len(pos)
    return grad / N_VALID


@pytest.fixture(scope="module")
def lemma2_grad():
    with jax.enable_x64(True):

        def value(scores, margin):
            return conspo_objective(
                scores,
                jnp.asarray(REWARDS),
                jnp.asarray(GIDS),
                3,
                tau=TAU,
                margin=margin,
                rollout_mask=jnp.asarray(RMASK),
            )

        args = (jnp.asarray(SCORES), jnp.asarray(0.0))
        compiled = _compile(jax.grad(value), *args)
        return lambda margin: np.asarray(compiled(jnp.asarray(SCORES), jnp.asarray(margin, jnp.float64)))


@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_lemma2_eq12_per_rollout_credit(lemma2_grad, margin):
    with jax.enable_x64(True):
        grad = lemma2_grad(margin)
    np.testing.assert_allclose(grad, _lemma2_expected(SCORES, margin), rtol=1e-12, atol=1e-15)
    assert np.all(grad[9:] == 0.0), "invalid (all-correct) group and padding rollout get no gradient"


@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_lemma2_eq13_balance_and_eq14_ratio(lemma2_grad, margin):
    with jax.enable_x64(True):
        grad = lemma2_grad(margin) * N_VALID  # per-group objective's derivatives
    for _group, pos, neg in ((0, [0, 1, 2], [3, 4, 5]), (1, [6], [7, 8])):
        # Eq. 13: the negatives' total is -(1/N+) sum_i (1 - P_i+), and the group's derivatives cancel.
        np.testing.assert_allclose(grad[neg].sum(), -grad[pos].sum(), rtol=1e-12)
        assert abs(grad[pos + neg].sum()) < 1e-14
        assert np.all(grad[pos] > 0) and np.all(grad[neg] < 0)
        # Eq. 14: |dJ/ds_j| / |dJ/ds_k| = exp((s_j - s_k) / tau): higher-scoring negatives get more.
        for j in neg:
            for k in neg:
                np.testing.assert_allclose(grad[j] / grad[k], math.exp((SCORES[j] - SCORES[k]) / TAU), rtol=1e-12)


def test_margin_strengthens_credit_of_separated_positives(lemma2_grad):
    """Sec. 4.3: the margin lowers P_i+, so every positive's coefficient (1 - P_i+) grows."""
    with jax.enable_x64(True):
        plain, shifted = lemma2_grad(0.0), lemma2_grad(0.25)
    pos = [0, 1, 2, 6]
    assert np.all(shifted[pos] > plain[pos])


def test_token_gradient_is_score_gradient_over_length():
    """Chain rule through s(o) = mean_t log pi: dJ/dlogp_it = (dJ/ds_i) / |o_i| on completion tokens."""
    rng = np.random.default_rng(0)
    lens = np.array([3, 5, 1, 4, 2, 5])
    mask = np.arange(5)[None] < lens[:, None]
    logp = np.where(mask, -rng.uniform(0.1, 2, (6, 5)), -np.inf)
    rewards = jnp.asarray(np.array([1, 0, 1, 0, 0, 1.0]))
    gids = jnp.asarray(np.array([0, 0, 0, 0, 1, 1]))
    obj = get_objective("conspo_fixed_margin")

    def both(lp):
        inputs = ObjectiveInputs(token_logp=lp, mask=jnp.asarray(mask), rewards=rewards, group_ids=gids)
        token_grad = jax.grad(lambda x: obj(inputs.replace(token_logp=x), num_groups=2, tau=2.0, margin=0.1)[0])(lp)
        scores = sequence_scores(lp, jnp.asarray(mask))
        score_grad = jax.grad(lambda s: conspo_objective(s, rewards, gids, 2, tau=2.0, margin=0.1))(scores)
        return token_grad, score_grad

    with jax.enable_x64(True):
        token_grad, score_grad = map(np.asarray, _compile(both, jnp.asarray(logp))(jnp.asarray(logp)))
    expected = np.where(mask, score_grad[:, None] / lens[:, None], 0.0)
    np.testing.assert_allclose(token_grad, expected, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------- Proposition 1 / Lemma 1


def _prop1_batch():
    """Binary rewards; groups 0-2 valid with different pass rates and sizes, group 3 all-correct."""
    rng = np.random.default_rng(7)
    gids = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    rewards = np.array([1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1.0])
    lens = rng.integers(2, 7, len(gids))
    mask = np.arange(6)[None] < lens[:, None]
    new = -rng.uniform(0.1, 2.0, mask.shape)
    old = new + rng.normal(0.0, 0.35, mask.shape)  # |log ratio| often > log 1.28: both clips bind
    return (np.where(mask, new, -np.inf), np.where(mask, old, 0.0), mask, rewards, gids)


@pytest.fixture(scope="module")
def prop1_values_and_grads():
    """One compiled function: GRPO's surrogate and Eq. 8 on Eq. 7 scores, values and token gradients."""
    num_groups = 4

    def both(new, old, mask, rewards, gids, el, eh):
        def grpo(x):
            return grpo_surrogate(x, old, mask, rewards, gids, num_groups, eps_low=el, eps_high=eh)

        def eq8(x):
            split = split_groups(rewards, gids, num_groups, dtype=x.dtype)
            s = clipped_ratio_scores(x, old, mask, split.is_pos_R, eps_low=el, eps_high=eh)
            return linear_discriminative(s, split, gids, num_groups)[0]

        return jax.value_and_grad(grpo)(new), jax.value_and_grad(eq8)(new)

    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in _prop1_batch()] + [jnp.asarray(0.2, jnp.float64)] * 2
        compiled = _compile(both, *args)

    def run(eps_low, eps_high):
        with jax.enable_x64(True):
            args = [jnp.asarray(x) for x in _prop1_batch()]
            eps = [jnp.asarray(eps_low, jnp.float64), jnp.asarray(eps_high, jnp.float64)]
            (j_grpo, g_grpo), (j_eq8, g_eq8) = compiled(*args, *eps)
        return float(j_grpo), np.asarray(g_grpo), float(j_eq8), np.asarray(g_eq8)

    return run


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_proposition1_grpo_equals_discriminative_form(prop1_values_and_grads, eps_low, eps_high):
    new, old, mask, rewards, gids = _prop1_batch()
    n_nonempty, n_valid = 4, 3
    j_grpo, g_grpo, j_eq8, g_eq8 = prop1_values_and_grads(eps_low, eps_high)
    # GRPO averages over all non-empty groups (the all-correct group adds 0); Eq. 8 over valid ones.
    np.testing.assert_allclose(j_grpo * n_nonempty, j_eq8 * n_valid, rtol=1e-12)
    np.testing.assert_allclose(g_grpo * n_nonempty, g_eq8 * n_valid, rtol=1e-11, atol=1e-15)
    # The identity is only interesting if clipping is active on both sides.
    ratio = np.exp(np.where(mask, new - old, 0.0))
    pos_tok = mask & (rewards[:, None] > 0.5) & (gids[:, None] < 3)
    neg_tok = mask & (rewards[:, None] <= 0.5)
    assert np.any(pos_tok & (ratio > 1 + eps_high)) and np.any(neg_tok & (ratio < 1 - eps_low))
    clipped = (pos_tok & (ratio > 1 + eps_high)) | (neg_tok & (ratio < 1 - eps_low))
    assert np.all(g_grpo[clipped] == 0.0), "clipped tokens carry no gradient"
    assert np.all(g_grpo[mask & ~clipped & (gids[:, None] < 3)] != 0.0)


def test_lemma1_eq9_score_insensitive_coefficients():
    """dJ/ds+ = sqrt(p(1-p))/N+ and dJ/ds- = -sqrt(p(1-p))/N- regardless of the scores themselves."""
    _, _, _, rewards, gids = _prop1_batch()
    n_valid = 3

    def grad(scores, rewards, gids):
        split = split_groups(rewards, gids, 4, dtype=scores.dtype)
        return jax.grad(lambda s: linear_discriminative(s, split, gids, 4)[0])(scores)

    with jax.enable_x64(True):
        args = [jnp.zeros(len(rewards), jnp.float64), jnp.asarray(rewards), jnp.asarray(gids)]
        compiled = _compile(grad, *args)
        for seed in (0, 1):
            scores = np.random.default_rng(seed).normal(size=len(rewards))
            g = np.asarray(compiled(jnp.asarray(scores), *args[1:]))
            for k in range(3):
                in_g = gids == k
                n_pos, n_neg = (in_g & (rewards > 0.5)).sum(), (in_g & (rewards <= 0.5)).sum()
                w = math.sqrt(n_pos * n_neg) / (n_pos + n_neg)
                np.testing.assert_allclose(g[in_g & (rewards > 0.5)], w / n_pos / n_valid, rtol=1e-12)
                np.testing.assert_allclose(g[in_g & (rewards <= 0.5)], -w / n_neg / n_valid, rtol=1e-12)
            assert np.all(g[gids == 3] == 0.0)


# ------------------------------------------------------------------- Eq. 16 and Sec. 4.2 score


def test_margin_schedule_eq16():
    expected = lambda p: 0.005 * (1 - math.cos(math.pi * min(p / 0.3, 1.0)))  # noqa: E731
    for p in (0.0, 0.05, 0.15, 0.3, 0.6, 1.0):
        np.testing.assert_allclose(
            float(margin_schedule(p, max_margin=0.01, warmup_ratio=0.3)), expected(p), rtol=1e-6, atol=1e-9
        )
    assert float(margin_schedule(0.15, max_margin=0.01, warmup_ratio=0.3)) == pytest.approx(0.005)
    traced = jax.jit(lambda p: margin_schedule(p, max_margin=0.01, warmup_ratio=0.3))
    np.testing.assert_allclose(float(traced(0.1)), expected(0.1), rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_ratio"):
        margin_schedule(0.5, max_margin=0.01, warmup_ratio=0.0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        margin_schedule(0.5, max_margin=0.01, warmup_ratio=1.5)
    with pytest.raises(ValueError, match="max_margin"):
        margin_schedule(0.5, max_margin=-0.01, warmup_ratio=0.3)


def test_sequence_scores_length_normalised_and_nan_free():
    logp = jnp.array([[-1.0, -3.0, -jnp.inf], [jnp.nan, jnp.nan, jnp.nan], [-2.0, -2.0, -5.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: (sequence_scores(x, mask) * jnp.arange(1, 4)).sum()))
    value, grad = value_and_grad(logp)
    assert float(value) == -2.0 + 0.0 - 9.0
    np.testing.assert_allclose(np.asarray(grad), [[0.5, 0.5, 0], [0, 0, 0], [1, 1, 1]], rtol=1e-6)
