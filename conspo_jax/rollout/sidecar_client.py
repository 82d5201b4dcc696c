"""The trainer's side of the sidecar: a ``RolloutEngine`` whose engine lives in another process.

``SidecarClient.generate`` returns the same prompt-major ``Rollouts`` as the embedded engine, with
the sidecar's verifier rewards in ``rewards_R``. Each prompt's group is consumed exactly once: groups
are tracked by prompt id, a duplicate is dropped, and when the stream breaks (sidecar restart,
network error) the client reconnects with exponential backoff and re-requests only the prompts it
has not received. Everything is bounded by one overall deadline and a retry budget.

``sync(weights, version)`` exports the policy state as HF safetensors into the shared weights dir
(or takes an already exported directory), calls PushWeights, and deletes older versions once the
sidecar has acknowledged the new one. Requests ask
for ``min_weight_version = acknowledged version - staleness`` (default staleness 0: on-policy).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence

import grpc
from flax import nnx

from conspo_jax.models.lora import base_policy, has_lora
from conspo_jax.rollout.engine import RolloutEngine, Rollouts, SamplingParams
from conspo_jax.rollout.wire import DEFAULT_MAX_MESSAGE_BYTES, TOKEN_ENV, codec
from conspo_jax.rollout.wire import rollout_pb2 as pb
from conspo_jax.rollout.wire import rollout_pb2_grpc as pb_grpc
from conspo_jax.rollout.wire.weights import WeightStore

log = logging.getLogger(__name__)

# Codes that mean "the connection or the server went away", not "your request is wrong".
RETRIABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
)


class SidecarError(RuntimeError):
    """A sidecar call failed for good; ``code`` is the last gRPC status code, if any."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class SidecarClient(RolloutEngine):
    """gRPC client of a rollout sidecar.

    target:      "host:port" of the sidecar.
    token:       shared secret sent as ``authorization: Bearer <token>`` on every call.
    verifier:    registry name the sidecar scores with ('math', 'arith', ...); '' for no rewards.
    weights:     WeightStore (or its root path) that ``sync`` exports into; the sidecar
                 must be configured with the same directory.
    staleness:   how many versions behind the last acknowledged push a group may be (0 = on-policy).
    deadline_s:  overall time limit of one ``generate`` / ``push_weights`` call, retries included.
    max_retries: reconnect attempts per call; the wait doubles from ``backoff_s`` up to ``backoff_max_s``.
    on_group:    optional ``fn(prompt_id, group)`` called as each new group is consumed.
    graphdef:    the policy's ``nnx.GraphDef``, so that ``sync`` can export an ``nnx.State`` of it.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        verifier: str = "",
        weights: WeightStore | str | None = None,
        staleness: int = 0,
        deadline_s: float = 3600.0,
        max_retries: int = 8,
        backoff_s: float = 0.25,
        backoff_max_s: float = 8.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        pad_id: int = 0,
        on_group: Callable[[str, pb.Group], None] | None = None,
        graphdef=None,
    ):
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.target, self.verifier, self.staleness = target, verifier, staleness
        self.deadline_s, self.max_retries = deadline_s, max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.pad_id, self.on_group, self.graphdef = pad_id, on_group, graphdef
        self.weights = WeightStore(weights) if isinstance(weights, str) else weights
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # Reconnect quickly after a sidecar restart instead of gRPC's default 1 s .. 120 s backoff.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", int(backoff_max_s * 1000)),
            ],
        )
        self._stub = pb_grpc.RolloutServiceStub(self._channel)
        self.version = 0  # last weight version the sidecar acknowledged
        self._last_push: tuple[str, int] | None = None
        self._base_push: tuple[str, int] | None = None  # a LoRA policy's frozen base, pushed once
        self.last_sync_bytes = 0  # the files of the last exported version
        self._calls = itertools.count()
        self.stats = collections.Counter()
        self.requested: list[list[str]] = []  # prompt ids asked for by each attempt of the last generate

    @classmethod
    def from_config(cls, config, *, tokenizer=None, policy=None, version: int = 0, **overrides) -> SidecarClient:
        """A client for ``config.rollout.sidecar``; waits (up to ``deadline_s``) for the sidecar to answer.

        With ``policy``, its weights are exported and pushed as ``version`` before returning, so the
        first rollouts come from the trainer's weights rather than the sidecar's initial checkpoint.
        The token comes from ``rollout.sidecar.token`` or, preferably, $CONSPO_SIDECAR_TOKEN.
        """
        sc = config.rollout.sidecar
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        opts = dict(
            token=sc.token or os.environ.get(TOKEN_ENV) or None,
            verifier=sc.verifier or str(config.task),
            weights=WeightStore(sc.weights_dir or None),
            staleness=int(sc.max_staleness),
            deadline_s=float(sc.deadline_s),
            pad_id=int(pad),
            graphdef=nnx.graphdef(policy) if policy is not None else None,
        )
        opts.update(overrides)
        client = cls(sc.address, **opts)
        client.wait_ready(timeout=client.deadline_s)
        if policy is not None:
            client.push_policy(policy, version)
        return client

    # ---- plumbing ----
    def _sleep_backoff(self, attempt: int, deadline: float) -> None:
        wait = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        time.sleep(max(0.0, min(wait, deadline - time.monotonic())))

    def _remaining(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SidecarError(f"{what}: deadline of {self.deadline_s}s exceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
        return left

    def health(self, timeout: float = 10.0) -> pb.HealthReply:
        return self._stub.Health(pb.HealthRequest(), timeout=timeout, metadata=self._metadata)

    def wait_ready(self, timeout: float = 30.0) -> pb.HealthReply:
        """Blocks until the sidecar answers Health (or raises SidecarError after ``timeout``)."""
        try:
            return self._stub.Health(pb.HealthRequest(), timeout=timeout, metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError as e:
            raise SidecarError(
                f"sidecar at {self.target} not ready after {timeout}s: {e.details()}", e.code()
            ) from None

    # ---- weights ----
    def push_weights(self, path: str, version: int) -> float:
        """Tells the sidecar to load ``path`` (inside its weights dir); returns its load time in seconds."""
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._stub.PushWeights(
                    pb.PushWeightsRequest(version=version, path=path),
                    timeout=self._remaining(deadline, "PushWeights"),
                    metadata=self._metadata,
                    wait_for_ready=True,
                )
                break
            except grpc.RpcError as e:
                # Loading is idempotent, so a lost connection is retried; a refusal is not.
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.max_retries:
                    raise SidecarError(
                        f"PushWeights(version={version}, path={path!r}): {e.code().name}: {e.details()}", e.code()
                    ) from None
                self.stats["retries"] += 1
                self._sleep_backoff(attempt + 1, deadline)
        self.version, self._last_push = version, (path, version)
        return float(reply.load_seconds)

    def push_policy(self, policy, version: int) -> None:
        """Exports ``policy`` as HF safetensors (a LoRA policy: its PEFT adapter only), pushes it, then
        deletes older exported versions. ``stats['sync_bytes']`` counts the bytes exported."""
        if self.weights is None:
            raise ValueError("SidecarClient needs weights= (a WeightStore or the shared weights dir) to push a policy")
        base_bytes = 0
        if has_lora(policy) and self._base_push is None:
            # The sidecar's base need not be the trainer's (a warm start, another model.path): the frozen
            # base goes over once per client, then adapters only. Tagged one version back so that no group
            # sampled from the bare base can pass for this version's.
            base = self.weights.export_base(base_policy(policy))
            base_bytes = self.weights.nbytes(base)
            self._base_push = (base, max(version - 1, 0))
            self.push_weights(*self._base_push)
        path = self.weights.export(policy, version)
        self.last_sync_bytes = base_bytes + self.weights.nbytes(path)
        self.stats["sync_bytes"] += self.last_sync_bytes
        self.push_weights(path, version)
        self.weights.cleanup(keep_from=version)

    def sync(self, weights, version: int) -> None:
        """Pushes new weights: an ``nnx.State`` of ``graphdef`` (exported first) or an exported HF directory."""
        if isinstance(weights, (str, os.PathLike)):
            self.push_weights(os.fspath(weights), version)
            if self.weights is not None:
                self.weights.cleanup(keep_from=version)
            return
        if self.graphdef is None:
            raise ValueError("SidecarClient.sync of an nnx.State needs graphdef= (make_engine passes the policy's)")
        self.push_policy(nnx.merge(self.graphdef, weights), version)

    # ---- rollouts ----
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        answers: Sequence[str] | None = None,
        prompt_ids: Sequence[str] | None = None,
        min_weight_version: int | None = None,
    ) -> Rollouts:
        """Samples ``params.n`` completions per prompt on the sidecar; rows are prompt-major.

        answers: per-prompt ground truth; with a client verifier the sidecar scores every sample and
                 ``rewards_R`` is filled, without answers ``rewards_R`` is None (the caller verifies).
        prompt_ids: unique ids (default: generated).
        """
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise ValueError("SidecarClient.generate: prompts is empty")
        if not self.verifier and answers is not None:
            raise ValueError("SidecarClient.generate: answers= given but the client has no verifier")
        verifier = self.verifier if answers is not None else ""
        answers = [str(a) for a in answers] if answers is not None else [""] * len(prompts)
        if len(answers) != len(prompts):
            raise ValueError(f"SidecarClient.generate: {len(answers)} answers for {len(prompts)} prompts")
        call = next(self._calls)
        ids = [str(i) for i in prompt_ids] if prompt_ids is not None else [f"c{call}-p{i}" for i in range(len(prompts))]
        if len(set(ids)) != len(ids) or len(ids) != len(prompts):
            raise ValueError("SidecarClient.generate: prompt_ids must be unique, one per prompt")
        min_version = max(0, self.version - self.staleness) if min_weight_version is None else min_weight_version
        by_id = {pid: pb.Prompt(prompt_id=pid, token_ids=p, answer=a) for pid, p, a in zip(ids, prompts, answers)}
        got: dict[str, pb.Group] = {}
        self.requested = []
        deadline = time.monotonic() + self.deadline_s
        attempt = 0
        while len(got) < len(ids):
            missing = [pid for pid in ids if pid not in got]
            self.requested.append(missing)
            request = pb.StreamRolloutsRequest(
                prompts=[by_id[pid] for pid in missing],
                n=params.n,
                sampling=codec.params_to_proto(params),
                min_weight_version=min_version,
                verifier=verifier,
            )
            stream = None
            try:
                stream = self._stub.StreamRollouts(
                    request,
                    timeout=self._remaining(deadline, "StreamRollouts"),
                    metadata=self._metadata,
                    wait_for_ready=True,
                )
                for group in stream:
                    self._consume(group, got, by_id, params.n, min_version, bool(verifier))
                if len(got) == len(ids):
                    break
                last_code, last_error = (
                    grpc.StatusCode.ABORTED,
                    f"stream ended with {len(ids) - len(got)} prompts unanswered",
                )
            except grpc.RpcError as e:
                last_code, last_error = e.code(), f"{e.code().name}: {e.details()}"
                if last_code == grpc.StatusCode.FAILED_PRECONDITION and self._repush_if_behind(min_version, attempt):
                    last_error = "sidecar was behind the trainer's weights; pushed them again"
                elif last_code not in RETRIABLE:
                    raise SidecarError(f"StreamRollouts: {last_error}", last_code) from None
            finally:
                if stream is not None:
                    stream.cancel()  # no-op on a finished call; frees the server on an abandoned one
            attempt += 1
            if attempt > self.max_retries:
                raise SidecarError(
                    f"StreamRollouts: gave up after {attempt} attempts with {len(ids) - len(got)} of "
                    f"{len(ids)} prompts missing; last error: {last_error}",
                    last_code,
                )
            self.stats["retries"] += 1
            log.info("sidecar stream broke (%s); re-requesting %d missing prompts", last_error, len(ids) - len(got))
            self._sleep_backoff(attempt, deadline)
        self.stats["groups"] += len(ids)
        return codec.rollouts_from_groups([got[pid] for pid in ids], params.n, pad_id=self.pad_id)

    def _consume(self, group: pb.Group, got: dict, by_id: dict, n: int, min_version: int, verified: bool) -> None:
        pid = group.prompt_id
        if pid in got:
            self.stats["duplicates_dropped"] += 1
            return
        if pid not in by_id:
            raise SidecarError(f"sidecar answered unknown prompt_id={pid!r}")
        if len(group.samples) != n:
            raise SidecarError(f"prompt_id={pid!r}: got {len(group.samples)} samples, asked for n={n}")
        if group.weight_version < min_version:
            raise SidecarError(
                f"prompt_id={pid!r}: weight_version={group.weight_version} is older than "
                f"min_weight_version={min_version}"
            )
        if verified and not all(s.HasField("reward") for s in group.samples):
            raise SidecarError(f"prompt_id={pid!r}: sidecar returned samples without rewards")
        got[pid] = group
        if self.on_group is not None:
            self.on_group(pid, group)

    def _repush_if_behind(self, min_version: int, attempt: int) -> bool:
        """After a sidecar restart it holds its initial weights: push the last acknowledged ones again."""
        if self._last_push is None or attempt >= self.max_retries:
            return False
        try:
            if self.health().weight_version >= min_version:
                return False
        except grpc.RpcError:
            return False
        path, version = self._last_push
        log.warning("sidecar is behind weight version %d; pushing %s again", min_version, path)
        if self._base_push is not None:  # a restarted sidecar lost the LoRA base the adapters go on
            self.push_weights(*self._base_push)
        self.push_weights(path, version)
        self.stats["repushes"] += 1
        return True

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
