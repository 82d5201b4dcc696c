"""The sidecar refuses what it must (wrong token, paths outside the weights dir, oversize messages,
malformed requests) with a clear gRPC status, and keeps serving afterwards."""

import os

import grpc
import pytest

from conspo_jax.rollout.engine import SamplingParams
from conspo_jax.rollout.sidecar_client import SidecarClient, SidecarError
from conspo_jax.rollout.wire import rollout_pb2 as pb
from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc
from conspo_jax.sidecar.engines import build_engine
from conspo_jax.sidecar.options import SidecarOptions
from conspo_jax.sidecar.server import serve

TOKEN = "correct-horse-battery-staple"
PARAMS = SamplingParams(n=2, max_new_tokens=4)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    wd = tmp_path_factory.mktemp("weights")
    (wd / "v000001").mkdir()
    srv = serve(
        handle=build_engine("mock"),
        options=SidecarOptions(
            weights_dir=str(wd), workers=0, token=TOKEN, max_message_bytes=1 << 20, version_wait_s=0.0
        ),
    )
    yield srv, wd
    srv.stop(grace=0)


def assert_still_serving(srv):
    with SidecarClient(srv.target, token=TOKEN) as ok:
        assert ok.health(timeout=5).status == "SERVING"
        assert ok.generate([[5, 6]], PARAMS).num_rows == 2


def test_wrong_or_missing_token_is_refused(sidecar):
    srv, _ = sidecar
    for token in ("wrong", None, TOKEN + "x"):
        with SidecarClient(srv.target, token=token, max_retries=3) as bad:
            with pytest.raises(grpc.RpcError) as e:
                bad.health(timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(SidecarError, match="UNAUTHENTICATED") as e:
                bad.generate([[5, 6]], PARAMS)
            assert bad.stats["retries"] == 0  # a refusal is final, not retried
            with pytest.raises(SidecarError, match="UNAUTHENTICATED"):
                bad.push_weights("v000001", 1)
    assert_still_serving(srv)


def test_push_paths_must_stay_inside_the_weights_dir(sidecar, tmp_path):
    srv, wd = sidecar
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, wd / "escape")
    with SidecarClient(srv.target, token=TOKEN, max_retries=0) as client:
        for path in (str(outside), "../outside", str(wd / "escape"), "v000001/../../outside", str(wd)):
            with pytest.raises(SidecarError, match="outside the weights dir") as e:
                client.push_weights(path, 7)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED, path
        with pytest.raises(SidecarError, match="not a directory") as e:
            client.push_weights("v000099", 7)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(SidecarError, match="version must be >= 0"):
            client.push_weights("v000001", -1)
        assert client.health().weight_version == 0  # nothing was loaded
        assert client.push_weights(str(wd / "v000001"), 1) >= 0  # an absolute path inside is fine
        assert client.push_weights("v000001", 1) >= 0  # and so is one relative to the weights dir
    assert_still_serving(srv)


def test_oversize_message_is_refused(sidecar):
    srv, _ = sidecar
    # ~2 MB on the wire (3-byte varints) against the server's 1 MiB limit; the client allows 8 MiB.
    huge = [[70000] * 700_000]
    with SidecarClient(srv.target, token=TOKEN, max_message_bytes=8 << 20, max_retries=2) as client:
        with pytest.raises(SidecarError, match="RESOURCE_EXHAUSTED") as e:
            client.generate(huge, PARAMS)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and client.stats["retries"] == 0
    assert_still_serving(srv)


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (lambda r: r.ClearField("prompts"), "INVALID_ARGUMENT", "prompts is empty"),
        (lambda r: setattr(r, "n", 0), "INVALID_ARGUMENT", "n must be in [1, 1024], got 0"),
        (lambda r: r.prompts.add(prompt_id="a", token_ids=[4]), "INVALID_ARGUMENT", "prompt_id='a' is duplicated"),
        (lambda r: r.prompts.add(prompt_id="b"), "INVALID_ARGUMENT", "token_ids is empty"),
        (lambda r: r.prompts.add(prompt_id="b", token_ids=[-3]), "INVALID_ARGUMENT", "negative token id -3"),
        (lambda r: setattr(r.sampling, "top_p", 0.0), "INVALID_ARGUMENT", "top_p must be in (0, 1], got 0.0"),
        (lambda r: setattr(r.sampling, "max_new_tokens", 0), "INVALID_ARGUMENT", "max_new_tokens must be >= 1, got 0"),
        (lambda r: setattr(r, "verifier", "nope"), "INVALID_ARGUMENT", "unknown verifier 'nope'"),
        (lambda r: setattr(r, "min_weight_version", 99), "FAILED_PRECONDITION", "min_weight_version=99"),
    ],
)
def test_bad_requests_get_a_clear_status(sidecar, mutate, code, message):
    srv, _ = sidecar
    request = pb.StreamRolloutsRequest(
        prompts=[pb.Prompt(prompt_id="a", token_ids=[4, 5])],
        n=2,
        sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
    )
    mutate(request)
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamRollouts(request, timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)))
    assert e.value.code().name == code and message in e.value.details(), e.value.details()
    assert_still_serving(srv)


def _listening_addresses(port):
    """(ip_hex, port) of the LISTEN sockets on ``port`` from /proc/net/tcp{,6}."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in open(name).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.append(ip)
    return found


def test_default_bind_is_loopback_only(tmp_path):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp to inspect listening sockets")
    srv = serve(handle=build_engine("mock"), options=SidecarOptions(weights_dir=str(tmp_path), workers=0))
    try:
        addrs = _listening_addresses(srv.port)
        # 127.0.0.1 as an IPv4 socket or as IPv4-mapped IPv6 (::ffff:127.0.0.1); never a wildcard.
        loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
        assert addrs and set(addrs) <= loopback, addrs
    finally:
        srv.stop(grace=0)
