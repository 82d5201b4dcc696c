"""Robustness properties of every objective in float32, the dtype the trainer runs in:

* hypothesis: degenerate groups (all correct, all wrong, single rollout, empty, zero-length responses,
  padding rows full of NaN/-inf) never produce NaN/inf in value, diagnostics or gradient, padding never
  gets gradient, and a batch with nothing to learn from gives J = 0 and a zero gradient;
* jit and op-by-op execution agree.

One compiled function evaluates all objectives, so the suite pays one XLA compile per worker.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conspo_jax.objectives import ObjectiveInputs, get_objective, list_objectives

R, T, G = 8, 5, 3
CASES = [(name, {}) for name in list_objectives()] + [("grpo", {"beta": 0.04})]
# Objectives whose value and gradient vanish when no group has both a positive and a negative
# (contrastive family), resp. when every group's rewards are equal (advantage family, without KL).
CONTRASTIVE = {"conspo", "conspo_no_margin", "conspo_fixed_margin", "conspo_no_loglik", "conspo_no_contrastive"}
ADVANTAGE = {"grpo", "dapo", "dr_grpo", "gmpo", "cispo", "sapo", "gspo"}


def _all_objectives(logp, old, ref, mask, rewards, gids, rmask, progress):
    inputs = ObjectiveInputs(
        token_logp=logp, old_logp=old, ref_logp=ref, mask=mask, rewards=rewards, group_ids=gids, rollout_mask=rmask
    )
    out = []
    for name, hp in CASES:
        obj = get_objective(name)
        out.append(
            jax.value_and_grad(
                lambda x: obj(inputs.replace(token_logp=x), num_groups=G, progress=progress, **hp), has_aux=True
            )(logp)
        )
    return out


_compiled = {}


def evaluate(batch):
    args = [jnp.asarray(batch[k]) for k in ("logp", "old", "ref", "mask", "rewards", "gids", "rmask", "progress")]
    if "fn" not in _compiled:
        _compiled["fn"] = jax.jit(_all_objectives).lower(*args).compile({"xla_backend_optimization_level": 0})
    return _compiled["fn"](*args)


@st.composite
def batches(draw):
    gids = draw(hnp.arrays(np.int32, R, elements=st.integers(0, G - 1)))
    pattern = draw(st.sampled_from(["mixed", "all_correct", "all_wrong", "graded"]))
    if pattern == "mixed":
        rewards = draw(hnp.arrays(np.float32, R, elements=st.sampled_from([0.0, 1.0])))
    elif pattern == "graded":
        rewards = draw(hnp.arrays(np.float32, R, elements=st.floats(-1, 1, width=32)))
    else:
        rewards = np.full(R, 1.0 if pattern == "all_correct" else 0.0, np.float32)
    rmask = draw(hnp.arrays(np.bool_, R, elements=st.sampled_from([True, True, True, False])))
    lens = draw(hnp.arrays(np.int32, R, elements=st.integers(0, T)))
    mask = np.arange(T)[None] < lens[:, None]
    logp = draw(hnp.arrays(np.float32, (R, T), elements=st.floats(-30, 0, width=32)))
    shift = draw(hnp.arrays(np.float32, (R, T), elements=st.floats(-4, 4, width=32)))
    junk = draw(st.sampled_from([np.nan, -np.inf, np.inf, 1e30]))
    old = np.where(mask, logp + shift, junk).astype(np.float32)
    ref = np.where(mask, logp - shift, junk).astype(np.float32)
    logp = np.where(mask, logp, junk).astype(np.float32)
    logp[~rmask] = junk
    progress = np.float32(draw(st.floats(0, 1)))
    return dict(logp=logp, old=old, ref=ref, mask=mask, rewards=rewards, gids=gids, rmask=rmask, progress=progress)


def _fixed(pattern_rewards, lens=(3,) * R, gids=(0, 0, 0, 1, 1, 2, 2, 2), rmask=(True,) * R):
    rng = np.random.default_rng(0)
    mask = np.arange(T)[None] < np.array(lens)[:, None]
    logp = np.where(mask, -rng.uniform(0, 3, (R, T)), -np.inf).astype(np.float32)
    old = np.where(mask, logp + rng.normal(0, 0.5, (R, T)), 0).astype(np.float32)
    return dict(
        logp=logp,
        old=old,
        ref=old.copy(),
        mask=mask,
        rewards=np.array(pattern_rewards, np.float32),
        gids=np.array(gids, np.int32),
        rmask=np.array(rmask),
        progress=np.float32(0.5),
    )


@settings(max_examples=25, deadline=None)
@given(batch=batches())
@example(batch=_fixed([1.0] * R))  # every group all-correct
@example(batch=_fixed([0.0] * R, lens=(0,) * R))  # all wrong, every response empty
@example(batch=_fixed([1, 0, 1, 0, 1, 1, 0, 0], gids=(0, 1, 2, 0, 1, 2, 0, 1), rmask=(True,) * 7 + (False,)))
@example(batch=_fixed([1, 0, 0, 1, 1, 1, 0, 0], gids=(0, 1, 2, 2, 2, 2, 2, 2)))  # singletons + big group
def test_no_nan_no_padding_gradient_and_zero_when_nothing_to_learn(batch):
    real = batch["rmask"]
    tok = batch["mask"] & real[:, None]
    groups = [batch["rewards"][real & (batch["gids"] == g)] for g in range(G)]
    has_valid = any((r > 0.5).any() and (r <= 0.5).any() for r in groups)
    has_spread = any(r.size and r.max() > r.min() for r in groups)
    for (name, hp), ((value, aux), grad) in zip(CASES, evaluate(batch)):
        label = f"{name}{hp}"
        value, grad = float(value), np.asarray(grad)
        assert np.isfinite(value), label
        assert all(np.isfinite(float(v)) for v in aux.values()), (label, aux)
        assert np.all(np.isfinite(grad)), label
        assert np.all(grad[~tok] == 0.0), f"{label}: padding got gradient"
        assert float(aux["normalizer"]) >= 0
        if (name in CONTRASTIVE and not has_valid) or (name in ADVANTAGE and not hp and not has_spread):
            assert value == 0.0 and np.all(grad == 0.0), label
            if name in CONTRASTIVE:
                assert float(aux["normalizer"]) == 0.0


@pytest.mark.parametrize("name", ["conspo"])  # op-by-op compiles every primitive: one objective only
def test_jit_matches_op_by_op(name):
    batch = _fixed([1, 0, 1, 0, 1, 1, 0, 0], lens=(3, 5, 0, 2, 4, 1, 5, 3))
    obj = get_objective(name)
    inputs = ObjectiveInputs(
        token_logp=jnp.asarray(batch["logp"]),
        old_logp=jnp.asarray(batch["old"]),
        mask=jnp.asarray(batch["mask"]),
        rewards=jnp.asarray(batch["rewards"]),
        group_ids=jnp.asarray(batch["gids"]),
    )

    def f(x, progress):
        return obj(inputs.replace(token_logp=x), num_groups=G, progress=progress)

    vg = jax.value_and_grad(f, has_aux=True)
    (v_jit, aux_jit), g_jit = jax.jit(vg)(inputs.token_logp, 0.5)
    with jax.disable_jit():
        (v_eager, aux_eager), g_eager = vg(inputs.token_logp, 0.5)
    np.testing.assert_allclose(float(v_jit), float(v_eager), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g_eager), rtol=1e-5, atol=1e-7)
    for k in aux_jit:
        np.testing.assert_allclose(float(aux_jit[k]), float(aux_eager[k]), rtol=1e-5, atol=1e-7)
    assert float(v_jit) != 0.0 and np.any(np.asarray(g_jit) != 0)
