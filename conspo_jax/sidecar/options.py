"""The sidecar server's knobs (``SidecarOptions``) and how a config fills them (``options_from_config``)."""

from __future__ import annotations

import dataclasses
import os

from conspo_jax.rollout.wire import DEFAULT_MAX_MESSAGE_BYTES, TOKEN_ENV


@dataclasses.dataclass
class SidecarOptions:
    """Server knobs; ``serve_from_cli`` fills them from ``config.rollout.sidecar``."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    token: str | None = None
    weights_dir: str | None = None  # default: /dev/shm/conspo-weights-<uid>
    workers: int = 2  # verifier processes; 0 verifies in the serving thread (tests)
    chunk_prompts: int = 0  # prompts per engine call; 0 = all of a request in one call
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_n: int = 1024
    version_wait_s: float = 5.0  # how long a request waits for min_weight_version (a push in flight)
    verify_timeout_s: float = 300.0
    rpc_threads: int = 16
    allow_insecure_public: bool = False  # serve a non-loopback address without a token (anyone may push)


def options_from_config(config, *, port=None, host=None) -> SidecarOptions:
    """SidecarOptions from ``config.rollout.sidecar`` (the schema in conspo_jax/train/config_base.py).

    Host and port come from ``rollout.sidecar.address`` unless given; without a config (the mock
    engine), the defaults and a free port.
    """
    if config is None:
        return SidecarOptions(host=host or SidecarOptions.host, port=int(port or 0))
    sc = config.rollout.sidecar
    addr_host, _, addr_port = str(sc.address or "").rpartition(":")
    return SidecarOptions(
        host=host or addr_host or SidecarOptions.host,
        port=int(port if port is not None else addr_port or 0),
        token=sc.token or os.environ.get(TOKEN_ENV) or None,
        weights_dir=sc.weights_dir or None,
        workers=int(sc.workers),
        chunk_prompts=int(sc.chunk_prompts),
        max_message_bytes=int(sc.max_message_mb) << 20,
        version_wait_s=float(sc.version_wait_s),
    )
