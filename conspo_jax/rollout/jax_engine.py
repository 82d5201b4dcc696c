"""The embedded JAX rollout engine: a KV-cached, jit-compiled decode loop over the NNX policy.

One compiled program per (rows, prompt bucket, max_new_tokens): prompts are left-padded to a bucket
so that ragged batches reuse compilations, and sampling settings are traced scalars. The loop stops
early once every row has produced a stop token. It runs under the policy's mesh: rows are sharded
over the data axes when they divide evenly, parameters keep the shardings they were built with.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from conspo_jax.models import forward_cached, init_kv_cache, load_hf_policy, policy_logits
from conspo_jax.rollout.engine import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Rollouts, SamplingParams
from conspo_jax.rollout.sampling import sample_tokens

_MAX_STOP_IDS = 8


def _decode(
    graphdef,
    state,
    prompt_RxQ,
    prompt_mask_RxQ,
    key,
    temperature,
    top_p,
    top_k,
    stop_ids,
    *,
    max_new,
    pad_id,
    cache_dtype,
):
    policy = nnx.merge(graphdef, state)
    rows, plen = prompt_RxQ.shape
    slots = plen + max_new
    cache = init_kv_cache(policy.config, rows, slots, dtype=cache_dtype)
    kv_mask_RxS = jnp.zeros((rows, slots), bool).at[:, :plen].set(prompt_mask_RxQ.astype(bool))
    positions_RxQ = jnp.maximum(jnp.cumsum(prompt_mask_RxQ, axis=-1) - 1, 0).astype(jnp.int32)
    h_RxQxD, cache = forward_cached(policy, prompt_RxQ, positions_RxQ, cache, jnp.int32(0), kv_mask_RxS)
    logits_RxV = policy_logits(policy, h_RxQxD[:, -1:])[:, 0]
    next_pos_R = positions_RxQ[:, -1] + 1

    def cond(carry):
        i, *_, done_R, _ = carry
        return (i < max_new) & ~jnp.all(done_R)

    def body(carry):
        i, cache, logits_RxV, key, ids_RxC, logp_RxC, lens_R, kv_mask_RxS, pos_R, done_R, stopped_R = carry
        key, sub = jax.random.split(key)
        tok_R, logp_R = sample_tokens(logits_RxV, sub, temperature, top_p, top_k)
        tok_R = jnp.where(done_R, pad_id, tok_R)
        ids_RxC = jax.lax.dynamic_update_slice(ids_RxC, tok_R[:, None], (0, i))
        logp_RxC = jax.lax.dynamic_update_slice(logp_RxC, jnp.where(done_R, 0.0, logp_R)[:, None], (0, i))
        lens_R = lens_R + (~done_R).astype(jnp.int32)
        hit_R = jnp.any(tok_R[:, None] == stop_ids[None, :], axis=-1) & ~done_R
        stopped_R = stopped_R | hit_R
        done_R = done_R | hit_R
        kv_mask_RxS = jax.lax.dynamic_update_slice(kv_mask_RxS, jnp.ones((rows, 1), bool), (0, plen + i))
        h_Rx1xD, cache = forward_cached(policy, tok_R[:, None], pos_R[:, None], cache, plen + i, kv_mask_RxS)
        logits_RxV = policy_logits(policy, h_Rx1xD)[:, 0]
        return i + 1, cache, logits_RxV, key, ids_RxC, logp_RxC, lens_R, kv_mask_RxS, pos_R + 1, done_R, stopped_R

    carry = (
        jnp.int32(0),
        cache,
        logits_RxV,
        key,
        jnp.full((rows, max_new), pad_id, jnp.int32),
        jnp.zeros((rows, max_new), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
        kv_mask_RxS,
        next_pos_R,
        jnp.zeros((rows,), bool),
        jnp.zeros((rows,), bool),
    )
    out = jax.lax.while_loop(cond, body, carry)
    ids_RxC, logp_RxC, lens_R, stopped_R = out[4], out[5], out[6], out[10]
    return ids_RxC, logp_RxC, lens_R, stopped_R


class JaxEngine(RolloutEngine):
    """Samples from a ``conspo_jax.models`` policy inside this process.

    eos_token_ids: tokens that end a completion (included in it, reported as finish reason 'stop').
    prompt_bucket: prompts are left-padded to a multiple of this, to bound recompilation.
    """

    def __init__(
        self,
        policy,
        *,
        eos_token_ids,
        pad_id: int = 0,
        mesh=None,
        prompt_bucket: int = 32,
        cache_dtype=jnp.bfloat16,
        version: int = 0,
        load_options: dict | None = None,
    ):
        self.graphdef, self.state = nnx.split(policy)
        self.eos_token_ids = tuple(int(t) for t in np.atleast_1d(eos_token_ids))
        self.pad_id, self.mesh, self.bucket = pad_id, mesh, prompt_bucket
        self.cache_dtype, self.version = cache_dtype, version
        # How sync() loads an HF directory (dtype, param_dtype, mesh): the sidecar pushes weights as paths.
        self.load_options = dict(load_options or {})
        self._compiled = {}

    def sync(self, weights, version):
        """Takes an ``nnx.State`` of the engine's graph, or an HF safetensors directory to load."""
        if isinstance(weights, (str, os.PathLike)):
            graphdef, state = nnx.split(load_hf_policy(os.fspath(weights), **self.load_options))
            if _layout(state) != _layout(self.state):
                # Another architecture: the decode programs compiled for the old graph are useless.
                self.graphdef, self._compiled = graphdef, {}
            # Same architecture (graphdefs differ only in checkpoint metadata such as torch_dtype):
            # swap the arrays and keep the compiled decode loop.
            weights = state
        self.state, self.version = weights, version

    def _fn(self, max_new):
        if max_new not in self._compiled:
            self._compiled[max_new] = jax.jit(
                functools.partial(
                    _decode, self.graphdef, max_new=max_new, pad_id=self.pad_id, cache_dtype=self.cache_dtype
                )
            )
        return self._compiled[max_new]

    def _place(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        batch_axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.axis_names)
        shards = math.prod(self.mesh.shape[a] for a in batch_axes)
        spec = PartitionSpec(batch_axes) if x.shape[0] % shards == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def generate(self, prompts, params: SamplingParams, *, answers=None, prompt_ids=None) -> Rollouts:
        prompts = [list(p) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("JaxEngine.generate: every prompt needs at least one token")
        stop = (*self.eos_token_ids, *params.stop_token_ids)[:_MAX_STOP_IDS]
        stop_ids = np.full((_MAX_STOP_IDS,), -1, np.int32)
        stop_ids[: len(stop)] = stop
        plen = -(-max(map(len, prompts)) // self.bucket) * self.bucket
        rows = len(prompts) * params.n
        prompt_RxQ = np.full((rows, plen), self.pad_id, np.int32)
        mask_RxQ = np.zeros((rows, plen), np.int32)
        for p, toks in enumerate(prompts):
            prompt_RxQ[p * params.n : (p + 1) * params.n, plen - len(toks) :] = toks
            mask_RxQ[p * params.n : (p + 1) * params.n, plen - len(toks) :] = 1
        ids, logp, lens, stopped = self._fn(params.max_new_tokens)(
            self.state,
            self._place(prompt_RxQ),
            self._place(mask_RxQ),
            jax.random.key(params.seed),
            jnp.float32(params.temperature),
            jnp.float32(params.top_p),
            jnp.int32(params.top_k),
            jnp.asarray(stop_ids),
        )
        ids, logp, lens, stopped = jax.device_get((ids, logp, lens, stopped))
        return Rollouts(
            completion_ids_RxC=np.asarray(ids, np.int32),
            completion_lens_R=np.asarray(lens, np.int32),
            logprobs_RxC=np.asarray(logp, np.float32),
            finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in stopped],
            group_ids_R=np.repeat(np.arange(len(prompts), dtype=np.int32), params.n),
            weight_version=self.version,
            pad_id=self.pad_id,
        )


def _layout(state):
    leaves, treedef = jax.tree.flatten(state)
    return treedef, [(x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves]
