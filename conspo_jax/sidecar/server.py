"""The rollout sidecar's gRPC server: ``serve`` builds the engine and starts the servicer
(conspo_jax/sidecar/servicer.py) behind its guards; ``serve_from_cli`` is ``conspo sidecar``.

Security: binds 127.0.0.1 unless told otherwise, and refuses a non-loopback address without a token
unless ``allow_insecure_public`` (``--allow-insecure-public``) says so; with a token, every call must
carry ``authorization: Bearer <token>`` (compared in constant time); PushWeights only accepts paths
that resolve inside the weights dir; message sizes are capped explicitly. A bad request (non-finite
or out-of-range sampling parameters, token ids outside the engine's vocabulary, prompts longer than
the engine allows) is answered with INVALID_ARGUMENT naming the field and value, before the engine
sees it, and the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import hmac
import ipaddress
import logging
import signal
import socket
import threading

import grpc

from conspo_jax.base.configs import UsageError
from conspo_jax.rollout.wire import TOKEN_ENV
from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc
from conspo_jax.sidecar.engines import EngineHandle, build_engine
from conspo_jax.sidecar.options import SidecarOptions, options_from_config
from conspo_jax.sidecar.servicer import SidecarServicer

log = logging.getLogger(__name__)


def _metadata_token(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


class _TokenAuth(grpc.ServerInterceptor):
    """Refuses every call whose bearer token differs from the configured one (constant-time compare)."""

    def __init__(self, token: str):
        self._token = token.encode()

    def intercept_service(self, continuation, details):
        if hmac.compare_digest(_metadata_token(details.invocation_metadata).encode(), self._token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong sidecar token (authorization: Bearer ...)")

        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


@dataclasses.dataclass
class SidecarServer:
    """A running sidecar: ``port``, ``stop()``, ``wait()``."""

    server: grpc.Server
    servicer: SidecarServicer
    port: int
    host: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 2.0) -> None:
        self.server.stop(grace).wait(timeout=(grace or 0) + 5)
        self.servicer.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def serve(
    config=None,
    *,
    engine_name: str = "jax",
    port: int = 0,
    handle: EngineHandle | None = None,
    options: SidecarOptions | None = None,
    **engine_overrides,
) -> SidecarServer:
    """Starts a sidecar (non-blocking) and returns it.

    config:      the experiment ConfigDict (engines read ``model.*`` and ``rollout.sidecar.*``), or None.
    engine_name: 'jax', 'sglang' or 'mock'; ignored when ``handle`` (a prebuilt EngineHandle) is given.
    port:        TCP port; 0 picks a free one (read it back from ``.port``).
    options:     SidecarOptions (host, token, weights_dir, workers, limits); its port is overridden by ``port``.
    """
    opts = dataclasses.replace(options or SidecarOptions(), port=port)
    if opts.max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {opts.max_message_bytes}")
    if not opts.token and not is_loopback(opts.host):
        if not opts.allow_insecure_public:
            raise UsageError(
                f"refusing to serve {opts.host!r} (not a loopback address) without a token: anyone who "
                f"can reach it could push weights; set rollout.sidecar.token or ${TOKEN_ENV}, or pass "
                "--allow-insecure-public to serve it anyway"
            )
        log.warning(
            "sidecar listens on %s without a token (--allow-insecure-public): anyone can push weights", opts.host
        )
    if opts.port:  # before the engine is built (minutes for a real model), not after
        problem = _bind_problem(opts.host, opts.port)
        if problem:
            raise UsageError(problem)
    handle = handle or build_engine(engine_name, config, **engine_overrides)
    servicer = SidecarServicer(handle, opts)
    interceptors = [_TokenAuth(opts.token)] if opts.token else []
    server = grpc.server(
        cf.ThreadPoolExecutor(max_workers=opts.rpc_threads, thread_name_prefix="sidecar-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", opts.max_message_bytes),
            ("grpc.max_send_message_length", opts.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],  # a second sidecar on the same port must fail, not share it
        maximum_concurrent_rpcs=4 * opts.rpc_threads,
    )
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{opts.host}:{opts.port}")
    except RuntimeError:
        bound = 0
    if not bound:
        servicer.close()
        raise UsageError(_bind_problem(opts.host, opts.port) or f"cannot bind {opts.host}:{opts.port}")
    server.start()
    log.info(
        "sidecar (%s engine) serving on %s:%d, weights dir %s", handle.name, opts.host, bound, servicer.weights_dir
    )
    return SidecarServer(server, servicer, bound, opts.host)


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals (127.0.0.0/8, ::1, [::1]); False for anything else,
    including host names (which could resolve anywhere)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, as one line, or None if a probe socket binds it (gRPC itself
    only reports that binding failed, not why)."""
    bare = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            probe.bind((bare, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is already in use (another sidecar?); pick another with --port"
        return f"cannot bind {host}:{port}: {e.strerror or e}"
    except (TypeError, ValueError) as e:  # e.g. an unparsable host
        return f"cannot bind {host!r}:{port}: {e}"
    return None


def run_until_signalled(sidecar: SidecarServer, *, ready_line: bool = True) -> None:
    """Blocks until SIGTERM/SIGINT, then stops the server gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ready_line:
        print(f"SIDECAR READY {sidecar.target}", flush=True)
    while not stop.wait(1.0):
        pass
    sidecar.stop(grace=5.0)


def serve_from_cli(
    config,
    *,
    engine_name: str = "jax",
    port: int | None = None,
    host: str | None = None,
    allow_insecure_public: bool = False,
) -> None:
    """``conspo sidecar --config ... --engine {jax,sglang} [--port N] [--host H]``: serve until signalled.

    Host and port default to ``config.rollout.sidecar.address``. The shared token, if any, comes from
    ``rollout.sidecar.token`` or $CONSPO_SIDECAR_TOKEN, never from the command line.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = options_from_config(config, port=port, host=host)
    opts.allow_insecure_public = opts.allow_insecure_public or allow_insecure_public
    run_until_signalled(serve(config, engine_name=engine_name, port=opts.port, options=opts))
