"""How the trainer's config (``rollout.sidecar``) reaches the sidecar server and the client."""

import pytest

from conspo_jax.rollout.sidecar_client import SidecarClient
from conspo_jax.sidecar.engines import build_engine
from conspo_jax.sidecar.options import SidecarOptions, options_from_config
from conspo_jax.sidecar.server import serve
from conspo_jax.train.config_base import base_config


def test_server_options_from_config(monkeypatch):
    c = base_config()
    c.rollout.sidecar.address = "127.0.0.1:6123"
    c.rollout.sidecar.weights_dir = "/dev/shm/somewhere"
    monkeypatch.delenv("CONSPO_SIDECAR_TOKEN", raising=False)
    o = options_from_config(c)
    assert (o.host, o.port, o.token, o.weights_dir) == ("127.0.0.1", 6123, None, "/dev/shm/somewhere")
    assert options_from_config(c, port=7000, host="::1").port == 7000
    monkeypatch.setenv("CONSPO_SIDECAR_TOKEN", "from-env")
    assert options_from_config(c).token == "from-env"
    c.rollout.sidecar.token = "from-config"
    assert options_from_config(c).token == "from-config"
    assert options_from_config(None).port == 0  # no config: defaults, a free port


def test_client_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSPO_SIDECAR_TOKEN", "tok")
    srv = serve(handle=build_engine("mock"), options=SidecarOptions(weights_dir=str(tmp_path), workers=0, token="tok"))
    try:
        c = base_config()
        c.task = "arith"
        c.rollout.sidecar.address = srv.target
        c.rollout.sidecar.weights_dir = str(tmp_path)
        c.rollout.sidecar.verifier = ""
        c.rollout.sidecar.max_staleness = 2
        client = SidecarClient.from_config(c)
        assert client.verifier == "arith"  # empty verifier: the task's own
        assert client.staleness == 2 and client.weights.root == str(tmp_path)
        assert client.health().engine == "mock"  # the env token was used
        client.close()
        c.rollout.sidecar.address = "127.0.0.1:1"  # nothing listens there
        c.rollout.sidecar.deadline_s = 0.5
        with pytest.raises(Exception, match="not ready"):
            SidecarClient.from_config(c)
    finally:
        srv.stop(grace=0)
