"""The engines a sidecar can serve, by name: 'jax', 'sglang' and the deterministic test engine 'mock'.

``build_engine(name, config, **overrides)`` returns an ``EngineHandle``: the ``RolloutEngine`` (built by
``conspo_jax.run.build.make_engine``, the one factory; PushWeights calls its ``sync(path, version)``) and
the tokenizer spec that verification decodes with.
"""

from __future__ import annotations

import dataclasses

from conspo_jax.rollout.engine import RolloutEngine
from conspo_jax.run import build

ENGINES = ("jax", "sglang", "mock")


@dataclasses.dataclass
class EngineHandle:
    name: str
    engine: RolloutEngine
    tokenizer: str | None = None  # decoding tokenizer spec for verification (see verifiers.load_tokenizer)
    # Request limits the server checks before the engine sees a request (None: not checked).
    vocab_size: int | None = None  # every prompt / stop token id must be < vocab_size
    max_prompt_len: int | None = None  # tokens per prompt
    max_total_len: int | None = None  # prompt tokens + max_new_tokens (the model's positions)

    @property
    def version(self) -> int:
        return int(self.engine.version)


def build_engine(name: str, config=None, **overrides) -> EngineHandle:
    if name not in ENGINES:
        raise ValueError(f"unknown sidecar engine {name!r} (expected one of {', '.join(ENGINES)})")
    if name == "mock":
        limits = dict(
            vocab_size=overrides.pop("vocab_size", 1024), max_prompt_len=overrides.pop("max_prompt_len", None)
        )
        return EngineHandle("mock", build.make_engine(config, backend="mock", **overrides), **limits)
    if config is None:
        raise ValueError(f"the {name} sidecar engine needs the experiment config (--config)")
    if name == "sglang":
        tokenizer = overrides.pop("tokenizer", None)
        engine = build.make_engine(config, backend="sglang", **overrides)
        return EngineHandle("sglang", engine, tokenizer=tokenizer or config.model.path)
    tokenizer = build.build_tokenizer(config)
    mesh = build.build_mesh(config)
    policy = build.build_policy(config, tokenizer, mesh, seed=config.seed)
    engine = build.make_engine(config, policy, tokenizer, mesh, backend="jax", **overrides)
    spec = config.tokenizer or ("arith" if config.task == "arith" else config.model.path)
    return EngineHandle(
        "jax",
        engine,
        tokenizer=spec,
        vocab_size=policy.config.vocab_size,
        max_prompt_len=config.data.max_prompt_len or None,
        max_total_len=policy.config.max_position_embeddings,
    )
