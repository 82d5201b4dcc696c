"""The engines a sidecar can serve, by name, and how each loads weights from a directory.

``build_engine(name, config, **overrides)`` returns an ``EngineHandle``: the ``RolloutEngine``, a
``load_weights(path, version)`` callable used by PushWeights, and the tokenizer that verification
decodes with. 'jax' and 'sglang' are the real engines; 'mock' is the deterministic test engine.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from conspo_jax.rollout.engine import MockEngine, RolloutEngine


@dataclasses.dataclass
class EngineHandle:
    name: str
    engine: RolloutEngine
    load_weights: Callable[[str, int], None]
    tokenizer: str | None = None  # decoding tokenizer spec for verification (see verifiers.load_tokenizer)
    # Request limits the server checks before the engine sees a request (None: not checked).
    vocab_size: int | None = None  # every prompt / stop token id must be < vocab_size
    max_prompt_len: int | None = None  # tokens per prompt
    max_total_len: int | None = None  # prompt tokens + max_new_tokens (the model's positions)

    @property
    def version(self) -> int:
        return int(getattr(self.engine, "version", 0))


def mock_script(prompt, k):
    """The mock's completions: even samples echo the prompt reversed, odd samples answer ``2``.

    Together with the 'exact' verifier and answer = the reversed prompt as text, even samples score 1
    and odd samples 0, so a test can check that every reward belongs to its own prompt.
    """
    body = list(reversed(prompt)) if k % 2 == 0 else [2]
    return [*body, 1]  # 1 = the mock's EOS


class _SlowMock(MockEngine):
    """MockEngine that takes ``delay_s`` per generate call, so a test can act mid-stream."""

    def __init__(self, delay_s: float = 0.0, **kw):
        super().__init__(**kw)
        self.delay_s = delay_s

    def generate(self, prompts, params):
        time.sleep(self.delay_s)
        return super().generate(prompts, params)


def _build_mock(config, *, delay_s: float = 0.0, vocab_size: int = 1024, max_prompt_len: int | None = None, **_):
    engine = _SlowMock(delay_s=delay_s, eos_id=1, script=mock_script)

    def load(path, version):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"weights dir {path!r} does not exist")
        engine.update_weights(None, version)

    return EngineHandle("mock", engine, load, tokenizer=None, vocab_size=vocab_size, max_prompt_len=max_prompt_len)


def _cfg(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node if node is not None else default


def _build_sglang(config, *, model_path=None, tokenizer=None, **engine_kwargs):
    from conspo_jax.sidecar.sglang_engine import SGLangEngine

    model_path = model_path or _cfg(config, "model.path")
    if not model_path:
        raise ValueError("sglang sidecar needs a model: set config.model.path (an HF checkpoint directory)")
    kwargs = dict(_cfg(config, "rollout.sidecar.sglang", {}) or {})
    kwargs.update(engine_kwargs)
    engine = SGLangEngine(model_path, **kwargs)
    return EngineHandle("sglang", engine, engine.load_weights_from_path, tokenizer=tokenizer or model_path)


ENGINES: dict[str, Callable[..., EngineHandle]] = {"mock": _build_mock, "sglang": _build_sglang}


def build_engine(name: str, config=None, **overrides) -> EngineHandle:
    if name not in ENGINES:
        raise ValueError(f"unknown sidecar engine {name!r} (expected one of {', '.join(sorted(ENGINES))})")
    return ENGINES[name](config, **overrides)


def _build_jax(config, *, cache_dtype=None, **_):
    """The embedded JAX sampler over the config's policy; PushWeights reloads with load_hf_policy.

    cache_dtype: KV-cache dtype; by default the model's compute dtype, exactly as the trainer's embedded
    engine, so a float32 model's sidecar log-probs match the trainer's to ~1e-6.
    """
    if config is None:
        raise ValueError("the jax sidecar engine needs the experiment config (--config)")
    import jax.numpy as jnp
    from flax import nnx

    from conspo_jax.models.hf_io import load_hf_policy
    from conspo_jax.rollout.jax_engine import JaxEngine
    from conspo_jax.train import setup

    tokenizer = setup.build_tokenizer(config)
    mesh = setup.build_mesh(config)
    policy = setup.build_policy(config, tokenizer, mesh, seed=config.seed)
    stop_ids = setup.stop_token_ids(tokenizer, policy.config)
    engine = JaxEngine(
        policy,
        eos_token_ids=stop_ids,
        pad_id=tokenizer.pad_token_id,
        mesh=mesh,
        prompt_bucket=config.rollout.prompt_bucket,
        cache_dtype=cache_dtype or setup.DTYPES[config.model.dtype],
    )
    load_opts = dict(dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype), mesh=mesh)

    def load(path, version):
        new = load_hf_policy(path, **load_opts)
        _, state = nnx.split(new)
        if _layout(state) == _layout(engine.state):
            # Same architecture (the graphdefs differ only in checkpoint metadata such as torch_dtype):
            # swap the arrays and keep the compiled decode loop instead of recompiling on every push.
            engine.set_state(state, version)
        else:
            engine.update_weights(new, version)

    spec = config.tokenizer or ("arith" if config.task == "arith" else config.model.path)
    return EngineHandle(
        "jax",
        engine,
        load,
        tokenizer=spec,
        vocab_size=policy.config.vocab_size,
        max_prompt_len=config.data.max_prompt_len or None,
        max_total_len=policy.config.max_position_embeddings,
    )


def _layout(state):
    import jax

    leaves, treedef = jax.tree.flatten(state)
    return treedef, [(x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves]


ENGINES["jax"] = _build_jax
