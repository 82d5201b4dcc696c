"""The rollout sidecar's gRPC server: generate, verify, stream; load pushed weights.

One process owns the rollout engine. ``StreamRollouts`` runs the engine over the request's prompts
(in chunks of ``chunk_prompts``; 0 means one engine call, which reproduces the embedded engine's
samples for the same seed), hands each group to a pool of verifier worker processes, and streams
groups back as soon as their rewards are in. ``PushWeights`` loads a checkpoint directory between
engine calls, never during one, so every group is produced by exactly one weight version.

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
import multiprocessing
import os
import signal
import socket
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import grpc

from conspo_jax.base.configs import UsageError
from conspo_jax.rollout.sglang_engine import sample_seed
from conspo_jax.rollout.wire import DEFAULT_MAX_MESSAGE_BYTES, TOKEN_ENV, codec
from conspo_jax.rollout.wire import rollout_pb2 as pb
from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc
from conspo_jax.rollout.wire.weights import default_weights_dir, resolve_inside
from conspo_jax.sidecar import verifiers
from conspo_jax.sidecar.engines import EngineHandle, build_engine

log = logging.getLogger(__name__)


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


class _Inline:
    """Executor stand-in that verifies in the calling thread (workers=0)."""

    def submit(self, fn, *args):
        fut = cf.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered through the future like a real executor
            fut.set_exception(e)
        return fut

    def shutdown(self, **_):
        pass


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SidecarServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, handle: EngineHandle, options: SidecarOptions):
        self.handle, self.opts = handle, options
        self.weights_dir = os.path.realpath(options.weights_dir or default_weights_dir())
        os.makedirs(self.weights_dir, mode=0o700, exist_ok=True)
        self._engine_lock = threading.Lock()
        self._version_cond = threading.Condition()
        self._version = handle.version
        self._pool_lock = threading.Lock()
        self._pool = self._make_pool()
        self._resolved: set[str] = set()
        self.groups_served = 0

    # ---- verification pool ----
    def _make_pool(self):
        if self.opts.workers <= 0:
            verifiers.init_worker(self.handle.tokenizer)
            return _Inline()
        pool = cf.ProcessPoolExecutor(
            self.opts.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=verifiers.init_worker,
            initargs=(self.handle.tokenizer,),
        )
        for _ in range(self.opts.workers):  # start workers now, not on the first request
            pool.submit(int)
        return pool

    def _replace_broken_pool(self, broken):
        with self._pool_lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._make_pool()

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.handle.engine.close()

    # ---- request checks ----
    def _check_request(self, req) -> tuple:
        if not req.prompts:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "StreamRolloutsRequest.prompts is empty")
        if not 1 <= req.n <= self.opts.max_n:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"StreamRolloutsRequest.n must be in [1, {self.opts.max_n}], got {req.n}",
            )
        seen = set()
        for i, p in enumerate(req.prompts):
            if not p.prompt_id:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}].prompt_id is empty")
            if p.prompt_id in seen:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}].prompt_id={p.prompt_id!r} is duplicated")
            seen.add(p.prompt_id)
            if not p.token_ids:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}] (prompt_id={p.prompt_id!r}): token_ids is empty"
                )
            if min(p.token_ids) < 0:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompts[{i}] (prompt_id={p.prompt_id!r}): negative token id {min(p.token_ids)}",
                )
        try:
            params = codec.params_from_proto(req.sampling, req.n)
        except ValueError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"StreamRolloutsRequest.sampling: {e}") from None
        self._check_limits(req, params)
        target = None
        if req.verifier:
            try:
                target = verifiers.target_of(req.verifier)
            except KeyError as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"StreamRolloutsRequest.verifier: {e.args[0]}") from None
            if target not in self._resolved:  # fail the request, not a worker, on a broken install
                try:
                    verifiers.resolve(target)
                except (ImportError, TypeError) as e:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
                self._resolved.add(target)
        return params, target

    def _check_limits(self, req, params) -> None:
        """Token ids within the vocabulary and lengths within the engine's limits (where it states them):
        an engine given an id >= its vocabulary size silently gathers garbage embeddings."""
        h = self.handle

        def bad(message):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if h.vocab_size is not None:
            for t in params.stop_token_ids:
                if t >= h.vocab_size:
                    bad(
                        f"StreamRolloutsRequest.sampling.stop_token_ids: token id {t} >= the vocabulary size {h.vocab_size}"
                    )
        for i, p in enumerate(req.prompts):
            where = f"prompts[{i}] (prompt_id={p.prompt_id!r})"
            if h.vocab_size is not None and max(p.token_ids) >= h.vocab_size:
                bad(f"{where}: token id {max(p.token_ids)} >= the vocabulary size {h.vocab_size}")
            if h.max_prompt_len is not None and len(p.token_ids) > h.max_prompt_len:
                bad(f"{where}: {len(p.token_ids)} token_ids > the engine's max prompt length {h.max_prompt_len}")
            if h.max_total_len is not None and len(p.token_ids) + params.max_new_tokens > h.max_total_len:
                bad(
                    f"{where}: {len(p.token_ids)} token_ids + sampling.max_new_tokens={params.max_new_tokens} > "
                    f"the engine's {h.max_total_len} positions"
                )

    def _wait_for_version(self, min_version: int, context) -> None:
        remaining = context.time_remaining()
        timeout = self.opts.version_wait_s if remaining is None else min(self.opts.version_wait_s, max(0.0, remaining))
        with self._version_cond:
            if not self._version_cond.wait_for(lambda: self._version >= min_version, timeout=timeout):
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"sidecar holds weight version {self._version} < min_weight_version={min_version}; "
                    "push the weights first",
                )

    # ---- RPCs ----
    def StreamRollouts(self, request, context):
        try:
            yield from self._stream(request, context)
        except _Abort as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - one failed request must not take the sidecar down
            log.exception("StreamRollouts failed")
            context.abort(grpc.StatusCode.INTERNAL, f"sidecar error: {type(e).__name__}: {e}")

    def _stream(self, req, context):
        params, target = self._check_request(req)
        self._wait_for_version(req.min_weight_version, context)
        chunk = self.opts.chunk_prompts or len(req.prompts)
        pending: dict[cf.Future, pb.Group] = {}
        for c, start in enumerate(range(0, len(req.prompts), chunk)):
            if not context.is_active():
                return
            prompts = req.prompts[start : start + chunk]
            chunk_params = params if c == 0 else dataclasses.replace(params, seed=sample_seed(params.seed, -1 - c))
            with self._engine_lock:
                if self._version < req.min_weight_version:  # an older version was pushed meanwhile
                    raise _Abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"sidecar weight version {self._version} < min_weight_version={req.min_weight_version}",
                    )
                try:
                    rollouts = self.handle.engine.generate([list(p.token_ids) for p in prompts], chunk_params)
                except ValueError as e:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"engine refused the request: {e}") from None
            groups = codec.groups_from_rollouts(rollouts, [p.prompt_id for p in prompts], req.n)
            for group, prompt in zip(groups, prompts):
                if target is None:
                    fut = cf.Future()
                    fut.set_result(None)
                else:
                    pool = self._pool
                    try:
                        fut = pool.submit(
                            verifiers.score_group,
                            target,
                            prompt.answer,
                            [list(s.completion_ids) for s in group.samples],
                        )
                    except BrokenProcessPool:
                        self._replace_broken_pool(pool)
                        raise _Abort(
                            grpc.StatusCode.UNAVAILABLE, "a verifier worker died; retry the missing prompts"
                        ) from None
                pending[fut] = group
            yield from self._drain(pending, context, block=False)
        yield from self._drain(pending, context, block=True)

    def _drain(self, pending, context, *, block: bool):
        deadline = time.monotonic() + self.opts.verify_timeout_s
        while pending:
            done, _ = cf.wait(list(pending), timeout=1.0 if block else 0, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                group = pending.pop(fut)
                try:
                    rewards = fut.result()
                except BrokenProcessPool:
                    self._replace_broken_pool(self._pool)
                    raise _Abort(
                        grpc.StatusCode.UNAVAILABLE, "a verifier worker died; retry the missing prompts"
                    ) from None
                except ImportError as e:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
                if rewards is not None:
                    for s, r in zip(group.samples, rewards):
                        s.reward = r
                self.groups_served += 1
                yield group
            if not block:
                return
            if not context.is_active():
                return
            if time.monotonic() > deadline:
                raise _Abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"verification took longer than {self.opts.verify_timeout_s}s for "
                    f"{len(pending)} groups, e.g. prompt_id={next(iter(pending.values())).prompt_id!r}",
                )

    def PushWeights(self, request, context):
        if request.version < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"PushWeightsRequest.version must be >= 0, got {request.version}"
            )
        try:
            path = resolve_inside(self.weights_dir, request.path)
        except ValueError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"PushWeightsRequest.path refused: {e}")
        if not os.path.isdir(path):
            context.abort(grpc.StatusCode.NOT_FOUND, f"PushWeightsRequest.path={request.path!r} is not a directory")
        t0 = time.perf_counter()
        with self._engine_lock:
            try:
                self.handle.engine.sync(path, int(request.version))
            except Exception as e:  # noqa: BLE001 - the old weights stay in use; say why the new ones did not load
                log.exception("loading weights from %s failed", path)
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"loading weights version {request.version} from {path!r} failed: {type(e).__name__}: {e}",
                )
            with self._version_cond:
                self._version = int(request.version)
                self._version_cond.notify_all()
        dt = time.perf_counter() - t0
        log.info("loaded weights version %d from %s in %.2fs", request.version, path, dt)
        return pb.PushWeightsReply(version=request.version, load_seconds=dt)

    def Health(self, request, context):
        return pb.HealthReply(
            status="SERVING",
            weight_version=self._version,
            engine=self.handle.name,
            verifiers=verifiers.names(),
            groups_served=self.groups_served,
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
