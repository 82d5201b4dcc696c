"""Two processes x 2 CPU devices (jax.distributed on localhost) compute what one process x 4 devices does,
and a two-process run stopped after a checkpoint resumes to the same end."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config",
    os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke",
    "--config.sft.steps=10",
    "--config.train.progress_bar=False",
]
TIMEOUT_S = 400  # every wait below is bounded


def _env(devices):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        XLA_FLAGS="--xla_backend_optimization_level=0",  # not conftest's 8 host devices
    )
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir, procs, *extra):
    cmd = [sys.executable, "-m", "conspo_jax", "train", *ARGS, "--workdir", workdir, *extra]
    if procs == 1:
        jobs = [subprocess.Popen(cmd, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    else:
        port = _port()
        jobs = [
            subprocess.Popen(
                cmd
                + [
                    f"--config.distributed.coordinator=127.0.0.1:{port}",
                    f"--config.distributed.num_processes={procs}",
                    f"--config.distributed.process_id={i}",
                    "--config.distributed.init_timeout_s=120",
                ],
                env=_env(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(procs)
        ]
    try:
        outs = [j.communicate(timeout=TIMEOUT_S)[0].decode() for j in jobs]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.kill()
    for j, out in zip(jobs, outs):
        assert j.returncode == 0, out[-3000:]


def _rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _params(workdir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(workdir, "hf", "model.safetensors"))


def _assert_same(a, b):
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert abs(x[k] - y[k]) <= 1e-5, (x["step"], k, x[k], y[k])
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one"))
    _run(workdir, 1)
    return workdir


def test_two_processes_equal_one(one_process, tmp_path):
    workdir = str(tmp_path / "two")
    _run(workdir, 2)
    _assert_same(one_process, workdir)
    assert len(_rows(workdir)) == 5  # eval at start + 4 steps, written once (by process 0)


def test_two_process_resume_equals_uninterrupted(one_process, tmp_path):
    workdir = str(tmp_path / "resumed")
    _run(workdir, 2, "--config.train.stop_after=2")  # both processes stop after the step-2 checkpoint
    assert _rows(workdir)[-1]["step"] == 2
    assert not os.path.exists(os.path.join(workdir, "hf"))
    _run(workdir, 2)
    _assert_same(one_process, workdir)
