"""Bad input ends with one clear line naming the key or value, exit code 2 and no traceback."""

import os
import subprocess
import sys

import pytest

from conspo_jax.cli import main

ARITH = "experiments/arith_tiny.py:smoke"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *args):
    code = main(["conspo", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.rollout.nope=3"],
            "unknown config key 'rollout.nope'",
        ),
        (["train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.rollout.n=abc"], "--config.rollout.n=abc"),
        (["train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.objective.name=ppo"], "objective.name"),
        (
            ["train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.rollout.n=0"],
            "rollout.n must be >= 2, got 0",
        ),
        (["train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.rollout.n=-2"], "got -2"),
        (
            ["train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.model.path=/no/such/ckpt"],
            "model.path='/no/such/ckpt': no such checkpoint directory",
        ),
        (
            [
                "train",
                "--config=experiments/r1_distill_qwen_1p5b.py",
                "--workdir=/tmp/x",
                "--config.data.train=/no/such.json",
            ],
            "no such",
        ),
        (
            ["train", "--config=experiments/missing.py", "--workdir=/tmp/x"],
            "no such config file 'experiments/missing.py'",
        ),
        (["train", f"--config={ARITH}"], "--workdir is required"),
        (["train", f"--config={ARITH}", "--workdir=/tmp/x", "--bogus=1"], "bogus"),
        (["eval", f"--config={ARITH}"], "exactly one of --checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    code, err = _run(capsys, *args)
    assert code == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_command(capsys):
    code, err = _run(capsys, "fly")
    assert code == 2 and "unknown command 'fly'" in err


def test_console_entry_point_exit_code_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "conspo_jax", "train", f"--config={ARITH}", "--workdir=/tmp/x", "--config.rollout.n=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "rollout.n" in proc.stderr
