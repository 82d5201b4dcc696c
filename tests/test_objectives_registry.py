"""The registry contract the trainer builds on: names, attributes, hyperparameter and input validation
with clear errors, traced progress, custom registration, and the DAPO / advantage helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conspo_jax.objectives import (
    ObjectiveInputs,
    dapo_dynamic_sampling_filter,
    dapo_overlong_penalty,
    get_objective,
    group_advantages,
    list_objectives,
    register_objective,
)
from conspo_jax.objectives import registry as registry_module

NAMES = [
    "cispo",
    "conspo",
    "conspo_fixed_margin",
    "conspo_no_contrastive",
    "conspo_no_loglik",
    "conspo_no_margin",
    "dapo",
    "disco",
    "dr_grpo",
    "gmpo",
    "grpo",
    "gspo",
    "sapo",
]
USES_OLD = {"conspo_no_loglik", "grpo", "dapo", "dr_grpo", "disco", "gmpo", "cispo", "sapo", "gspo"}


def _inputs(**overrides):
    fields = dict(
        token_logp=jnp.full((4, 3), -1.0),
        old_logp=jnp.full((4, 3), -1.0),
        mask=jnp.ones((4, 3), bool),
        rewards=jnp.array([1.0, 0.0, 1.0, 0.0]),
        group_ids=jnp.array([0, 0, 1, 1], jnp.int32),
    )
    fields.update(overrides)
    return ObjectiveInputs(**fields)


def test_registry_names_and_attributes():
    assert list_objectives() == NAMES
    for name in NAMES:
        obj = get_objective(name)
        assert obj.name == name and obj.__doc__
        assert isinstance(obj.uses_old_logp, bool) and isinstance(obj.uses_ref_logp, bool)
        assert obj.uses_old_logp == (name in USES_OLD), name
        assert obj.uses_ref_logp == (name == "grpo"), name
        assert obj.requires_ref_logp() is False
    assert get_objective("grpo").requires_ref_logp(beta=0.04) is True


def test_paper_defaults():
    assert get_objective("conspo").defaults == dict(tau=10.0, max_margin=0.01, warmup_ratio=0.3, reward_threshold=0.5)
    assert get_objective("dapo").defaults["eps_high"] == 0.28
    assert get_objective("gspo").defaults == dict(eps_low=3e-4, eps_high=4e-4)
    assert get_objective("gmpo").defaults == dict(eps_low=0.4, eps_high=0.4)
    assert get_objective("sapo").defaults == dict(tau_pos=1.0, tau_neg=1.05)
    disco = get_objective("disco").defaults
    assert (disco["delta"], disco["beta"], disco["score"], disco["tau"]) == (1e-4, 1e3, "logL", 10.0)
    # Plain scalars only, so a config system (ml_collections) can type and override every one of them.
    for name in NAMES:
        for key, value in get_objective(name).defaults.items():
            assert isinstance(value, (bool, int, float, str)), (name, key, value)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown objective 'ppo'.*conspo.*gspo"):
        get_objective("ppo")


def test_unknown_hyperparameter_names_objective_and_kwarg():
    with pytest.raises(TypeError, match=r"'conspo'.*\['temperature'\]"):
        get_objective("conspo")(_inputs(), num_groups=2, progress=0.0, temperature=1.0)
    with pytest.raises(TypeError, match=r"'grpo'.*\['tau'\]"):
        get_objective("grpo").requires_ref_logp(tau=1.0)


def test_bad_hyperparameter_values():
    with pytest.raises(ValueError, match="tau must be > 0"):
        get_objective("conspo")(_inputs(), num_groups=2, progress=0.0, tau=0.0)
    with pytest.raises(ValueError, match="score must be one of"):
        get_objective("disco")(_inputs(), num_groups=2, score="logp")
    with pytest.raises(ValueError, match="progress"):
        get_objective("conspo")(_inputs(), num_groups=2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(mask=jnp.ones((4, 2), bool)), r"inputs.mask must have token_logp's shape \(4, 3\)"),
        (dict(rewards=jnp.ones(3)), r"inputs.rewards must have shape \(4,\)"),
        (dict(group_ids=jnp.array([0.0, 0, 1, 1])), "inputs.group_ids must be integer"),
        (dict(group_ids=jnp.array([0, 0, 1, 2], jnp.int32)), r"group_ids must lie in \[0, num_groups=2\)"),
        (dict(group_ids=jnp.array([-1, 0, 1, 1], jnp.int32)), r"got range \[-1, 1\]"),
        (dict(token_logp=jnp.ones(4)), r"token_logp must be \[R, C\]"),
        (dict(old_logp=None), "needs inputs.old_logp"),
    ],
)
def test_bad_inputs_raise_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_objective("grpo")(_inputs(**overrides), num_groups=2)


def test_ref_logp_required_only_with_kl():
    with pytest.raises(ValueError, match="needs inputs.ref_logp"):
        get_objective("grpo")(_inputs(), num_groups=2, beta=0.1)
    with pytest.raises(ValueError, match="num_groups must be a positive Python int"):
        get_objective("conspo")(_inputs(), num_groups=2.0, progress=0.0)


def test_inputs_are_a_pytree_and_progress_may_be_traced():
    obj = get_objective("conspo")
    inputs = _inputs(token_logp=jnp.array([[-1.0, -2, -3], [-2, -2, -2], [-0.5, -1, -1], [-3, -1, -1]]))
    assert len(jax.tree_util.tree_leaves(inputs)) == 5  # None fields are empty subtrees

    @jax.jit
    def at(inputs, progress):
        return obj(inputs, num_groups=2, progress=progress)

    (early, aux0), (late, aux1) = at(inputs, 0.0), at(inputs, 1.0)
    assert float(aux0["margin"]) == 0.0 and float(aux1["margin"]) == pytest.approx(0.01)
    assert float(late) < float(early)  # the margin lowers every positive's contrastive probability
    assert float(aux0["normalizer"]) == 2.0 and float(aux0["valid_group_frac"]) == 1.0


def test_register_custom_objective():
    @register_objective("_test_mean_logp", uses_old_logp=False)
    def mean_logp(inputs, *, num_groups, progress=None, scale: float = 1.0):
        del num_groups, progress
        n = jnp.sum(inputs.mask)
        return scale * jnp.sum(jnp.where(inputs.mask, inputs.token_logp, 0.0)) / n, {"normalizer": n}

    try:
        obj = get_objective("_test_mean_logp")
        assert obj.defaults == {"scale": 1.0} and obj.uses_ref_logp is False
        value, aux = obj(_inputs(), num_groups=2, scale=2.0)
        assert float(value) == -2.0 and float(aux["normalizer"]) == 12.0
        with pytest.raises(ValueError, match="already registered"):
            register_objective("_test_mean_logp", mean_logp.fn, uses_old_logp=False)
        with pytest.raises(TypeError, match="must accept keyword arguments"):
            register_objective("_test_bad", lambda inputs: 0.0, uses_old_logp=False)
    finally:
        registry_module._REGISTRY.pop("_test_mean_logp", None)
    assert "_test_mean_logp" not in list_objectives()


def test_group_advantages_population_std_and_dr_grpo():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 5.0, 0.0, 1e-30, 0.0, 2e-12])
    gids = jnp.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 4], jnp.int32)
    rmask = jnp.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])

    @jax.jit  # one compile instead of dozens of op-by-op ones
    def all_three(rewards, gids, rmask):
        return (
            group_advantages(rewards, gids, 5),
            group_advantages(rewards, gids, 5, normalize_std=False),
            group_advantages(rewards, gids, 5, rollout_mask=rmask),
        )

    adv, dr, masked = map(np.asarray, all_three(rewards, gids, rmask))
    p = 0.25  # Lemma 4: A+ = sqrt((1-p)/p), A- = -sqrt(p/(1-p)) with the population std
    np.testing.assert_allclose(adv[:4], [math.sqrt((1 - p) / p)] + [-math.sqrt(p / (1 - p))] * 3, rtol=1e-6)
    assert np.all(adv[4:8] == 0.0), "equal (non-binary) rewards and singletons give exactly zero"
    assert np.all(adv[8:10] == 0.0), "a 1e-30 spread counts as equal rewards (no inf from underflow)"
    np.testing.assert_allclose(adv[10:], [-1.0, 1.0], rtol=1e-5)  # squared deviations 1e-24: still exact
    np.testing.assert_allclose(dr[:4], [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
    np.testing.assert_allclose(masked[:4], [1.0, -1.0, 0.0, 0.0], rtol=1e-6)


def test_dapo_helpers():
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    gids = jnp.array([0, 0, 1, 1, 2, 2, 3], jnp.int32)
    lengths = jnp.array([100, 16384, 16385, 18432, 20480, 20481])

    @jax.jit
    def helpers(rewards, gids, lengths):
        return (
            dapo_dynamic_sampling_filter(rewards, gids, 4),
            dapo_dynamic_sampling_filter(rewards, gids, 4, rollout_mask=jnp.array([1, 0, 1, 1, 1, 1, 1])),
            dapo_overlong_penalty(lengths, max_len=20480, cache_len=4096),
        )

    keep, keep_masked, penalty = helpers(rewards, gids, lengths)
    assert keep.tolist() == [True, True, False, False, False, False, False]
    assert not bool(keep_masked.any())
    # DAPO Eq. 13 with L_max = 20480, L_cache = 4096.
    np.testing.assert_allclose(np.asarray(penalty), [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="cache_len"):
        dapo_overlong_penalty(lengths, max_len=100, cache_len=200)
