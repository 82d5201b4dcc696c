"""The build layer: config -> the objects a run needs (tokenizer, task, mesh, policy, engine).

Training (``conspo_jax.train``), evaluation (``conspo_jax.evals``) and the sidecar all construct
through these functions, so the three can never disagree on, say, the KV-cache dtype of the sampler.
Every user-facing mistake found here (a missing path, an unknown objective or architecture, a
non-positive group size) raises ``UsageError`` naming the config key and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from transformers import AutoTokenizer

from conspo_jax.base.configs import UsageError, require
from conspo_jax.base.xla_cache import host_cache_dir
from conspo_jax.data import arith
from conspo_jax.data.math_data import load_dataset_spec
from conspo_jax.data.prompts import encode_prompt
from conspo_jax.models import ModelConfig, abstract_policy, get_model_config, init_policy, load_hf_policy, make_mesh
from conspo_jax.models.lora import LoRAConfig, attach_lora, trainable_filter
from conspo_jax.rewards import Verdict, default_pool
from conspo_jax.rollout.engine import MockEngine, RolloutEngine, reverse_echo_script
from conspo_jax.rollout.jax_engine import JaxEngine
from conspo_jax.run.validation import validate_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(config) -> None:
    """Checks every value and path of the config before anything runs (``conspo_jax.run.validation``);
    raises ``UsageError`` naming the key and the value."""
    validate_config(config)


def enable_compilation_cache(config) -> None:
    """Persists compiled XLA programs so a resumed or repeated run skips recompilation.

    ``JAX_COMPILATION_CACHE_DIR`` in the environment wins over ``config.xla_cache_dir``; '' disables.
    The config's directory gets a subdirectory per host CPU (``conspo_jax.base.xla_cache``), so machines
    that share a home directory never load each other's native code.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
        host_cache_dir(config.xla_cache_dir) if config.xla_cache_dir else ""
    )
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_tokenizer(config):
    if config.tokenizer == "arith" or (config.task == "arith" and not config.tokenizer):
        return arith.build_arith_tokenizer()
    path = config.tokenizer or config.model.path
    if not path or not os.path.isdir(path):
        raise UsageError(f"tokenizer: no tokenizer directory {path!r} (set tokenizer or model.path)")
    return AutoTokenizer.from_pretrained(path)


def build_mesh(config):
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


def build_policy(config, tokenizer, mesh, seed: int, *, abstract: bool = False):
    """The config's policy: loaded from ``model.path``, or randomly initialised (``model.arch`` or
    ``model.random_init``). ``abstract``: shapes only, nothing allocated or read but the HF config
    (``conspo profile --compile_only`` analyses a GPU-sized run on a CPU this way)."""
    m = config.model
    opts = dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], mesh=mesh, remat=m.remat)
    if m.logprob_chunk:
        opts["logprob_chunk"] = m.logprob_chunk
    if m.path and not m.random_init and not abstract:
        return _with_lora(config, load_hf_policy(m.path, **opts), seed)
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
    if abstract:
        return _with_lora(config, abstract_policy(model_config, **opts), seed)
    return _with_lora(config, init_policy(model_config, seed=seed, **opts), seed)


def _with_lora(config, policy, seed: int):
    """The policy with ``model.lora``'s adapters attached (rank 0: as it is). Training then differentiates
    only the adapters (``lora.trainable_filter``); engines sample from merged weights."""
    lora = LoRAConfig.from_config(config.model.get("lora", {"rank": 0}))
    return attach_lora(policy, lora, seed=seed) if lora.enabled else policy


@dataclasses.dataclass
class Task:
    """Prompts and the verifier of a run; training, held-out evaluation and the benchmarks all use it.

    verify(texts, answers) -> one ``conspo_jax.rewards.Verdict`` per response (score 1.0 / 0.0, the
    extracted answer, how it was decided).
    """

    train_records: list
    eval_records: list
    encode: Callable[[dict], list]  # record -> prompt token ids
    verify: Callable[[list, list], list]
    sft_target: Callable[[dict], str] | None = None  # record -> supervised completion (warm start)

    def reward(self, texts, answers) -> np.ndarray:
        """float32 rewards, one per response."""
        return np.asarray([v.score for v in self.verify(texts, answers)], np.float32)


def _arith_verify(texts, answers) -> list:
    out = []
    for text, answer in zip(texts, answers):
        got = arith.arith_extract(text)
        score = arith.arith_reward(text, answer)
        out.append(Verdict(score, got, "no_box" if got is None else ("correct" if score else "wrong")))
    return out


def _math_verify(texts, answers, answer_format="boxed") -> list:
    return default_pool().verify(list(texts), list(answers), answer_format=answer_format)


def benchmark_verifier(config):
    """``evaluate``'s verify for benchmarks under ``config``: math-verify with the math task's
    data.answer_format ('boxed' for other tasks, the paper's protocol)."""
    answer_format = config.data.answer_format if config.task == "math" else "boxed"
    return functools.partial(_math_verify, answer_format=answer_format)


def build_task(config, tokenizer) -> Task:
    if config.task == "arith":
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
            verify=_arith_verify,
            sft_target=lambda r: arith.arith_target(r["answer"]),
        )
    d = config.data
    train, held_out = _math_records(config, d.train, "train", d.num_train), []
    if d.eval:  # a held-out set, evaluated like the synthetic task's (eval/accuracy, eval/boxed_rate)
        held_out = _math_records(config, d.eval, "eval", config.eval.num_problems)
    verify = functools.partial(_math_verify, answer_format=d.answer_format)
    return Task(train, held_out, encode=lambda r: encode_prompt(r["problem"], tokenizer), verify=verify)


def _math_records(config, spec: str, split: str, num: int) -> list:
    """``data.train`` / ``data.eval`` of the math task: 'arith_nl' (generated, split by problem) or a data set."""
    d = config.data
    if spec == "arith_nl":
        try:
            return arith.make_arith_nl_records(split, num=num, seed=config.seed, max_operand=d.max_operand, ops=d.ops)
        except ValueError as e:
            raise UsageError(str(e)) from None
    records = load_dataset_spec(spec, fmt=(d.train_format if split == "train" else "") or None)
    return records[:num] if split == "eval" and num else records


def stop_token_ids(tokenizer, policy_config) -> tuple:
    ids = {tokenizer.eos_token_id, getattr(policy_config, "eos_token_id", None)}
    flat = set()
    for t in ids:
        if isinstance(t, (list, tuple)):
            flat.update(t)
        elif t is not None:
            flat.add(int(t))
    return tuple(sorted(flat))


def make_engine(
    config, policy=None, tokenizer=None, mesh=None, *, backend: str | None = None, version: int = 0, **overrides
) -> RolloutEngine:
    """The one place an engine is constructed from a config (training, evaluation and the sidecar).

    backend: 'jax' (the embedded sampler over ``policy``), 'sidecar' (a gRPC client; ``policy``'s
             weights are pushed as ``version`` before the first rollout), 'sglang' (``sglang.Engine`` over
             ``model.path``) or 'mock' (the deterministic test engine). Default: ``rollout.backend``.
    overrides: engine keyword arguments that win over the config's (tests: ``cache_dtype``, ``delay_s``).
    """
    backend = backend or config.rollout.backend
    if backend not in ENGINE_BACKENDS:
        raise UsageError(f"rollout.backend must be one of {sorted(ENGINE_BACKENDS)}, got {backend!r}")
    return ENGINE_BACKENDS[backend](config, policy, tokenizer, mesh, version=version, **overrides)


def _jax_engine(config, policy, tokenizer, mesh, *, version, **overrides):
    if policy is None:
        raise ValueError("the jax engine samples from a policy: pass policy=")
    m = config.model
    opts = dict(
        eos_token_ids=stop_token_ids(tokenizer, policy.config),
        pad_id=tokenizer.pad_token_id or 0,
        mesh=mesh,
        prompt_bucket=config.rollout.prompt_bucket,
        # The KV cache keeps the compute dtype, so engine and trainer log-probs agree (fp32 runs: <= 1e-4).
        cache_dtype=DTYPES[m.dtype],
        version=version,
        load_options=dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], mesh=mesh),
        decode_rows=config.rollout.decode_rows,
        decode_chunk=config.rollout.decode_chunk,
        # A real model's rollouts take tens of seconds on a CPU: those show a bar, a tiny model's stay quiet.
        progress_after_s=5.0 if config.train.progress_bar else None,
    )
    opts.update(overrides)
    return JaxEngine(policy, **opts)


def _sidecar_client(config, policy, tokenizer, mesh, *, version, **overrides):
    # Imported here, not at the top: grpc stays out of runs that never talk to a sidecar.
    from conspo_jax.rollout.sidecar_client import SidecarClient

    return SidecarClient.from_config(config, tokenizer=tokenizer, policy=policy, version=version, **overrides)


def _sglang_engine(config, policy, tokenizer, mesh, *, version, model_path=None, **overrides):
    from conspo_jax.rollout.sglang_engine import SGLangEngine  # imports sglang only when constructed

    model_path = model_path or config.model.path
    if not model_path:
        raise UsageError("the sglang engine needs model.path (an HF checkpoint directory)")
    kwargs = dict(config.rollout.sidecar.sglang)
    kwargs.update(overrides)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return SGLangEngine(model_path, pad_id=pad, version=version, **kwargs)


def _mock_engine(config, policy, tokenizer, mesh, *, version, **overrides):
    opts = dict(eos_id=1, script=reverse_echo_script)
    opts.update(overrides)
    engine = MockEngine(**opts)
    engine.version = version
    return engine


ENGINE_BACKENDS = {"jax": _jax_engine, "sidecar": _sidecar_client, "sglang": _sglang_engine, "mock": _mock_engine}


def _checkpoint_dir(path: str) -> tuple[str, int | None]:
    """Accepts a trainer workdir, its checkpoints/ dir, or one step dir; returns (dir, step or None)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(base)
    return path, None


def load_policy_from_checkpoint(config, checkpoint: str, *, tokenizer, mesh):
    """The policy of a trainer checkpoint (latest step unless a step dir is given), built from config.

    Only the parameters are read (an Orbax partial restore): the optimizer moments, about twice the
    parameters' size, stay on disk.
    """
    directory, step = _checkpoint_dir(checkpoint)
    if not os.path.isdir(directory):
        raise UsageError(f"--checkpoint: no such directory {checkpoint!r}")
    policy = build_policy(config, tokenizer, mesh, seed=config.seed)
    # A LoRA run checkpoints its adapters only; the base comes from model.path.
    graphdef, params, rest = nnx.split(policy, trainable_filter(policy), ...)
    with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise UsageError(f"--checkpoint: no finished checkpoint in {directory!r}")
        target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"--checkpoint {checkpoint!r} (step {step}) does not hold this config's model "
                f"({config.model.arch or config.model.path}): {first[:300]}"
            ) from None
    return nnx.merge(graphdef, restored["state"]["params"], rest)
