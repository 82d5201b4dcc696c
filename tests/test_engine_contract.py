"""One engine contract: every engine is built by ``build.make_engine`` from a config and answers
``generate(prompts, params, *, answers=, prompt_ids=)``, ``sync(weights, version)`` and ``close()``."""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.base.configs import UsageError, load_config_module
from conspo_jax.rollout import RolloutEngine, SamplingParams
from conspo_jax.rollout.jax_engine import JaxEngine
from conspo_jax.rollout.sglang_engine import SGLangEngine
from conspo_jax.rollout.sidecar_client import SidecarClient
from conspo_jax.run import build
from conspo_jax.sidecar.engines import build_engine
from conspo_jax.sidecar.options import SidecarOptions
from conspo_jax.sidecar.server import serve
from tests.test_sidecar_sglang import StandInSGLangEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"
PARAMS = SamplingParams(n=2, max_new_tokens=4, seed=1)


def _config():
    c = load_config_module(SMOKE)
    c.sft.steps = 0
    return c


@pytest.mark.parametrize("cls", [JaxEngine, SGLangEngine, SidecarClient, build.MockEngine])
def test_every_engine_implements_the_contract(cls):
    assert issubclass(cls, RolloutEngine)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves part of the contract abstract"
    sig = inspect.signature(cls.generate).parameters
    assert {"answers", "prompt_ids"} <= set(sig), cls.__name__
    assert list(inspect.signature(cls.sync).parameters) == ["self", "weights", "version"], cls.__name__


def test_the_jax_engine_samples_in_the_model_compute_dtype_for_training_and_eval():
    """The factory gives every caller the same engine: a float32 model gets a float32 KV cache."""
    c = _config()
    tok = build.build_tokenizer(c)
    mesh = build.build_mesh(c)
    policy = build.build_policy(c, tok, mesh, seed=0)
    engine = build.make_engine(c, policy, tok, mesh, version=3)
    assert isinstance(engine, JaxEngine) and engine.version == 3
    assert engine.cache_dtype == jnp.float32 and engine.bucket == c.rollout.prompt_bucket
    prompts = [[tok.bos_token_id, 5, 6], [tok.bos_token_id, 7]]
    out = engine.generate(prompts, PARAMS, answers=["1", "2"], prompt_ids=["a", "b"])
    assert out.num_rows == 4 and out.rewards_R is None  # the embedded engine does not verify
    # sync with a state swaps the weights: new weights, new samples' log-probs.
    scaled = jax.tree.map(lambda x: x * 1.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, nnx.state(policy))
    engine.sync(scaled, 4)
    again = engine.generate(prompts, PARAMS)
    assert engine.version == 4 and again.weight_version == 4
    assert not np.allclose(again.logprobs_RxC, out.logprobs_RxC)
    engine.close()


def test_mock_and_sglang_backends_come_from_the_same_factory(tmp_path):
    c = _config()
    mock = build.make_engine(c, backend="mock", version=2)
    out = mock.generate([[3, 4]], PARAMS)
    assert out.completions()[0] == [4, 3, 1] and out.weight_version == 2
    with pytest.raises(FileNotFoundError):
        mock.sync(str(tmp_path / "missing"), 3)
    c.model.path = str(tmp_path)
    fake = StandInSGLangEngine()
    sglang = build.make_engine(c, backend="sglang", engine=fake)
    assert isinstance(sglang, SGLangEngine)
    sglang.sync(str(tmp_path), 5)
    assert sglang.version == 5 and fake.calls[0] == ("update_weights_from_disk", str(tmp_path))
    with pytest.raises(TypeError, match="from disk"):
        sglang.sync({"not": "a path"}, 6)
    with pytest.raises(UsageError, match="rollout.backend"):
        build.make_engine(c, backend="vllm")


def test_the_sidecar_client_is_built_by_the_factory_and_pushes_the_policy(tmp_path):
    """rollout.backend=sidecar: make_engine waits for the sidecar, pushes the policy as ``version``, and
    ``sync`` of an nnx.State exports and pushes it again (older exports deleted)."""
    c = _config()
    srv = serve(handle=build_engine("mock"), options=SidecarOptions(weights_dir=str(tmp_path), workers=0))
    try:
        c.rollout.backend = "sidecar"
        c.rollout.sidecar.address = srv.target
        c.rollout.sidecar.weights_dir = str(tmp_path)
        tok = build.build_tokenizer(c)
        policy = build.build_policy(c, tok, None, seed=0)
        client = build.make_engine(c, policy, tok, None, version=7)
        assert isinstance(client, SidecarClient) and client.version == 7 and srv.servicer._version == 7
        client.sync(nnx.state(policy), 8)
        assert srv.servicer._version == 8 and sorted(os.listdir(tmp_path)) == ["v000008"]
        out = client.generate([[5, 6]], PARAMS, answers=["65"], prompt_ids=["p0"])
        assert out.rewards_R is not None and out.weight_version == 8  # the sidecar verified
        client.close()
    finally:
        srv.stop(grace=0)
