"""The sidecar's RPCs: StreamRollouts (generate, verify in worker processes, stream), PushWeights, Health.

``StreamRollouts`` runs the engine over the request's prompts (in chunks of ``chunk_prompts``; 0 means
one engine call, which reproduces the embedded engine's samples for the same seed), hands each group to
a pool of verifier worker processes, and streams groups back as soon as their rewards are in.
``PushWeights`` loads a checkpoint directory between engine calls, never during one, so every group is
produced by exactly one weight version, and only from paths that resolve inside the weights dir.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import grpc

from conspo_jax.rollout.sglang_engine import sample_seed
from conspo_jax.rollout.wire import codec
from conspo_jax.rollout.wire import rollout_pb2 as pb
from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc
from conspo_jax.rollout.wire.weights import default_weights_dir, resolve_inside
from conspo_jax.sidecar import verifiers
from conspo_jax.sidecar.checks import Abort, RequestChecker
from conspo_jax.sidecar.engines import EngineHandle
from conspo_jax.sidecar.options import SidecarOptions

log = logging.getLogger(__name__)


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


class SidecarServicer(pb_grpc.RolloutServiceServicer):
    """The RPCs over one engine: requests are checked, engine calls serialised, groups verified in a pool."""

    def __init__(self, handle: EngineHandle, options: SidecarOptions):
        self.handle, self.opts = handle, options
        self.weights_dir = os.path.realpath(options.weights_dir or default_weights_dir())
        os.makedirs(self.weights_dir, mode=0o700, exist_ok=True)
        self._engine_lock = threading.Lock()
        self._version_cond = threading.Condition()
        self._version = handle.version
        self._pool_lock = threading.Lock()
        self._pool = self._make_pool()
        self.checker = RequestChecker(handle, max_n=options.max_n)
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

    def _wait_for_version(self, min_version: int, context) -> None:
        remaining = context.time_remaining()
        timeout = self.opts.version_wait_s if remaining is None else min(self.opts.version_wait_s, max(0.0, remaining))
        with self._version_cond:
            if not self._version_cond.wait_for(lambda: self._version >= min_version, timeout=timeout):
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"sidecar holds weight version {self._version} < min_weight_version={min_version}; "
                    "push the weights first",
                )

    # ---- RPCs ----
    def StreamRollouts(self, request, context):
        try:
            yield from self._stream(request, context)
        except Abort as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - one failed request must not take the sidecar down
            log.exception("StreamRollouts failed")
            context.abort(grpc.StatusCode.INTERNAL, f"sidecar error: {type(e).__name__}: {e}")

    def _stream(self, req, context):
        params, target = self.checker.check(req)
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
                    raise Abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"sidecar weight version {self._version} < min_weight_version={req.min_weight_version}",
                    )
                try:
                    rollouts = self.handle.engine.generate([list(p.token_ids) for p in prompts], chunk_params)
                except ValueError as e:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"engine refused the request: {e}") from None
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
                        raise Abort(
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
                    raise Abort(
                        grpc.StatusCode.UNAVAILABLE, "a verifier worker died; retry the missing prompts"
                    ) from None
                except ImportError as e:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
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
                raise Abort(
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
