"""Every bad input ends the same way: one UsageError (exit code 2 in the CLI) whose single line names
the key, the value or the file; nothing half-built, no traceback, an existing run dir untouched.

One table per entry point: config values (``validate_config``), paths (model directory, data files),
config modules (the CLI), and the API boundaries (rewards, sampling parameters, margin progress).
The sidecar's request checks are in tests/test_sidecar_validation.py.
"""

import hashlib
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conspo_jax.base.configs import UsageError, load_config_module
from conspo_jax.cli import main as cli_main
from conspo_jax.models.config import get_model_config
from conspo_jax.objectives import ObjectiveInputs, check_rewards, get_objective, list_objectives, margin_schedule
from conspo_jax.rollout.engine import SamplingParams
from conspo_jax.run.validation import _HPARAM_RULES, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(ROOT, "experiments", "arith_tiny.py")
NAN, INF = float("nan"), float("inf")


def smoke_config(**overrides):
    c = load_config_module(ARITH + ":smoke")
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def assert_one_line(err: Exception, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, f"not one line: {text!r}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def test_the_shipped_configs_are_valid():
    validate_config(smoke_config())
    validate_config(load_config_module(ARITH))
    for name in ("r1_distill_qwen_1p5b.py", "qwen3_4b_base.py:grpo"):
        validate_config(load_config_module(os.path.join(ROOT, "experiments", name)), check_paths=False)


# ------------------------------------------------------------------------------------------ values

VALUE_CASES = [
    # (override, words the message must contain)
    ({"rollout.top_p": 0.0}, "rollout.top_p must be in (0.0, 1.0], got 0.0"),
    ({"rollout.top_p": 1.5}, "rollout.top_p must be in (0.0, 1.0], got 1.5"),
    ({"rollout.top_p": NAN}, "rollout.top_p must be finite, got nan"),
    ({"rollout.temperature": -0.5}, "rollout.temperature must be >= 0.0, got -0.5"),
    ({"rollout.temperature": NAN}, "rollout.temperature must be finite, got nan"),
    ({"rollout.temperature": INF}, "rollout.temperature must be finite, got inf"),
    ({"rollout.top_k": -3}, "rollout.top_k must be >= 0, got -3"),
    ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens must be >= 1, got 0"),
    ({"rollout.n": 1}, "rollout.n must be >= 2, got 1"),
    ({"rollout.prompts_per_step": 0}, "rollout.prompts_per_step must be >= 1, got 0"),
    ({"rollout.prompt_bucket": 0}, "rollout.prompt_bucket must be >= 1, got 0"),
    ({"rollout.backend": "ray"}, "rollout.backend must be one of ['jax', 'sidecar'], got 'ray'"),
    ({"rollout.backend": "sidecar", "rollout.sidecar.address": "nohost"}, "rollout.sidecar.address must be host:port"),
    ({"rollout.sidecar.deadline_s": 0.0}, "rollout.sidecar.deadline_s must be > 0.0, got 0.0"),
    ({"eval.top_p": 0.0}, "eval.top_p must be in (0.0, 1.0], got 0.0"),
    ({"eval.temperature": NAN}, "eval.temperature must be finite, got nan"),
    ({"eval.n": 0}, "eval.n must be >= 1, got 0"),
    ({"eval.max_new_tokens": -1}, "eval.max_new_tokens must be >= 0, got -1"),
    ({"optim.lr": -1e-3}, "optim.lr must be >= 0.0, got -0.001"),
    ({"optim.lr": NAN}, "optim.lr must be finite, got nan"),
    ({"optim.b2": 1.0}, "optim.b2 must be in [0.0, 1.0), got 1.0"),
    ({"optim.eps": 0.0}, "optim.eps must be > 0.0, got 0.0"),
    ({"optim.grad_clip": -1.0}, "optim.grad_clip must be >= 0.0, got -1.0"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps must be >= 0, got -1"),
    ({"sft.batch_size": 0}, "sft.batch_size must be >= 1, got 0"),
    ({"sft.steps": -1}, "sft.steps must be >= 0, got -1"),
    ({"sft.lr": -1.0}, "sft.lr must be >= 0.0, got -1.0"),
    ({"train.ckpt_every": 0}, "train.ckpt_every must be >= 1, got 0"),
    ({"train.num_steps": -5}, "train.num_steps must be >= 0, got -5"),
    ({"train.log_every": 0}, "train.log_every must be >= 1, got 0"),
    ({"train.keep_ckpts": 0}, "train.keep_ckpts must be >= 1, got 0"),
    ({"train.mini_batches": 3}, "train.mini_batches=3 must divide rollout.prompts_per_step=8"),
    ({"train.micro_batch_groups": 3}, "train.micro_batch_groups=3 must divide the 8 groups"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"task": "chess"}, "task must be one of ['math', 'arith'], got 'chess'"),
    ({"model.dtype": "float8"}, "model.dtype must be one of ['float32', 'bfloat16', 'float16'], got 'float8'"),
    ({"model.remat": "some"}, "model.remat must be one of"),
    ({"model.arch": "", "model.path": ""}, "set model.path"),
    ({"mesh.data": 0}, "mesh.data must be >= 1 or -1, got 0"),
    ({"data.ops": "/"}, "data.ops must be a non-empty string of the operators"),
    ({"data.num_epochs": 0}, "data.num_epochs must be >= 1, got 0"),
    ({"data.max_prompt_len": 0}, "data.max_prompt_len must be >= 1, got 0"),
    ({"data.num_train": 4}, "rollout.prompts_per_step=8 exceeds data.num_train=4"),
    ({"data.train_format": "xml"}, "data.train_format must be one of"),
    ({"objective.name": "nope"}, "objective.name must be one of"),
    ({"objective.conspo.tau": 0.0}, "objective.conspo.tau must be > 0.0, got 0.0"),
    ({"objective.conspo.tau": NAN}, "objective.conspo.tau must be finite, got nan"),
    ({"objective.conspo.max_margin": -0.1}, "objective.conspo.max_margin must be >= 0.0, got -0.1"),
    ({"objective.conspo.warmup_ratio": 1.5}, "objective.conspo.warmup_ratio must be in (0.0, 1.0], got 1.5"),
    ({"objective.conspo.reward_threshold": INF}, "objective.conspo.reward_threshold must be finite, got inf"),
    ({"objective.conspo_fixed_margin.margin": -1.0}, "objective.conspo_fixed_margin.margin must be >= 0.0"),
    ({"objective.grpo.beta": -0.04}, "objective.grpo.beta must be >= 0.0, got -0.04"),
    ({"objective.grpo.eps_low": -0.2}, "objective.grpo.eps_low must be >= 0.0, got -0.2"),
    ({"objective.dr_grpo.length_normalizer": -1.0}, "objective.dr_grpo.length_normalizer must be >= 0.0"),
    ({"objective.disco.score": "x"}, "objective.disco.score must be one of ['logL', 'Lratio'], got 'x'"),
    ({"objective.disco.delta": -1.0}, "objective.disco.delta must be >= 0.0, got -1.0"),
    ({"objective.disco.kl_scope": "x"}, "objective.disco.kl_scope must be one of ['group', 'batch'], got 'x'"),
    ({"objective.sapo.tau_neg": 0.0}, "objective.sapo.tau_neg must be > 0.0, got 0.0"),
    ({"objective.gspo.eps_high": NAN}, "objective.gspo.eps_high must be finite, got nan"),
]


@pytest.mark.parametrize("override, message", VALUE_CASES, ids=[next(iter(c[0])) for c in VALUE_CASES])
def test_bad_config_values_name_the_key_and_value(override, message):
    with pytest.raises(UsageError) as e:
        validate_config(smoke_config(**override))
    assert_one_line(e.value, message)


def test_non_numbers_are_named_too():
    # ml_collections keeps a field's type on override; a dict-built config can hold anything.
    c = smoke_config()
    c.unlock()
    del c.train["ckpt_every"]
    c.train.ckpt_every = "often"
    with pytest.raises(UsageError, match="train.ckpt_every must be an integer, got 'often'"):
        validate_config(c)
    c = smoke_config()
    c.objective.conspo.unlock()
    c.objective.conspo.temperature = 1.0
    with pytest.raises(UsageError, match=r"objective.conspo.temperature is not a hyperparameter of 'conspo'"):
        validate_config(c)


def test_every_objective_hyperparameter_has_a_rule():
    for name in list_objectives():
        missing = set(get_objective(name).defaults) - set(_HPARAM_RULES)
        assert not missing, f"objective {name!r}: add rules for {sorted(missing)} to validation._HPARAM_RULES"


# ------------------------------------------------------------------------------------------ model dir


def _write_checkpoint(d, *, truncate_by=0, garbage=False):
    os.makedirs(d, exist_ok=True)
    cfg = get_model_config("tiny-qwen2", vocab_size=64).to_hf()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    from safetensors.numpy import save_file

    path = os.path.join(d, "model.safetensors")
    save_file({"model.norm.weight": np.ones(96, np.float32)}, path)
    if truncate_by:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-truncate_by])
    if garbage:
        open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return path


def _model_case(kind, d):
    """Builds the broken model dir for ``kind``; returns the message words."""
    if kind == "missing dir":
        return "no such checkpoint directory"
    if kind == "empty dir":
        os.makedirs(d)
        return "has no config.json"
    if kind == "corrupt config.json":
        _write_checkpoint(d)
        open(os.path.join(d, "config.json"), "w").write('{"model_type": "qwen2", "vocab')
        return "config.json: not valid JSON"
    if kind == "config.json of another model":
        _write_checkpoint(d)
        open(os.path.join(d, "config.json"), "w").write('{"model_type": "gpt2"}')
        return "config.json: config.json model_type='gpt2' not supported"
    if kind == "truncated safetensors":
        path = _write_checkpoint(d, truncate_by=100)
        return f"{path}: truncated or corrupt: tensor 'model.norm.weight'"
    if kind == "garbage safetensors":
        path = _write_checkpoint(d, garbage=True)
        return f"{path}: not a safetensors file or truncated"
    if kind == "empty safetensors":
        path = _write_checkpoint(d)
        open(path, "wb").close()
        return f"{path}: not a safetensors file (0 bytes"
    if kind == "no safetensors":
        os.remove(_write_checkpoint(d))
        return "no *.safetensors files"
    if kind == "index names a missing shard":
        _write_checkpoint(d)
        index = {"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model-2.safetensors"}}
        json.dump(index, open(os.path.join(d, "model.safetensors.index.json"), "w"))
        return "lists 'model-2.safetensors', which does not exist"
    raise AssertionError(kind)


MODEL_CASES = [
    "missing dir",
    "empty dir",
    "corrupt config.json",
    "config.json of another model",
    "truncated safetensors",
    "garbage safetensors",
    "empty safetensors",
    "no safetensors",
    "index names a missing shard",
]


@pytest.mark.parametrize("kind", MODEL_CASES)
def test_bad_model_dirs_name_the_file(tmp_path, kind):
    d = str(tmp_path / "model")
    message = _model_case(kind, d)
    with pytest.raises(UsageError) as e:
        validate_config(smoke_config(**{"model.path": d}))
    assert_one_line(e.value, f"model.path={d!r}", message)


@pytest.mark.parametrize("kind", ["truncated safetensors", "garbage safetensors", "corrupt config.json"])
def test_loading_a_bad_checkpoint_names_the_file(tmp_path, kind):
    from conspo_jax.models.hf_io import load_hf_policy

    message = _model_case(kind, str(tmp_path / "model"))
    with pytest.raises(UsageError) as e:
        load_hf_policy(tmp_path / "model")
    assert_one_line(e.value, message)


def test_a_good_header_passes_and_random_init_reads_no_weights(tmp_path):
    good = str(tmp_path / "good")
    _write_checkpoint(good)
    validate_config(smoke_config(**{"model.path": good}))
    _write_checkpoint(str(tmp_path / "cut"), truncate_by=100)
    validate_config(smoke_config(**{"model.path": str(tmp_path / "cut"), "model.random_init": True}))


def test_tokenizer_dir_must_exist(tmp_path):
    with pytest.raises(UsageError) as e:
        validate_config(smoke_config(tokenizer=str(tmp_path / "nope")))
    assert_one_line(e.value, "tokenizer: no tokenizer directory", "nope")


# ------------------------------------------------------------------------------------------ data files

ROW = {"problem": "What is 1+1?", "answer": "2"}

DATA_CASES = [
    # (file name, contents, message words; {path} is the file)
    ("missing.jsonl", None, "no such data file: '{path}'"),
    ("empty.jsonl", "", "{path}: empty data file"),
    ("empty.json", "", "{path}: empty data file"),
    ("cut.jsonl", json.dumps(ROW) + "\n" + json.dumps(ROW)[:12], "{path} line 2: not valid JSON"),
    ("cut.json", json.dumps([ROW, ROW])[:30], "{path}: not valid JSON"),
    ("scalar.json", "5", "{path}: expected a JSON array of objects, got int"),
    ("scalars.jsonl", "5\n6\n", "{path} row 0: expected an object"),
    ("noanswer.jsonl", "\n".join(json.dumps(r) for r in (ROW, {"problem": "x"})), "{path} row 1: no answer field"),
    ("noproblem.jsonl", json.dumps({"answer": "1"}), "{path} row 0: no problem field"),
    ("badanswer.jsonl", json.dumps({"problem": "x", "answer": {"a": 1}}), "{path} row 0: field 'answer'"),
    ("data.txt", json.dumps(ROW), "{path}: unknown data file extension '.txt'"),
    ("bad.parquet", "not parquet", "{path}: not a readable parquet file"),
    ("tiny.jsonl", json.dumps(ROW), "rollout.prompts_per_step=8 exceeds the 1 training prompts"),
]


def _math_config(spec):
    return smoke_config(**{"task": "math", "data.train": spec, "eval.benchmarks": "", "tokenizer": "arith"})


@pytest.mark.parametrize("name, contents, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_name_the_file_row_and_field(tmp_path, name, contents, message):
    path = str(tmp_path / name)
    if contents is not None:
        open(path, "w").write(contents)
    with pytest.raises(UsageError) as e:
        validate_config(_math_config(path))
    assert_one_line(
        e.value, f"data.train={path!r}" if "prompts_per_step" not in message else "", message.format(path=path)
    )


def test_unknown_dataset_name_and_benchmark(tmp_path):
    with pytest.raises(UsageError) as e:
        validate_config(_math_config("nope"))
    assert_one_line(e.value, "data.train='nope'", "dataset 'nope' is neither a known name")
    good = tmp_path / "ok.jsonl"
    good.write_text("\n".join(json.dumps(ROW) for _ in range(8)))
    validate_config(_math_config(str(good)))
    c = _math_config(str(good))
    c.eval.benchmarks = "aime99"
    with pytest.raises(UsageError) as e:
        validate_config(c)
    assert_one_line(e.value, "eval.benchmarks: 'aime99'", "unknown benchmark 'aime99'")


def test_huge_integer_answers_load():
    from conspo_jax.data.files import read_rows

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"huge_{os.getpid()}.jsonl")
    try:
        open(path, "w").write('{"problem": "p", "answer": ' + "7" * 5000 + "}\n")
        assert read_rows(path)[0]["answer"] == "7" * 5000
    finally:
        os.remove(path)


# ------------------------------------------------------------------------------------------ config modules

MODULE_CASES = [
    # (module source or None for a missing file, :arg, message words; {path} is the module)
    ("raise RuntimeError('boom')\n", "", "--config: {path} failed to import: RuntimeError: boom"),
    ("def get_config(arg=None:\n    pass\n", "", "--config: {path}: syntax error at line 1"),
    ("def get_config(arg=None):\n    return None\n", "", "--config: {path}:get_config() returned NoneType"),
    ("def get_config(arg=None):\n    return 1 / 0\n", "", "get_config() failed: ZeroDivisionError: division by zero"),
    ("x = 1\n", "", "defines no get_config(arg)"),
    (None, "", "--config: no such config file '{path}'"),
    (
        "from conspo_jax.train.config_base import base_config\n\ndef get_config(arg=None):\n"
        "    if arg:\n        raise ValueError(f'unknown argument {arg!r}')\n    return base_config()\n",
        "bogus",
        "--config: {path}:get_config('bogus') failed: ValueError: unknown argument 'bogus'",
    ),
]


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize(
    "source, arg, message", MODULE_CASES, ids=[c[2].split("{path}")[-1][:30] for c in MODULE_CASES]
)
def test_bad_config_modules_are_one_line_and_exit_2(tmp_path, capsys, source, arg, message):
    path = str(tmp_path / "cfg.py")
    if source is not None:
        open(path, "w").write(source)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0}')
    before = _snapshot(workdir)
    spec = f"{path}:{arg}" if arg else path
    code = cli_main(["conspo", "train", "--config", spec, "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert message.format(path=path) in err[0], err[0]
    assert _snapshot(workdir) == before, "an existing run dir must be left byte-for-byte unchanged"
    with pytest.raises(UsageError):
        load_config_module(spec)


def test_the_shipped_modules_reject_an_unknown_arg_in_one_line(capsys):
    code = cli_main(["conspo", "train", "--config", ARITH + ":bogus", "--workdir", "/nonexistent/never"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "arith_tiny.py:get_config('bogus') failed" in err[0], err


# ------------------------------------------------------------------------------------------ API boundaries


def _inputs(rewards):
    R, C = len(rewards), 3
    logp = -jnp.ones((R, C)) * 0.5
    return ObjectiveInputs(
        token_logp=logp,
        old_logp=logp,
        ref_logp=logp,
        mask=jnp.ones((R, C)),
        rewards=jnp.asarray(rewards, jnp.float32),
        group_ids=jnp.asarray([0, 0, 1, 1], jnp.int32),
    )


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_rewards_are_one_error_for_every_objective(bad):
    rewards = [1.0, 0.0, bad, 1.0]
    with pytest.raises(ValueError, match=rf"rewards\[2\] = {bad!r} is not finite"):
        check_rewards(np.asarray(rewards))
    for name in list_objectives():
        with pytest.raises(ValueError, match=r"rewards\[2\] = .* is not finite") as e:
            get_objective(name)(_inputs(rewards), num_groups=2, progress=0.5)
        assert_one_line(e.value, "rewards[2]")


def test_padding_rows_may_hold_anything_and_traced_rewards_pass():
    check_rewards(np.array([1.0, 0.0, NAN]), np.array([1, 1, 0]))
    check_rewards(np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="rewards must be real numbers"):
        check_rewards(np.array(["a"]))
    jax.jit(lambda r: check_rewards(r) or r)(jnp.array([NAN]))  # traced: nothing to raise, by design


SAMPLING_CASES = [
    ({"temperature": NAN}, "SamplingParams.temperature must be finite, got nan"),
    ({"temperature": INF}, "SamplingParams.temperature must be finite, got inf"),
    ({"top_p": NAN}, "SamplingParams.top_p must be finite, got nan"),
    ({"top_p": 0.0}, "SamplingParams.top_p must be in (0, 1], got 0.0"),
    ({"top_k": -1}, "SamplingParams.top_k must be >= 0, got -1"),
    ({"n": 0}, "SamplingParams.n must be >= 1, got 0"),
    ({"max_new_tokens": 0}, "SamplingParams.max_new_tokens must be >= 1, got 0"),
    ({"seed": -1}, "SamplingParams.seed must be >= 0, got -1"),
    ({"n": True}, "SamplingParams.n must be an integer, got True"),
]


@pytest.mark.parametrize("kwargs, message", SAMPLING_CASES, ids=[str(c[0]) for c in SAMPLING_CASES])
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert_one_line(e.value, message)


@pytest.mark.parametrize("progress", [NAN, INF, np.float32(NAN)], ids=["nan", "inf", "np.float32 nan"])
def test_non_finite_progress_is_rejected(progress):
    with pytest.raises(ValueError, match="progress must be a finite number"):
        margin_schedule(progress, max_margin=0.01, warmup_ratio=0.3)
    with pytest.raises(ValueError, match="progress must be a finite number"):
        get_objective("conspo")(_inputs([1.0, 0.0, 1.0, 0.0]), num_groups=2, progress=progress)


def test_traced_progress_propagates_nan_as_documented():
    m = jax.jit(lambda p: margin_schedule(p, max_margin=0.01, warmup_ratio=0.3))
    assert math.isnan(float(m(jnp.float32(NAN))))
    assert float(m(jnp.float32(2.0))) == pytest.approx(0.01)  # finite values outside [0, 1] are clamped


def test_safetensors_header_length_past_the_file_end(tmp_path):
    from conspo_jax.models.safetensors_io import read_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(UsageError, match="header length 1099511627776, file size 10 bytes"):
        read_header(str(path))


def test_eval_of_a_truncated_hf_checkpoint_is_one_line(tmp_path, capsys):
    d = str(tmp_path / "hf")
    path = _write_checkpoint(d, truncate_by=100)
    code = cli_main(["conspo", "eval", "--config", ARITH + ":smoke", "--hf", d, "--workdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{path}: truncated or corrupt" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- trainer and eval cases through the CLI ----------------------------------------------------


def _one_line_exit_2(capsys, argv):
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_a_workdir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_line_exit_2(
        capsys, ["conspo", "train", "--config", ARITH + ":smoke", "--workdir", str(tmp_path / "file" / "run")]
    )
    assert "--workdir" in line and "file" in line, line


def test_a_bad_value_leaves_an_existing_run_unchanged(tmp_path, capsys):
    """Validation runs before anything is written: the run's config.json is not overwritten."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "config.json").write_text('{"seed": 0}')
    before = _snapshot(workdir)
    line = _one_line_exit_2(
        capsys,
        ["conspo", "train", "--config", ARITH + ":smoke", "--workdir", str(workdir), "--config.train.ckpt_every=0"],
    )
    assert "train.ckpt_every" in line and "0" in line, line
    assert _snapshot(workdir) == before


def test_eval_of_a_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    from flax import nnx

    from conspo_jax.run import build
    from conspo_jax.train.checkpoint import Checkpointer
    from conspo_jax.train.step import init_train_state, make_optimizer

    c = load_config_module(ARITH + ":smoke")
    c.model.overrides.hidden_size = 48  # not the smoke model's 96
    c.model.overrides.head_dim = 12
    tok = build.build_tokenizer(c)
    _, params, _ = nnx.split(build.build_policy(c, tok, None, seed=0), nnx.Param, ...)
    state = init_train_state(params, make_optimizer(**c.optim), jax.random.key(0), build.build_mesh(c))
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    ckpt.save(1, state, {}, {"step": 1})
    ckpt.close()
    line = _one_line_exit_2(
        capsys,
        [
            "conspo",
            "eval",
            "--config",
            ARITH + ":smoke",
            "--checkpoint",
            str(tmp_path / "run"),
            "--benchmarks",
            "math500",
            "--workdir",
            str(tmp_path / "out"),
        ],
    )
    assert "--checkpoint" in line and "does not hold this config's model" in line, line
