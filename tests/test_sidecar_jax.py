"""The sidecar serving the embedded JAX engine over loopback gRPC: after a weight push its log-probs
are the trainer's, and training through it reproduces training with the embedded engine."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.base.configs import load_config_module
from conspo_jax.rollout.engine import SamplingParams
from conspo_jax.rollout.sidecar_client import SidecarClient
from conspo_jax.sidecar.options import SidecarOptions
from conspo_jax.sidecar.server import serve
from conspo_jax.train.step import trainer_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"


def smoke_config():
    c = load_config_module(SMOKE)
    c.train.progress_bar = False
    c.sft.steps = 0  # both sides then start from the same seeded random init
    return c


def test_logprobs_match_the_trainer_after_a_weight_push(tmp_path):
    from conspo_jax.run import build

    config = smoke_config()
    srv = serve(
        config, engine_name="jax", cache_dtype=jnp.float32, options=SidecarOptions(weights_dir=str(tmp_path), workers=0)
    )
    try:
        tokenizer = build.build_tokenizer(config)
        task = build.build_task(config, tokenizer)
        # The trainer's policy: the sidecar's initial weights, perturbed (cheaper than a second init).
        engine = srv.servicer.handle.engine

        def noise(i, x):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            return x * (1.0 + 0.2 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + i))

        leaves, treedef = jax.tree.flatten(engine.state)
        policy = nnx.merge(engine.graphdef, jax.tree.unflatten(treedef, [noise(i, x) for i, x in enumerate(leaves)]))
        prompts = [task.encode(r) for r in task.train_records[:4]]
        params = SamplingParams(
            n=2,
            temperature=1.0,
            max_new_tokens=8,
            seed=5,
            stop_token_ids=build.stop_token_ids(tokenizer, policy.config),
        )
        with SidecarClient(srv.target, weights=str(tmp_path), graphdef=engine.graphdef) as client:
            before = client.generate(prompts, params)
            compiled = dict(engine._compiled)
            client.sync(nnx.state(policy), 1)
            after = client.generate(prompts, params)
        mask = after.completion_mask_RxC()
        assert engine._compiled == compiled  # same architecture: the push swapped arrays, no recompile
        # The safetensors round trip is lossless: the sidecar now holds exactly the trainer's arrays.
        for a, b in zip(jax.tree.leaves(engine.state), jax.tree.leaves(nnx.split(policy)[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # What came over gRPC is exactly what the embedded engine generates with these weights and seed.
        direct = engine.generate(prompts, params)
        np.testing.assert_array_equal(direct.completion_lens_R, after.completion_lens_R)
        assert direct.completions() == after.completions() and direct.finish_reasons == after.finish_reasons
        np.testing.assert_array_equal(
            direct.logprobs_RxC[:, : after.logprobs_RxC.shape[1]] * mask, after.logprobs_RxC * mask
        )
        assert after.weight_version == 1 and sorted(os.listdir(tmp_path)) == ["v000001"]
        diff = np.abs(trainer_logprobs(policy, prompts, after) - after.logprobs_RxC)[mask]
        assert diff.max() <= 1e-4, diff.max()
        # The push really changed the sidecar's model: its old log-probs are far from the trainer's.
        old = np.abs(trainer_logprobs(policy, prompts, before) - before.logprobs_RxC)[before.completion_mask_RxC()]
        assert old.mean() > 1e-2, old.mean()
    finally:
        srv.stop(grace=0)


def test_training_through_the_sidecar_matches_the_embedded_engine(tmp_path):
    """Two ConSPO steps on the synthetic task, once with the embedded engine and once through a JAX
    sidecar over loopback gRPC (weights pushed as safetensors after every step). Same seeds, same
    initial weights: every logged metric agrees to 1e-6 relative (the rollouts are token-identical)."""
    assert_sidecar_training_matches_embedded(smoke_config, tmp_path)


def assert_sidecar_training_matches_embedded(make_config, tmp_path, steps=2):
    """Trains ``steps`` steps of ``make_config()`` embedded and through a loopback JAX sidecar; every metric
    agrees to 1e-6 relative. Returns both runs' rows (time/* left out). Shared with the real-model and
    LoRA tests (tests/test_real_model.py, tests/test_lora_train.py)."""
    from conspo_jax.train.metrics import read_metrics
    from conspo_jax.train.trainer import train

    def config():
        c = make_config()
        c.train.num_steps = steps
        c.train.ckpt_every = 100
        c.train.export_hf = False
        c.eval.at_start = False
        c.eval.every = 0
        return c

    train(config(), str(tmp_path / "embedded"))
    c = config()
    srv = serve(c, engine_name="jax", options=SidecarOptions(weights_dir=str(tmp_path / "w"), workers=0))
    try:
        c.rollout.backend = "sidecar"
        c.rollout.sidecar.address = srv.target
        c.rollout.sidecar.weights_dir = str(tmp_path / "w")
        train(c, str(tmp_path / "sidecar"))
        assert srv.servicer.groups_served == steps * c.rollout.prompts_per_step
        assert srv.servicer._version == steps  # pushed after each step
    finally:
        srv.stop(grace=0)

    def rows(d):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(str(tmp_path / d))]

    emb, side = rows("embedded"), rows("sidecar")
    assert [r["step"] for r in emb] == [r["step"] for r in side] == list(range(1, steps + 1))
    for a, b in zip(emb, side):
        assert b.keys() - a.keys() == {"sync/bytes"}  # only a sidecar moves weight bytes
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k, a[k], b[k])
    return emb, side
