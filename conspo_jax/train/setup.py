"""Builds what a run needs from its config: tokenizer, mesh, policy, task (data + verifier), engine.

Every user-facing mistake found here (a missing path, an unknown objective or architecture, a
non-positive group size) raises ``UsageError`` naming the config key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from conspo_jax.configs import UsageError, require

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(config) -> None:
    """Checks the values that would otherwise fail deep inside a run."""
    from conspo_jax.objectives import get_objective

    r = config.rollout
    require(r.n >= 1, f"rollout.n must be a positive group size, got {r.n}")
    require(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}")
    require(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    require(r.backend in ("jax", "sidecar"), f"rollout.backend must be 'jax' or 'sidecar', got {r.backend!r}")
    require(config.task in ("math", "arith"), f"task must be 'math' or 'arith', got {config.task!r}")
    for key in ("dtype", "param_dtype"):
        value = config.model[key]
        require(value in DTYPES, f"model.{key} must be one of {sorted(DTYPES)}, got {value!r}")
    try:
        get_objective(config.objective.name)
    except (ValueError, KeyError) as e:
        raise UsageError(f"objective.name: {e}") from None
    if config.model.path and not os.path.isdir(config.model.path):
        raise UsageError(f"model.path: no such checkpoint directory {config.model.path!r}")
    if not config.model.path and not config.model.arch:
        raise UsageError("set model.path (an HF checkpoint directory) or model.arch (random weights)")
    if config.task == "math":
        require(bool(config.data.train), "data.train must name a training file or dataset for task='math'")
    if config.data.train and os.path.sep in config.data.train and not os.path.exists(config.data.train):
        raise UsageError(f"data.train: no such file {config.data.train!r}")


def enable_compilation_cache(config) -> None:
    """Persists compiled XLA programs so a resumed or repeated run skips recompilation.

    ``JAX_COMPILATION_CACHE_DIR`` in the environment wins over ``config.xla_cache_dir``; '' disables.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(config.xla_cache_dir)
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_tokenizer(config):
    if config.tokenizer == "arith" or (config.task == "arith" and not config.tokenizer):
        from conspo_jax.data.arith import build_arith_tokenizer

        return build_arith_tokenizer()
    from transformers import AutoTokenizer

    path = config.tokenizer or config.model.path
    if not path or not os.path.isdir(path):
        raise UsageError(f"tokenizer: no tokenizer directory {path!r} (set tokenizer or model.path)")
    return AutoTokenizer.from_pretrained(path)


def build_mesh(config):
    from conspo_jax.models import make_mesh

    shape = {k: int(config.mesh[k]) for k in ("data", "fsdp", "tensor")}
    fixed = math.prod(v for v in shape.values() if v > 0)
    n_dev = jax.device_count()
    for k, v in shape.items():
        if v == -1:
            shape[k] = n_dev // fixed
    require(
        math.prod(shape.values()) == n_dev,
        f"mesh: data*fsdp*tensor must equal the {n_dev} devices, got {dict(config.mesh)}",
    )
    return make_mesh(shape)


def build_policy(config, tokenizer, mesh, seed: int):
    from conspo_jax.models import ModelConfig, get_model_config, init_policy

    m = config.model
    opts = dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], mesh=mesh, remat=m.remat)
    if m.logprob_chunk:
        opts["logprob_chunk"] = m.logprob_chunk
    if m.path and not m.random_init:
        from conspo_jax.models import load_hf_policy

        return load_hf_policy(m.path, **opts)
    if m.path:
        model_config = ModelConfig.from_hf(m.path)
    else:
        try:
            model_config = get_model_config(m.arch)
        except (KeyError, ValueError) as e:
            raise UsageError(f"model.arch: {e}") from None
    overrides = dict(m.overrides)
    if config.task == "arith":
        overrides.setdefault("vocab_size", len(tokenizer))
    if overrides:
        try:
            model_config = dataclasses.replace(model_config, **overrides)
        except TypeError as e:
            raise UsageError(f"model.overrides: {e}") from None
    return init_policy(model_config, seed=seed, **opts)


@dataclasses.dataclass
class Task:
    """Prompts and the verifier of a training run."""

    train_records: list
    eval_records: list
    encode: Callable[[dict], list]  # record -> prompt token ids
    reward: Callable[[list, list], np.ndarray]  # (response texts, answers) -> rewards
    sft_target: Callable[[dict], str] | None = None  # record -> supervised completion (warm start)


def build_task(config, tokenizer) -> Task:
    if config.task == "arith":
        from conspo_jax.data import arith

        d = config.data
        kw = dict(seed=config.seed, max_operand=d.max_operand, ops=d.ops, pad_operands=d.pad_operands)
        try:
            train = arith.make_arith_records("train", num=d.num_train, **kw)
            held_out = arith.make_arith_records("eval", num=config.eval.num_problems, **kw)
        except ValueError as e:
            raise UsageError(str(e)) from None
        bos = [tokenizer.bos_token_id]
        return Task(
            train,
            held_out,
            encode=lambda r: bos + tokenizer(arith.arith_prompt(r["problem"]))["input_ids"],
            reward=lambda texts, answers: np.array(
                [arith.arith_reward(t, a) for t, a in zip(texts, answers)], np.float32
            ),
            sft_target=lambda r: arith.arith_target(r["answer"]),
        )
    from conspo_jax.data.math_data import load_dataset_spec
    from conspo_jax.data.prompts import encode_prompt
    from conspo_jax.rewards import math_reward_batch

    train = load_dataset_spec(config.data.train, fmt=config.data.train_format or None)
    return Task(
        train,
        [],
        encode=lambda r: encode_prompt(r["problem"], tokenizer),
        reward=lambda texts, answers: np.asarray(math_reward_batch(texts, answers), np.float32),
    )


def stop_token_ids(tokenizer, policy_config) -> tuple:
    ids = {tokenizer.eos_token_id, getattr(policy_config, "eos_token_id", None)}
    flat = set()
    for t in ids:
        if isinstance(t, (list, tuple)):
            flat.update(t)
        elif t is not None:
            flat.add(int(t))
    return tuple(sorted(flat))
