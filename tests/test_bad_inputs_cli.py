"""Issue 14's "Why" list, case by case, through the real command line: ``conspo train`` run in an existing,
finished run directory with one bad value, model directory or data file. Every case must exit 2 with one
stderr line naming the key, the value or the file, print no traceback, and leave the run directory
byte-for-byte unchanged (the old CLI wrote config.json before its checks).

tests/test_bad_inputs.py holds the wider tables at the API level (``validate_config``) and the config
module, workdir and eval cases through the CLI; tests/test_sidecar_validation.py the sidecar's.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from conspo_jax.base.configs import config_to_json, load_config_module
from conspo_jax.cli import main as cli_main
from conspo_jax.models.config import get_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"
ROW = {"problem": "What is 1+1?", "answer": "2"}

# (id, extra argv, words the stderr line must contain). "Accepted silently", "traceback only after the
# warm start" and "tracebacks" items of the issue, in its order.
VALUE_CASES = [
    ("negative lr", ["--config.optim.lr=-0.001"], ["optim.lr", "-0.001"]),
    ("rollout.n=1", ["--config.rollout.n=1"], ["rollout.n", "got 1"]),
    ("sft.batch_size=0", ["--config.sft.batch_size=0"], ["sft.batch_size", "got 0"]),
    ("rollout.top_p=0", ["--config.rollout.top_p=0"], ["rollout.top_p", "got 0.0"]),
    ("rollout.top_p=1.5", ["--config.rollout.top_p=1.5"], ["rollout.top_p", "got 1.5"]),
    ("rollout.temperature=-0.5", ["--config.rollout.temperature=-0.5"], ["rollout.temperature", "got -0.5"]),
    ("rollout.top_k=-3", ["--config.rollout.top_k=-3"], ["rollout.top_k", "got -3"]),
    ("eval.top_p=0", ["--config.eval.top_p=0"], ["eval.top_p", "got 0.0"]),
    ("train.ckpt_every=0", ["--config.train.ckpt_every=0"], ["train.ckpt_every", "got 0"]),
    ("train.num_steps=-5", ["--config.train.num_steps=-5"], ["train.num_steps", "got -5"]),
    ("objective.conspo.tau=0", ["--config.objective.conspo.tau=0"], ["objective.conspo.tau", "got 0.0"]),
    ("rollout.temperature=nan", ["--config.rollout.temperature=nan"], ["rollout.temperature", "got nan"]),
]


def _checkpoint(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(get_model_config("tiny-qwen2", vocab_size=64).to_hf(), f)
    from safetensors.numpy import save_file

    path = os.path.join(d, "model.safetensors")
    save_file({"model.norm.weight": np.ones(96, np.float32)}, path)
    return path


def _empty_dir(d):
    os.makedirs(d)
    return "has no config.json"


def _corrupt_config(d):
    _checkpoint(d)
    open(os.path.join(d, "config.json"), "w").write('{"model_type": "qwen2", "vocab')
    return os.path.join(d, "config.json")


def _truncated(d):
    path = _checkpoint(d)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    return path


def _garbage(d):
    path = _checkpoint(d)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return path


MODEL_CASES = {"empty model dir": _empty_dir, "corrupt config.json": _corrupt_config}
MODEL_CASES.update({"truncated safetensors": _truncated, "garbage safetensors": _garbage})

DATA_CASES = [
    # (id, file name or dataset name, contents (None: not a file), extra words)
    ("empty data file", "empty.jsonl", "", "empty data file"),
    ("truncated JSON", "cut.json", json.dumps([ROW, ROW])[:30], "not valid JSON"),
    ("truncated JSONL", "cut.jsonl", json.dumps(ROW) + "\n" + json.dumps(ROW)[:12], "line 2: not valid JSON"),
    ("missing answer field", "noanswer.jsonl", json.dumps(ROW) + "\n" + json.dumps({"problem": "x"}), "no answer"),
    ("unknown extension", "data.txt", json.dumps(ROW), "unknown data file extension '.txt'"),
    ("unknown dataset name", "no_such_set", None, "dataset 'no_such_set' is neither a known name"),
]


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def finished_run(tmp_path):
    """A run directory as a finished run of SMOKE leaves it (the files the CLI must not touch). Its
    config.json is the real one, so the bad value is the only difference and a resume check that ran
    before validation would name a key diff ("a -> b"), not the range the needles ask for."""
    wd = tmp_path / "run"
    (wd / "checkpoints" / "4").mkdir(parents=True)
    (wd / "checkpoints" / "4" / "state").write_bytes(os.urandom(256))
    (wd / "hf").mkdir()
    (wd / "hf" / "model.safetensors").write_bytes(os.urandom(128))
    (wd / "config.json").write_text(config_to_json(load_config_module(SMOKE)))
    (wd / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in range(5)))
    (wd / "results.json").write_text(json.dumps({"eval/accuracy_after": 0.5}))
    return wd


def _run_bad(capsys, workdir, extra):
    before = _snapshot(workdir)
    code = cli_main(["conspo", "train", "--config", SMOKE, "--workdir", str(workdir), *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, lines)
    assert _snapshot(workdir) == before, "the existing run directory changed"
    return lines[0]


@pytest.mark.parametrize("extra, needles", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_values_exit_2_in_one_line_and_touch_nothing(finished_run, capsys, extra, needles):
    line = _run_bad(capsys, finished_run, extra)
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("kind", list(MODEL_CASES))
def test_bad_model_dirs_exit_2_naming_the_file(finished_run, tmp_path, capsys, kind):
    d = str(tmp_path / "model")
    needle = MODEL_CASES[kind](d)
    line = _run_bad(capsys, finished_run, [f"--config.model.path={d}"])
    assert "model.path" in line and needle in line, line


@pytest.mark.parametrize("name, contents, needle", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_exit_2_naming_the_file(finished_run, tmp_path, capsys, name, contents, needle):
    spec = name
    if contents is not None:
        spec = str(tmp_path / name)
        open(spec, "w").write(contents)
    math_task = ["--config.task=math", "--config.tokenizer=arith", "--config.eval.benchmarks="]
    line = _run_bad(capsys, finished_run, [*math_task, f"--config.data.train={spec}"])
    assert f"data.train={spec!r}" in line and needle in line, line


def test_resuming_with_another_objective_names_the_key(finished_run, capsys):
    line = _run_bad(capsys, finished_run, ["--config.objective.name=grpo"])
    assert "objective.name: 'conspo' -> 'grpo'" in line and "--allow_config_change" in line, line
