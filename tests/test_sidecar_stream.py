"""Streaming, verification and exactly-once delivery of the rollout sidecar (mock engine, loopback only).

The mock engine's sample k of prompt p is ``reversed(p) + [EOS]`` for even k and ``[2, EOS]`` for odd
k; with the 'exact' verifier and answer = the reversed prompt as text, even samples score 1 and odd
ones 0, so every check below can tell whose group a reward belongs to.
"""

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from conspo_jax.rollout.engine import SamplingParams
from conspo_jax.rollout.sidecar_client import SidecarClient, SidecarError
from conspo_jax.sidecar import verifiers
from conspo_jax.sidecar.engines import build_engine
from conspo_jax.sidecar.options import SidecarOptions
from conspo_jax.sidecar.server import serve
from conspo_jax.sidecar.servicer import SidecarServicer

PARAMS = SamplingParams(n=4, max_new_tokens=16, seed=3)


def worker_pid(response, answer):
    """A verifier that reports which process ran it (module-level so a spawned worker can import it)."""
    return float(os.getpid())


def make_prompts(num, offset=0):
    prompts = [[10 + (i + offset) % 50, 3 + i % 5, 7] for i in range(num)]
    answers = [" ".join(map(str, [*reversed(p), 1])) for p in prompts]
    return prompts, answers


def check_rollouts(ro, prompts, n=PARAMS.n):
    """Rows are prompt-major, each row's tokens and reward belong to its own prompt."""
    assert ro.num_rows == len(prompts) * n
    np.testing.assert_array_equal(ro.group_ids_R, np.repeat(np.arange(len(prompts)), n))
    comps = ro.completions()
    for r, g in enumerate(ro.group_ids_R):
        k = r % n
        want = [*reversed(prompts[g]), 1] if k % 2 == 0 else [2, 1]
        assert comps[r] == want, (r, comps[r], want)
        if ro.rewards_R is not None:
            assert ro.rewards_R[r] == (1.0 if k % 2 == 0 else 0.0)
    assert ro.finish_reasons == ["stop"] * ro.num_rows


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("weights"))
    srv = serve(handle=build_engine("mock", delay_s=0.0), options=SidecarOptions(weights_dir=wd, workers=0))
    yield srv
    srv.stop(grace=0)


def test_generate_returns_verified_prompt_major_rollouts(sidecar):
    prompts, answers = make_prompts(6)
    with SidecarClient(sidecar.target, verifier="exact") as client:
        ro = client.generate(prompts, PARAMS, answers=answers)
        check_rollouts(ro, prompts)
        assert ro.rewards_R.dtype == np.float32
        np.testing.assert_allclose(ro.logprobs_RxC[ro.completion_mask_RxC()], -1.0)  # the mock's log-probs
        # Without answers the sidecar does not verify and the trainer scores the rows itself.
        assert client.generate(prompts, PARAMS).rewards_R is None
        with pytest.raises(ValueError, match="4 answers for 6 prompts"):
            client.generate(prompts, PARAMS, answers=answers[:4])
    with SidecarClient(sidecar.target) as plain, pytest.raises(ValueError, match="no verifier"):
        plain.generate(prompts, PARAMS, answers=answers)


def test_verification_runs_in_worker_processes(tmp_path):
    verifiers.register("test-pid", worker_pid)
    srv = serve(handle=build_engine("mock"), options=SidecarOptions(weights_dir=str(tmp_path), workers=1))
    try:
        with SidecarClient(srv.target, verifier="test-pid") as client:
            prompts, answers = make_prompts(3)
            ro = client.generate(prompts, PARAMS, answers=answers)
        pids = set(ro.rewards_R.tolist())
        assert len(pids) == 1 and pids != {float(os.getpid())} and min(pids) > 0
    finally:
        srv.stop(grace=0)


def test_groups_stream_before_the_batch_is_done(tmp_path):
    """With one prompt per engine call, the first group arrives long before the last is generated."""
    srv = serve(
        handle=build_engine("mock", delay_s=0.1),
        options=SidecarOptions(weights_dir=str(tmp_path), workers=0, chunk_prompts=1),
    )
    arrivals = []
    try:
        with SidecarClient(
            srv.target, verifier="exact", on_group=lambda pid, g: arrivals.append(time.monotonic())
        ) as c:
            prompts, answers = make_prompts(6)
            t0 = time.monotonic()
            check_rollouts(c.generate(prompts, PARAMS, answers=answers), prompts)
    finally:
        srv.stop(grace=0)
    assert len(arrivals) == 6
    assert arrivals[0] - t0 < 0.5 * (arrivals[-1] - t0), [a - t0 for a in arrivals]


class _FlakyServicer(SidecarServicer):
    """First call: two groups, a duplicate of the first, then the connection 'breaks' (UNAVAILABLE)."""

    calls = 0

    def StreamRollouts(self, request, context):
        type(self).calls += 1
        if type(self).calls > 1:
            yield from super().StreamRollouts(request, context)
            return
        groups = list(super().StreamRollouts(request, context))
        yield groups[0]
        yield groups[1]
        yield groups[0]
        context.abort(grpc.StatusCode.UNAVAILABLE, "simulated broken stream")


def test_exactly_once_across_duplicates_and_a_broken_stream(tmp_path):
    import concurrent.futures as cf

    from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc

    servicer = _FlakyServicer(build_engine("mock"), SidecarOptions(weights_dir=str(tmp_path), workers=0))
    server = grpc.server(cf.ThreadPoolExecutor(4))
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    seen = []
    try:
        with SidecarClient(
            f"127.0.0.1:{port}", verifier="exact", backoff_s=0.01, on_group=lambda pid, g: seen.append(pid)
        ) as client:
            prompts, answers = make_prompts(6)
            ro = client.generate(prompts, PARAMS, answers=answers, prompt_ids=[f"q{i}" for i in range(6)])
            check_rollouts(ro, prompts)
            assert sorted(seen) == sorted(f"q{i}" for i in range(6)) and len(seen) == 6
            assert client.stats["duplicates_dropped"] == 1 and client.stats["retries"] == 1
            assert client.requested[0] == [f"q{i}" for i in range(6)]
            assert sorted(client.requested[1]) == sorted(set(client.requested[0]) - set(seen[:2]))
    finally:
        server.stop(0)


def test_staleness_bound_and_waiting_for_a_push(tmp_path):
    (tmp_path / "v000003").mkdir()
    srv = serve(
        handle=build_engine("mock"), options=SidecarOptions(weights_dir=str(tmp_path), workers=0, version_wait_s=0.3)
    )
    prompts, answers = make_prompts(2)
    try:
        with SidecarClient(srv.target, verifier="exact", max_retries=0) as client:
            with pytest.raises(SidecarError, match="min_weight_version=5") as e:
                client.generate(prompts, PARAMS, answers=answers, min_weight_version=5)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert client.push_weights(str(tmp_path / "v000003"), 3) >= 0
            assert client.version == 3
            assert client.generate(prompts, PARAMS, answers=answers).weight_version == 3
            assert client.health().weight_version == 3
        # A request that arrives before the push it needs waits for it (within version_wait_s).
        srv.servicer.opts.version_wait_s = 10.0
        (tmp_path / "v000004").mkdir()
        with SidecarClient(srv.target) as client, SidecarClient(srv.target) as pusher:
            timer = threading.Timer(0.3, pusher.push_weights, args=(str(tmp_path / "v000004"), 4))
            timer.start()
            ro = client.generate(prompts, PARAMS, min_weight_version=4)
            timer.join()
            assert ro.weight_version == 4
    finally:
        srv.stop(grace=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_sidecar(port, weights_dir):
    env = dict(os.environ, CONSPO_SIDECAR_TOKEN="s3cret", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conspo_jax.sidecar",
            "--engine",
            "mock",
            "--port",
            str(port),
            "--weights-dir",
            weights_dir,
            "--workers",
            "0",
            "--chunk-prompts",
            "1",
            "--mock-delay-s",
            "0.05",
            "--version-wait-s",
            "0.2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 60.0)  # never wait forever on a hung start
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("SIDECAR READY"):
        proc.kill()
        pytest.fail(f"sidecar did not start (exit code {proc.poll()}): {line!r}")
    return proc


def test_client_survives_a_sidecar_restart_mid_stream(tmp_path):
    """Kill the sidecar (SIGKILL) after 5 groups and start a new one on the same port: the client
    reconnects, re-pushes its weights (the new sidecar starts at version 0) and asks only for the
    prompts it has not consumed. No group is lost or duplicated."""
    port = _free_port()
    weights = str(tmp_path)
    os.mkdir(os.path.join(weights, "v000002"))
    procs = [_start_sidecar(port, weights)]
    seen = []

    def on_group(pid, group):
        seen.append(pid)
        if len(seen) == 5:
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait(timeout=10)
            procs.append(_start_sidecar(port, weights))

    try:
        with SidecarClient(
            f"127.0.0.1:{port}", token="s3cret", verifier="exact", backoff_s=0.05, deadline_s=60, on_group=on_group
        ) as client:
            client.push_weights(os.path.join(weights, "v000002"), 2)
            prompts, answers = make_prompts(16)
            ids = [f"p{i}" for i in range(16)]
            ro = client.generate(prompts, PARAMS, answers=answers, prompt_ids=ids)
            check_rollouts(ro, prompts)
            assert ro.weight_version == 2
            assert len(procs) == 2 and sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) == 16
            assert client.stats["repushes"] == 1
            resumed = [r for r in client.requested[1:] if r]
            assert set(resumed[-1]) == set(ids) - set(seen[:5])  # only what was missing, nothing consumed twice
            assert client.health().weight_version == 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
