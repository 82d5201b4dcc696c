"""The checks every StreamRollouts request passes before the engine sees it.

A bad request (an empty or duplicated prompt id, negative token ids, non-finite or out-of-range sampling
parameters, token ids outside the engine's vocabulary, prompts longer than the engine allows, an unknown
verifier) is answered with one gRPC status naming the field and the value (``Abort``), and the server
keeps serving.
"""

from __future__ import annotations

import grpc

from conspo_jax.rollout.wire import codec
from conspo_jax.sidecar import verifiers


class Abort(Exception):
    """Ends the call with ``code`` and ``message`` (the servicer turns it into ``context.abort``)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class RequestChecker:
    """Checks requests against the engine's stated limits (``EngineHandle``) and the server's ``max_n``;
    remembers the verifiers it has resolved, so a broken install fails the request, not a worker."""

    def __init__(self, handle, *, max_n: int):
        self.handle, self.max_n = handle, max_n
        self._resolved: set[str] = set()

    def check(self, req) -> tuple:
        """(SamplingParams, verifier target or None) of a valid request; ``Abort`` naming what is wrong."""
        if not req.prompts:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "StreamRolloutsRequest.prompts is empty")
        if not 1 <= req.n <= self.max_n:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"StreamRolloutsRequest.n must be in [1, {self.max_n}], got {req.n}",
            )
        seen = set()
        for i, p in enumerate(req.prompts):
            if not p.prompt_id:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}].prompt_id is empty")
            if p.prompt_id in seen:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}].prompt_id={p.prompt_id!r} is duplicated")
            seen.add(p.prompt_id)
            if not p.token_ids:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}] (prompt_id={p.prompt_id!r}): token_ids is empty"
                )
            if min(p.token_ids) < 0:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompts[{i}] (prompt_id={p.prompt_id!r}): negative token id {min(p.token_ids)}",
                )
        try:
            params = codec.params_from_proto(req.sampling, req.n)
        except ValueError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"StreamRolloutsRequest.sampling: {e}") from None
        self._limits(req, params)
        target = None
        if req.verifier:
            try:
                target = verifiers.target_of(req.verifier)
            except KeyError as e:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"StreamRolloutsRequest.verifier: {e.args[0]}") from None
            if target not in self._resolved:  # fail the request, not a worker, on a broken install
                try:
                    verifiers.resolve(target)
                except (ImportError, TypeError) as e:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
                self._resolved.add(target)
        return params, target

    def _limits(self, req, params) -> None:
        """Token ids within the vocabulary and lengths within the engine's limits (where it states them):
        an engine given an id >= its vocabulary size silently gathers garbage embeddings."""
        h = self.handle

        def bad(message):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, message)

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
