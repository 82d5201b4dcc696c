"""End-to-end training on the synthetic task: the smoke run, resume equality, and every objective
through the jitted update with micro-batch accumulation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.base.configs import load_config_module
from conspo_jax.objectives import list_objectives
from conspo_jax.rollout import SamplingParams
from conspo_jax.run import build
from conspo_jax.train.batching import build_rl_batch, split_micro_batches
from conspo_jax.train.metrics import read_metrics
from conspo_jax.train.step import init_train_state, make_logprob_fn, make_optimizer, make_train_step
from conspo_jax.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"


def _smoke_config(**overrides):
    c = load_config_module(SMOKE)
    c.train.progress_bar = False
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    train(_smoke_config(), workdir)
    return workdir


def test_smoke_run_writes_every_output(uninterrupted):
    rows = read_metrics(uninterrupted)
    steps = [r["step"] for r in rows]
    assert steps == [0, 1, 2, 3, 4]
    for r in rows[1:]:
        for key in ("reward/mean", "objective/valid_group_frac", "loss", "margin"):
            assert key in r and np.isfinite(r[key]), key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert rows[-1]["margin"] > rows[1]["margin"] >= 0.0  # Eq. 16 warms the margin up with progress
    assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
    assert os.path.exists(os.path.join(uninterrupted, "reward_curve.png"))
    ckpts = os.listdir(os.path.join(uninterrupted, "checkpoints"))
    assert "4" in ckpts
    results = json.load(open(os.path.join(uninterrupted, "results.json")))
    assert {"eval/accuracy_before", "eval/accuracy_after"} <= set(results)


def test_resume_after_interruption_matches_uninterrupted_run(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    train(_smoke_config(**{"train.stop_after": 2}), workdir)
    assert [r["step"] for r in read_metrics(workdir)] == [0, 1, 2]
    # Simulate a kill that happened after step 3 was logged but before its checkpoint: the
    # resumed run must drop that stale row rather than duplicate it.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "reward/mean": -1.0}) + "\n")
    train(_smoke_config(), workdir)
    assert _comparable(read_metrics(workdir)) == _comparable(read_metrics(uninterrupted))


@pytest.fixture(scope="module")
def rl_batch():
    """A tiny policy, one real rollout batch from the JAX engine, and synthetic mixed rewards."""
    c = _smoke_config()
    tok = build.build_tokenizer(c)
    task = build.build_task(c, tok)
    policy = build.build_policy(c, tok, mesh=None, seed=0)
    from conspo_jax.rollout.jax_engine import JaxEngine

    engine = JaxEngine(policy, eos_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, prompt_bucket=16)
    prompts = [task.encode(r) for r in task.train_records[:4]]
    out = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=6, seed=3))
    rewards = np.tile([1.0, 0.0, 1.0, 0.0], 4)
    rewards[4:8] = 0.0  # one group with no positive: contributes nothing
    batch = build_rl_batch(
        prompts, out, rewards, prompt_len=16, completion_len=6, pad_id=tok.pad_token_id, group_size=4
    )
    return policy, batch


def _one_update(policy, batch, name, *, mini_batches, micro_groups, poison_old_logp=False, repeat=1):
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, params)
    c = _smoke_config()
    kwargs = dict(c.objective[name])
    from conspo_jax.objectives import get_objective

    fn = get_objective(name)
    opt = make_optimizer(1e-3, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    mesh = build.build_mesh(_smoke_config())
    state = init_train_state(params, opt, jax.random.key(0), mesh)
    before = jax.tree.map(np.asarray, state.params)
    ref = jax.tree.map(jnp.copy, state.params) if fn.requires_ref_logp(**kwargs) else None
    minis = split_micro_batches(batch, mini_batches=mini_batches, micro_batch_groups=micro_groups)
    old_fn = make_logprob_fn(graphdef, 16)

    def with_old_logp(mb):
        s = mb.input_ids.shape
        old = np.array(
            old_fn(state.params, rest, mb.input_ids.reshape(-1, s[-1]), mb.attention_mask.reshape(-1, s[-1]))
        ).reshape(s[0], s[1], -1)
        if poison_old_logp:
            old[0, 0, 0] = np.nan
        return mb.replace(old_logp=old)

    minis = [with_old_logp(mb) for mb in minis]
    step = make_train_step(
        state,
        minis[0],
        mesh,
        rest=rest,
        ref_params=ref,
        graphdef=graphdef,
        objective=lambda x, **kw: fn(x, **kw, **kwargs),
        num_groups=micro_groups,
        prompt_len=16,
        optimizer=opt,
    )
    metrics = []
    for mb in minis * repeat:
        state, m = step(state, mb, jnp.float32(0.5), rest, ref)
        metrics.append(jax.device_get(m))
    moved = max(
        float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))
    )
    return metrics, moved


@pytest.mark.parametrize("name", list_objectives())
def test_every_objective_trains_through_the_update(rl_batch, name):
    policy, batch = rl_batch
    metrics, moved = _one_update(policy, batch, name, mini_batches=2, micro_groups=1)
    for m in metrics:
        assert all(np.isfinite(v) for v in jax.tree.leaves(m)), m
        assert m["nonfinite"] == 0
    assert moved > 0, f"{name}: parameters did not change"


def test_micro_batch_accumulation_equals_whole_batch(rl_batch):
    policy, batch = rl_batch
    (whole,), _ = _one_update(policy, batch, "conspo", mini_batches=1, micro_groups=4)
    (split,), _ = _one_update(policy, batch, "conspo", mini_batches=1, micro_groups=1)
    np.testing.assert_allclose(split["loss"], whole["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split["grad_norm"], whole["grad_norm"], rtol=1e-4)


def test_checkpoint_loads_for_eval_and_exported_hf_matches(uninterrupted):
    """The trained policy comes back identically from the Orbax checkpoint and from the HF export."""
    from conspo_jax.models import load_hf_policy, token_logprobs

    c = _smoke_config()
    tok = build.build_tokenizer(c)
    mesh = build.build_mesh(c)
    from_ckpt = build.load_policy_from_checkpoint(c, uninterrupted, tokenizer=tok, mesh=mesh)
    from_hf = load_hf_policy(os.path.join(uninterrupted, "hf"), dtype=jnp.float32)
    fresh = build.build_policy(c, tok, mesh=None, seed=0)
    ids = jnp.asarray([tok("Q:12+35=? A:\\boxed{47}")["input_ids"]])
    mask = jnp.ones_like(ids)
    a, b, f = (np.asarray(token_logprobs(p, ids, mask)) for p in (from_ckpt, from_hf, fresh))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.max(np.abs(a - f)) > 1e-3  # training changed the policy: the test would see a stale load


@pytest.mark.parametrize("name", ["conspo", "grpo"])
def test_an_update_increases_the_objective_on_its_batch(rl_batch, name):
    """The step ascends J: re-evaluating the same batch after one update gives a larger value."""
    policy, batch = rl_batch
    (first, second), _ = _one_update(policy, batch, name, mini_batches=1, micro_groups=4, repeat=2)
    assert second["objective/value"] > first["objective/value"] + 1e-4, (
        first["objective/value"],
        second["objective/value"],
    )


def test_nonfinite_loss_skips_the_update(rl_batch):
    policy, batch = rl_batch
    metrics, moved = _one_update(policy, batch, "grpo", mini_batches=1, micro_groups=4, poison_old_logp=True)
    assert metrics[0]["nonfinite"] == 1
    assert moved == 0.0
