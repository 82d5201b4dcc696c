"""Two processes x 2 CPU devices (jax.distributed on localhost) compute what one process x 4 devices does,
and a two-process run killed after a checkpoint resumes to the same end.

Ports are loopback ports chosen at run time; every wait is bounded (TIMEOUT_S)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config",
    os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke",
    # Enough warm start that some groups have both a correct and a wrong rollout (reward 3-9%), so every
    # RL step has a non-zero gradient and the parameters move; computed once (the one-process run) and
    # restored by the others from sft.cache_dir.
    "--config.sft.steps=200",
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


def _start(workdir, procs, *extra):
    cmd = [sys.executable, "-m", "conspo_jax", "train", *ARGS, "--workdir", workdir, *extra]
    if procs == 1:
        return [subprocess.Popen(cmd, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    port = _port()
    return [
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


def _wait(jobs):
    try:
        outs = [j.communicate(timeout=TIMEOUT_S)[0].decode() for j in jobs]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.kill()
    for j, out in zip(jobs, outs):
        assert j.returncode == 0, out[-3000:]


def _run(workdir, procs, *extra):
    _wait(_start(workdir, procs, *extra))


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory):
    return "--config.sft.cache_dir=" + str(tmp_path_factory.mktemp("sft"))


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
    worst = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    print(f"max |param diff| vs one process: {worst:.2e}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sft_cache):
    workdir = str(tmp_path_factory.mktemp("one"))
    _run(workdir, 1, sft_cache)
    rows = _rows(workdir)
    assert all(r["grad_norm"] > 0 for r in rows[1:]), "RL must move the parameters for the comparison to mean much"
    return workdir


def test_two_processes_equal_one(one_process, sft_cache, tmp_path):
    workdir = str(tmp_path / "two")
    _run(workdir, 2, sft_cache)
    _assert_same(one_process, workdir)
    assert len(_rows(workdir)) == 5  # eval at start + 4 steps, written once (by process 0)


def test_two_process_kill_and_resume_equals_uninterrupted(one_process, sft_cache, tmp_path):
    workdir = str(tmp_path / "resumed")
    jobs = _start(workdir, 2, sft_cache)
    ckpt = os.path.join(workdir, "checkpoints", "2")  # Orbax renames a step's directory when it is complete
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not os.path.isdir(ckpt) and time.monotonic() < deadline and all(j.poll() is None for j in jobs):
            time.sleep(0.05)
        assert os.path.isdir(ckpt), "no step-2 checkpoint: " + jobs[0].communicate(timeout=60)[0].decode()[-3000:]
    finally:
        for j in jobs:  # both processes die at once, mid-run
            if j.poll() is None:
                j.send_signal(signal.SIGKILL)
        for j in jobs:
            j.communicate(timeout=60)
    assert not os.path.exists(os.path.join(workdir, "hf")), "the run finished before it was killed"
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
    _run(workdir, 2, sft_cache)  # the same command again resumes from the step-2 checkpoint
    _assert_same(one_process, workdir)
