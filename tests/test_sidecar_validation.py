"""The sidecar refuses garbage requests with INVALID_ARGUMENT naming the field and value (NaN sampling
parameters, token ids outside the vocabulary, prompts over the engine's limits), refuses an
unauthenticated public bind, and says in one line that a port is taken."""

import math
import socket

import grpc
import pytest

from conspo_jax.base.configs import UsageError
from conspo_jax.rollout.engine import SamplingParams
from conspo_jax.rollout.sidecar_client import SidecarClient
from conspo_jax.rollout.wire import rollout_pb2 as pb
from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc
from conspo_jax.sidecar.__main__ import main as sidecar_main
from conspo_jax.sidecar.engines import build_engine
from conspo_jax.sidecar.options import SidecarOptions
from conspo_jax.sidecar.server import is_loopback, serve

VOCAB, MAX_PROMPT = 64, 8


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    handle = build_engine("mock", vocab_size=VOCAB, max_prompt_len=MAX_PROMPT)
    handle.max_total_len = 12
    srv = serve(handle=handle, options=SidecarOptions(weights_dir=str(tmp_path_factory.mktemp("w")), workers=0))
    yield srv
    srv.stop(grace=0)


def _request(**sampling):
    s = dict(temperature=1.0, top_p=1.0, max_new_tokens=4)
    s.update(sampling)
    return pb.StreamRolloutsRequest(
        prompts=[pb.Prompt(prompt_id="a", token_ids=[4, 5])], n=2, sampling=pb.SamplingParams(**s)
    )


def _with_prompt(token_ids):
    r = _request()
    r.prompts.add(prompt_id="b", token_ids=token_ids)
    return r


CASES = [
    (_request(temperature=math.nan), "temperature must be finite, got nan"),
    (_request(temperature=math.inf), "temperature must be finite, got inf"),
    (_request(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (_request(top_p=math.nan), "top_p must be finite, got nan"),
    (_request(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (_request(top_k=-3), "top_k must be >= 0, got -3"),
    (_request(seed=-1), "seed must be >= 0, got -1"),
    (_request(stop_token_ids=[VOCAB]), f"stop_token_ids: token id {VOCAB} >= the vocabulary size {VOCAB}"),
    (_with_prompt([3, VOCAB + 5]), f"prompts[1] (prompt_id='b'): token id {VOCAB + 5} >= the vocabulary size {VOCAB}"),
    (_with_prompt([3] * (MAX_PROMPT + 1)), f"{MAX_PROMPT + 1} token_ids > the engine's max prompt length {MAX_PROMPT}"),
    (_request(max_new_tokens=11), "2 token_ids + sampling.max_new_tokens=11 > the engine's 12 positions"),
]


@pytest.mark.parametrize("request_, message", CASES, ids=[c[1][:40] for c in CASES])
def test_garbage_requests_are_invalid_argument(sidecar, request_, message):
    with grpc.insecure_channel(sidecar.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.RolloutServiceStub(channel).StreamRollouts(request_, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert message in e.value.details(), e.value.details()
    with SidecarClient(sidecar.target) as ok:  # and the server keeps serving
        ro = ok.generate([[5, 6]], SamplingParams(n=2, max_new_tokens=4))
        assert ro.num_rows == 2 and ro.completion_ids_RxC.max() < VOCAB


def test_limits_at_the_boundary_are_served(sidecar):
    with SidecarClient(sidecar.target) as client:
        ro = client.generate([[VOCAB - 1] * MAX_PROMPT], SamplingParams(n=1, max_new_tokens=4, stop_token_ids=(63,)))
        assert ro.num_rows == 1


def test_nan_sampling_params_are_rejected_in_the_dataclass():
    for field in ("temperature", "top_p"):
        with pytest.raises(ValueError, match=f"SamplingParams.{field} must be finite, got nan"):
            SamplingParams(**{field: math.nan})
    with pytest.raises(ValueError, match="SamplingParams.max_new_tokens must be an integer, got 2.5"):
        SamplingParams(max_new_tokens=2.5)
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids >= 0, got \(-1,\)"):
        SamplingParams(stop_token_ids=(-1,))


def test_loopback_detection():
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_public_bind_without_a_token_is_refused_unless_allowed(tmp_path):
    opts = SidecarOptions(host="0.0.0.0", weights_dir=str(tmp_path), workers=0)
    with pytest.raises(UsageError, match="refusing to serve '0.0.0.0'.*without a token.*--allow-insecure-public"):
        serve(handle=build_engine("mock"), options=opts)
    opts.allow_insecure_public = True
    srv = serve(handle=build_engine("mock"), options=opts)
    try:
        with SidecarClient(f"127.0.0.1:{srv.port}") as client:
            assert client.health(timeout=5).status == "SERVING"
    finally:
        srv.stop(grace=0)
    with_token = SidecarOptions(host="0.0.0.0", weights_dir=str(tmp_path), workers=0, token="t")
    serve(handle=build_engine("mock"), options=with_token).stop(grace=0)  # a token makes it fine


def test_port_in_use_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CONSPO_SIDECAR_TOKEN", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is already in use"):
            serve(handle=build_engine("mock"), port=port, options=SidecarOptions(weights_dir=str(tmp_path), workers=0))
        code = sidecar_main(["--engine", "mock", "--port", str(port), "--weights-dir", str(tmp_path), "--workers", "0"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"port {port} on 127.0.0.1 is already in use" in err[0], err
    code = sidecar_main(["--engine", "mock", "--host", "0.0.0.0", "--weights-dir", str(tmp_path), "--workers", "0"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refusing to serve '0.0.0.0'" in err[0] and "without a token" in err[0], err
