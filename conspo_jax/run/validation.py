"""Up-front validation of a run's config: every value's type and range, and every path it names.

``validate_config(config)`` runs before anything is built or written and raises
``conspo_jax.base.configs.UsageError`` (exit code 2 in the CLI) naming the key and the value, e.g.
``rollout.top_p must be in (0, 1], got 1.5``. Without it these values failed late (``top_p`` at the
first rollout, after the warm start), with a traceback (``train.ckpt_every=0``: ZeroDivisionError), or
not at all (``optim.lr=-1``, ``rollout.n=1``: every group invalid, the gradient always zero).

What is checked:
* sampling parameters of training (``rollout.*``) and evaluation (``eval.*``): temperature finite and
  >= 0, top_p in (0, 1], top_k >= 0, max_new_tokens >= 1 (eval: 0 means the training length);
* ``rollout.n >= 2`` (every registered objective compares rollouts within a group), batch sizes,
  step counts and intervals, the optimizer, the seed, the mesh, dtypes;
* every hyperparameter of every ``objective.<name>`` section (``_HPARAM_RULES``): a key the objective
  does not accept is an error too, so a rule cannot silently go missing;
* paths: the model directory (config.json parses; each safetensors file the index lists exists and its
  header is consistent with its size, unless ``model.random_init``), the tokenizer directory, the
  training data (read and parsed: every row must have its problem and answer fields) and the
  evaluation benchmarks. Errors name the file, and for data the row and field.

``check_paths=False`` skips the path checks (tests of value rules; configs for another machine).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from conspo_jax.base.configs import UsageError
from conspo_jax.rewards.extract import ANSWER_FORMATS

_MISSING = object()
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the build layer's DTYPES keys
TASKS = ("math", "arith")
BACKENDS = ("jax", "sidecar")
DATA_FORMATS = ("", "jsonl", "json", "parquet", "csv")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _is_int(value) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    import numpy as np

    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fail(key: str, value, requirement: str):
    raise UsageError(f"{key} must be {requirement}, got {value!r}")


# --- rules: each takes (key, value) and raises UsageError --------------------------------------------


def integer(low: int | None = None, *, also: tuple = ()) -> Callable[[str, Any], None]:
    def check(key, value):
        if value in also and _is_int(value):
            return
        if not _is_int(value):
            _fail(key, value, "an integer")
        if low is not None and value < low:
            extra = "".join(f" or {a}" for a in also)
            _fail(key, value, f">= {low}{extra}")

    return check


def real(low: float | None = None, high: float | None = None, *, low_open=False, high_open=False):
    """A finite number in [low, high] (``low_open`` / ``high_open`` exclude the end points)."""

    def check(key, value):
        if not _is_real(value):
            _fail(key, value, "a number")
        if not math.isfinite(value):
            _fail(key, value, "finite")
        lo_bad = low is not None and (value <= low if low_open else value < low)
        hi_bad = high is not None and (value >= high if high_open else value > high)
        if lo_bad or hi_bad:
            if low is not None and high is not None:
                _fail(key, value, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
            elif low is not None:
                _fail(key, value, f"{'>' if low_open else '>='} {low}")
            else:
                _fail(key, value, f"{'<' if high_open else '<='} {high}")

    return check


def choice(options) -> Callable[[str, Any], None]:
    def check(key, value):
        if value not in options:
            _fail(key, value, f"one of {list(options)}")

    return check


def boolean(key, value):
    if not isinstance(value, bool):
        _fail(key, value, "True or False")


def string(key, value):
    if not isinstance(value, str):
        _fail(key, value, "a string")


POSITIVE = real(0.0, low_open=True)
NONNEGATIVE = real(0.0)


# Objective hyperparameters by name (conspo_jax/objectives/*: each objective's keyword defaults).
def _dual_clip(key, value):
    """verl's dual-clip constant: 0 (off) or a finite value > 1."""
    NONNEGATIVE(key, value)
    if value != 0 and not value > 1:
        _fail(key, value, "must be 0 (off) or > 1")


_HPARAM_RULES: dict[str, Callable[[str, Any], None]] = {
    "tau": POSITIVE,  # InfoNCE / DisCO temperature: divides the scores
    "tau_pos": POSITIVE,  # SAPO gate temperatures
    "tau_neg": POSITIVE,
    "max_margin": NONNEGATIVE,  # ConSPO's scheduled margin M
    "margin": NONNEGATIVE,  # the fixed-margin ablation
    "warmup_ratio": real(0.0, 1.0, low_open=True),  # alpha in (0, 1]
    "reward_threshold": real(),  # positives are rewards > threshold: any finite value
    "eps_low": NONNEGATIVE,  # clipping ranges
    "eps_high": NONNEGATIVE,
    "beta": NONNEGATIVE,  # KL coefficient (GRPO) / penalty weight (DisCO)
    "delta": NONNEGATIVE,  # DisCO's KL budget
    "length_normalizer": NONNEGATIVE,  # Dr. GRPO's constant; 0 = the batch's max length
    "dynamic_sampling": boolean,
    "score": choice(("logL", "Lratio")),  # DisCO
    "kl_estimator": choice(("k1", "k3")),
    "kl_scope": choice(("group", "batch")),
    # peer presets (conspo_jax/objectives/peers.py)
    "std_estimator": choice(("population", "unbiased")),
    "std_eps": NONNEGATIVE,
    "singleton": choice(("zero", "reward")),
    "clip_ratio_c": _dual_clip,
}

# Every other value, by config key.
_RULES: dict[str, Callable[[str, Any], None]] = {
    "seed": integer(0),
    "task": choice(TASKS),
    "xla_cache_dir": string,
    "tokenizer": string,
    "model.arch": string,
    "model.path": string,
    "model.random_init": boolean,
    "model.dtype": choice(DTYPE_NAMES),
    "model.param_dtype": choice(DTYPE_NAMES),
    "model.logprob_chunk": integer(0),
    "mesh.data": integer(1, also=(-1,)),
    "mesh.fsdp": integer(1, also=(-1,)),
    "mesh.tensor": integer(1, also=(-1,)),
    "data.train": string,
    "data.train_format": choice(DATA_FORMATS),
    "data.eval": string,
    "data.answer_format": choice(ANSWER_FORMATS),
    "data.max_prompt_len": integer(1),
    "data.num_epochs": integer(1),
    "data.shuffle": boolean,
    "data.num_train": integer(1),
    "data.num_eval": integer(0),
    "data.max_operand": integer(1),
    "data.pad_operands": boolean,
    "rollout.backend": choice(BACKENDS),
    "rollout.prompts_per_step": integer(1),
    "rollout.n": integer(2),
    "rollout.temperature": real(0.0),
    "rollout.top_p": real(0.0, 1.0, low_open=True),
    "rollout.top_k": integer(0),
    "rollout.max_new_tokens": integer(1),
    "rollout.prompt_bucket": integer(1),
    "rollout.decode_rows": integer(0),
    "rollout.decode_chunk": integer(1),
    "rollout.async_steps": choice((0, 1)),
    "rollout.tis_cap": NONNEGATIVE,
    "rollout.dynamic_sampling": choice(("auto", "on", "off")),
    "rollout.max_sampling_rounds": integer(1),
    "rollout.oversample": integer(1),
    "rollout.overlong_buffer": integer(0, also=(-1,)),  # -1: auto
    "rollout.overlong_penalty": NONNEGATIVE,
    "rollout.sidecar.workers": integer(0),
    "rollout.sidecar.chunk_prompts": integer(0),
    "rollout.sidecar.max_message_mb": integer(1),
    "rollout.sidecar.version_wait_s": NONNEGATIVE,
    "rollout.sidecar.max_staleness": integer(0),
    "rollout.sidecar.deadline_s": POSITIVE,
    "rollout.sidecar.token": string,
    "rollout.sidecar.weights_dir": string,
    "rollout.sidecar.verifier": string,
    "optim.lr": NONNEGATIVE,
    "optim.warmup_steps": integer(0),
    "optim.weight_decay": NONNEGATIVE,
    "optim.b1": real(0.0, 1.0, high_open=True),
    "optim.b2": real(0.0, 1.0, high_open=True),
    "optim.eps": POSITIVE,
    "optim.grad_clip": NONNEGATIVE,  # 0 disables clipping
    "train.num_steps": integer(0),  # 0: derived from the data size
    "train.mini_batches": integer(1),
    "train.micro_batch_groups": integer(0),  # 0: the whole mini-batch
    "train.log_every": integer(1),
    "train.ckpt_every": integer(1),
    "train.keep_ckpts": integer(1),
    "train.stop_after": integer(0),
    "train.max_nonfinite": integer(0),
    "train.progress_bar": boolean,
    "train.export_hf": boolean,
    "train.diagnostics_every": integer(0),
    "sft.steps": integer(0),
    "sft.lr": NONNEGATIVE,
    "sft.batch_size": integer(1),
    "sft.warmup_steps": integer(0),
    "sft.cache_dir": string,
    "sft.target_pass": real(0.0, 1.0, high_open=True),
    "sft.check_every": integer(1),
    "eval.every": integer(0),  # 0: never during training
    "eval.at_start": boolean,
    "eval.n": integer(1),
    "eval.temperature": real(0.0),
    "eval.top_p": real(0.0, 1.0, low_open=True),
    "eval.max_new_tokens": integer(0),  # 0: rollout.max_new_tokens
    "eval.k": integer(0),
    "eval.benchmarks": string,
    "eval.limit": integer(0),
    "eval.num_problems": integer(0),
    # multi-process start-up (conspo_jax/base/distributed.py): 0 / -1 / '' leave the value to the environment
    "distributed.enabled": boolean,
    "distributed.coordinator": string,
    "distributed.num_processes": integer(0),
    "distributed.process_id": integer(0, also=(-1,)),
    "distributed.init_timeout_s": integer(0),
}


def validate_config(config, *, check_paths: bool = True) -> None:
    """Raises UsageError naming the first bad key and its value; returns None for a usable config."""
    for key, rule in _RULES.items():
        value = _get(config, key)
        if value is not _MISSING:
            rule(key, value)
    remat = _get(config, "model.remat")
    if remat is not _MISSING:
        from conspo_jax.models.layers import REMAT_POLICIES

        choice(tuple(REMAT_POLICIES))("model.remat", remat)
    lora = _get(config, "model.lora")
    if lora is not _MISSING:
        _check_lora(lora)
    _check_objectives(config)
    _check_relations(config)
    if check_paths:
        _check_paths(config)


def _check_lora(section) -> None:
    """model.lora: LoRAConfig's own rules (rank >= 0, alpha > 0, known targets); returns the LoRAConfig."""
    from conspo_jax.models.lora import LoRAConfig

    try:
        lora = LoRAConfig.from_config(section)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    return lora


def _check_objectives(config) -> None:
    from conspo_jax.objectives import get_objective, list_objectives

    name = _get(config, "objective.name")
    if name is _MISSING:
        return
    if name not in list_objectives():
        raise UsageError(f"objective.name must be one of {list_objectives()}, got {name!r}")
    for objective in list_objectives():
        section = _get(config, f"objective.{objective}")
        if section is _MISSING:
            continue
        accepted = get_objective(objective).defaults
        for key, value in dict(section).items():
            dotted = f"objective.{objective}.{key}"
            if key not in accepted:
                raise UsageError(f"{dotted} is not a hyperparameter of {objective!r} (it takes {sorted(accepted)})")
            rule = _HPARAM_RULES.get(key)
            if rule is None:  # a new hyperparameter without a rule: at least no NaN or inf
                if _is_real(value) and not math.isfinite(value):
                    _fail(dotted, value, "finite")
            else:
                rule(dotted, value)


def _check_relations(config) -> None:
    """Rules that involve several keys."""
    groups, mini = _get(config, "rollout.prompts_per_step"), _get(config, "train.mini_batches")
    if _MISSING not in (groups, mini) and groups % mini:
        raise UsageError(f"train.mini_batches={mini} must divide rollout.prompts_per_step={groups}")
    micro = _get(config, "train.micro_batch_groups")
    if _MISSING not in (groups, mini, micro) and micro and (groups // mini) % micro:
        raise UsageError(
            f"train.micro_batch_groups={micro} must divide the {groups // mini} groups of a mini-batch "
            f"(rollout.prompts_per_step={groups} / train.mini_batches={mini})"
        )
    buffer, max_new = _get(config, "rollout.overlong_buffer"), _get(config, "rollout.max_new_tokens")
    if _MISSING not in (buffer, max_new) and buffer > max_new:
        raise UsageError(
            f"rollout.overlong_buffer={buffer} must be at most rollout.max_new_tokens={max_new} (-1: auto, 0: off)"
        )
    ops = _get(config, "data.ops")
    if ops is not _MISSING and (not isinstance(ops, str) or not ops or set(ops) - set("+-*")):
        _fail("data.ops", ops, "a non-empty string of the operators + - *")
    if _get(config, "rollout.backend") == "sidecar":
        address = _get(config, "rollout.sidecar.address")
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail("rollout.sidecar.address", address, "host:port with a port in 1..65535")
    model_path, arch = _get(config, "model.path"), _get(config, "model.arch")
    if _MISSING not in (model_path, arch) and not model_path and not arch:
        raise UsageError("set model.path (an HF checkpoint directory) or model.arch (random weights); both are empty")
    if _get(config, "task") == "math" and not _get(config, "data.train"):
        raise UsageError("data.train must name a training file or dataset for task='math', got ''")
    num_train = _get(config, "data.num_train")
    if _get(config, "task") == "arith" and _MISSING not in (num_train, groups) and num_train < groups:
        raise UsageError(f"rollout.prompts_per_step={groups} exceeds data.num_train={num_train}")


def _check_paths(config) -> None:
    from conspo_jax.models.hf_io import check_hf_checkpoint, read_hf_config

    model_path = _get(config, "model.path")
    if model_path:
        try:
            if _get(config, "model.random_init") is True:
                read_hf_config(model_path)  # random weights of the checkpoint's architecture: no tensors read
            else:
                check_hf_checkpoint(model_path)
        except UsageError as e:
            raise UsageError(f"model.path={model_path!r}: {e}") from None
    tokenizer = _get(config, "tokenizer")
    task = _get(config, "task")
    if tokenizer not in (_MISSING, "", "arith") and not os.path.isdir(tokenizer):
        raise UsageError(f"tokenizer: no tokenizer directory {tokenizer!r}")
    if task == "math":
        _check_math_data(config)


def _check_math_data(config) -> None:
    from conspo_jax.data import math_data

    spec = _get(config, "data.train")
    fmt = _get(config, "data.train_format") or None
    # hub datasets are not fetched here; 'arith_nl' is generated (its size is data.num_train)
    if isinstance(spec, str) and not spec.startswith("hf:") and spec != "arith_nl":
        try:
            records = math_data.load_dataset_spec(spec, fmt=fmt)
        except UsageError as e:
            raise UsageError(f"data.train={spec!r}: {e}") from None
        per_step = _get(config, "rollout.prompts_per_step")
        if per_step is not _MISSING and len(records) < per_step:
            raise UsageError(
                f"rollout.prompts_per_step={per_step} exceeds the {len(records)} training prompts of data.train={spec!r}"
            )
    held_out = _get(config, "data.eval")
    if isinstance(held_out, str) and held_out and not held_out.startswith("hf:") and held_out != "arith_nl":
        try:
            math_data.load_dataset_spec(held_out, limit=1)
        except UsageError as e:
            raise UsageError(f"data.eval={held_out!r}: {e}") from None
    every, at_start = _get(config, "eval.every"), _get(config, "eval.at_start")
    benchmarks = _get(config, "eval.benchmarks")
    if benchmarks is _MISSING or not (every or at_start is True):
        return
    for name in filter(None, str(benchmarks).split(",")):
        if name.startswith("hf:"):
            continue
        try:
            math_data.load_benchmark(name, limit=1)
        except UsageError as e:
            raise UsageError(f"eval.benchmarks: {name!r}: {e}") from None
