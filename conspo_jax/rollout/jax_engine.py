"""The embedded JAX rollout engine: KV-cached, jit-compiled decode over the NNX policy.

Decoding is continuous-batched in chunks (conspo_jax/rollout/decode.py): finished device rows are
refilled with the batch's pending (prompt, sample) pairs and attention reads only the filled cache
window. Prompts are left-padded to a bucket so that ragged batches reuse compilations, and sampling
settings are traced scalars. It samples from a compute-dtype copy of the weights, made once per
weight update. It runs under the policy's mesh: rows are sharded over the data axes when they divide
evenly, parameters keep the shardings they were built with.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from conspo_jax.base import distributed
from conspo_jax.models import load_hf_policy
from conspo_jax.models.lora import LoRAParam, attach_lora, has_lora, merge_lora, plain_graphdef
from conspo_jax.models.peft_io import ADAPTER_CONFIG
from conspo_jax.rollout.decode import DecodePrograms, prepare_sampling_state, run_decode
from conspo_jax.rollout.engine import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Rollouts, SamplingParams

_MAX_STOP_IDS = 8


class JaxEngine(RolloutEngine):
    """Samples from a ``conspo_jax.models`` policy inside this process.

    eos_token_ids: tokens that end a completion (included in it, reported as finish reason 'stop').
    prompt_bucket: prompts are left-padded to a multiple of this, to bound recompilation.
    decode_rows: device rows decoding at once, per process (None: every (prompt, sample) pair of the batch);
    with fewer rows than pairs, finished rows are refilled with pending pairs between chunks.
    decode_chunk: decode steps per jitted chunk (the refill / early-exit granularity).
    decode_shrink: once no pairs are pending, compact the live rows into a smaller row bucket.
    decode_compiler_options: XLA options for the decode programs (tests skip backend optimisation).
    progress_after_s: a call still running after this many seconds shows a progress bar (finished samples,
    tokens/s, ETA) on stderr; None: never.
    """

    decode_rows: int | None = None
    decode_chunk: int = 16
    decode_shrink: bool = True
    decode_min_rows: int = 8
    decode_compiler_options: dict | None = None
    progress_after_s: float | None = None

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
        decode_rows: int | None = None,
        decode_chunk: int = 16,
        progress_after_s: float | None = None,
    ):
        self.mesh = mesh
        self._set_policy_state(policy)
        self.progress_after_s = progress_after_s
        self.eos_token_ids = tuple(int(t) for t in np.atleast_1d(eos_token_ids))
        self.pad_id, self.mesh, self.bucket = pad_id, mesh, prompt_bucket
        self.cache_dtype, self.version = cache_dtype, version
        # How sync() loads an HF directory (dtype, param_dtype, mesh): the sidecar pushes weights as paths.
        self.load_options = dict(load_options or {})
        self.decode_rows, self.decode_chunk = decode_rows or None, decode_chunk
        self._compiled = {}
        self._sampling_cache = None

    def _set_policy_state(self, policy) -> None:
        """Samples from ``policy``'s weights; a LoRA policy's adapters are folded in once here (merged
        decode is 3-6% faster than applying them every step: BENCHMARKS.md, "LoRA decode")."""
        if has_lora(policy):
            self.graphdef = plain_graphdef(policy)
            lora_state = nnx.state(policy)
            self.state = self._merge(lora_state)
            # The frozen base, kept for PEFT adapter pushes (sidecar LoRA sync): adapters go on top of it.
            self._base_state = nnx.filter_state(lora_state, nnx.Not(LoRAParam))
        else:
            self.graphdef, self.state = nnx.split(policy)
            self._base_state = self.state

    def _merge(self, lora_state):
        # One jitted merge per weight update: W + scale * A @ B for every target, in W's dtype and sharding.
        if getattr(self, "_merge_fn", None) is None:
            self._merge_fn = jax.jit(lambda st: merge_lora(st, self.mesh))
        return self._merge_fn(lora_state)

    def _sync_adapter(self, path: str) -> nnx.State:
        """The merged state of a PEFT adapter directory (``save_peft_adapter``'s) on the engine's base."""
        from conspo_jax.models.peft_io import load_peft_adapter, read_peft_config

        policy = nnx.merge(self.graphdef, self._base_state)  # a new module: attaching leaves the base as it is
        attach_lora(policy, read_peft_config(path, policy.config), dtype=jnp.float32)
        load_peft_adapter(policy, path)
        return self._merge(nnx.state(policy))

    def sync(self, weights, version):
        """Takes an ``nnx.State`` of the engine's graph (a LoRA state is merged), an HF safetensors
        directory to load, or a PEFT adapter directory (``adapter_config.json``) to put on the base."""
        if isinstance(weights, (str, os.PathLike)) and os.path.isfile(os.path.join(weights, ADAPTER_CONFIG)):
            self.state, self.version = self._sync_adapter(os.fspath(weights)), version
            return
        if isinstance(weights, nnx.State) and nnx.filter_state(weights, LoRAParam):
            self._base_state = nnx.filter_state(weights, nnx.Not(LoRAParam))
            self.state, self.version = self._merge(weights), version
            return
        if isinstance(weights, (str, os.PathLike)):
            graphdef, state = nnx.split(load_hf_policy(os.fspath(weights), **self.load_options))
            if _layout(state) != _layout(self.state):
                # Another architecture: the decode programs compiled for the old graph are useless.
                self.graphdef, self._compiled = graphdef, {}
            # Same architecture (graphdefs differ only in checkpoint metadata such as torch_dtype):
            # swap the arrays and keep the compiled decode loop.
            weights = state
        self.state, self._base_state, self.version = weights, weights, version

    def _fn(self, max_new):
        if max_new not in self._compiled:
            self._compiled[max_new] = DecodePrograms(
                self.graphdef, max_new=max_new, pad_id=self.pad_id, compiler_options=self.decode_compiler_options
            )
        return self._compiled[max_new]

    def _sampling_state(self):
        """(compute-dtype copy of self.state, model config), remade only when the state object changes."""
        cached = self._sampling_cache
        if cached is None or cached[0] is not self.state:
            policy = nnx.merge(self.graphdef, self.state)
            self._sampling_cache = (self.state, prepare_sampling_state(self.state, policy.dtype), policy.config)
        return self._sampling_cache[1:]

    def _process_layout(self) -> dict:
        """run_decode's view of the processes: with a mesh over several processes each decodes its own
        prompts on its block of one global decode, in whole data shards (rows are per process)."""
        if self.mesh is None or not distributed.multi_process():
            return {}
        batch_axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.axis_names)
        shards = math.prod(self.mesh.shape[a] for a in batch_axes)
        procs = jax.process_count()
        if shards % procs:
            raise ValueError(f"JaxEngine: the mesh's {shards} data shards do not split over {procs} processes")
        return dict(processes=procs, rank=jax.process_index(), row_align=shards // procs)

    def _place(self, x):
        """This process's rows as its block of the global [rows over all processes, ...] array."""
        if self.mesh is None:
            return jnp.asarray(x)
        batch_axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.axis_names)
        shards = math.prod(self.mesh.shape[a] for a in batch_axes)
        if x.shape[0] * jax.process_count() % shards == 0:
            spec = PartitionSpec(batch_axes)
        elif distributed.multi_process():
            raise ValueError(
                f"JaxEngine: {x.shape[0]} rows per process do not split over the {shards} data shards of the mesh"
            )
        else:
            spec = PartitionSpec()
        return distributed.to_global(x, NamedSharding(self.mesh, spec))

    def generate(self, prompts, params: SamplingParams, *, answers=None, prompt_ids=None) -> Rollouts:
        prompts = [list(p) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("JaxEngine.generate: every prompt needs at least one token")
        stop = (*self.eos_token_ids, *params.stop_token_ids)[:_MAX_STOP_IDS]
        stop_ids = np.full((_MAX_STOP_IDS,), -1, np.int32)
        stop_ids[: len(stop)] = stop
        plen = -(-max(map(len, prompts)) // self.bucket) * self.bucket
        # One global decode: every process pads to the longest prompt of any process.
        plen = int(distributed.allgather_ints([plen]).max())
        prompt_PxQ = np.full((len(prompts), plen), self.pad_id, np.int32)
        mask_PxQ = np.zeros((len(prompts), plen), np.int32)
        for p, toks in enumerate(prompts):
            prompt_PxQ[p, plen - len(toks) :] = toks
            mask_PxQ[p, plen - len(toks) :] = 1
        rows = min(len(prompts) * params.n, self.decode_rows or len(prompts) * params.n)
        state, config = self._sampling_state()
        bar, on_chunk = self._progress(len(prompts) * params.n)
        try:
            ids, logp, lens, stopped = self._decode(
                params, state, config, prompt_PxQ, mask_PxQ, rows, stop_ids, on_chunk
            )
        finally:
            if bar is not None:
                bar.close()
        return Rollouts(
            completion_ids_RxC=np.asarray(ids, np.int32),
            completion_lens_R=np.asarray(lens, np.int32),
            logprobs_RxC=np.asarray(logp, np.float32),
            finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in stopped],
            group_ids_R=np.repeat(np.arange(len(prompts), dtype=np.int32), params.n),
            weight_version=self.version,
            pad_id=self.pad_id,
        )

    def _progress(self, total):
        """(tqdm bar, run_decode's on_chunk hook), or (None, None) without progress_after_s."""
        if self.progress_after_s is None or not distributed.is_primary():
            return None, None
        from tqdm.auto import tqdm

        # tqdm's delay keeps calls shorter than progress_after_s silent (a tiny model's step).
        bar = tqdm(total=total, desc="generate", unit="sample", delay=self.progress_after_s, leave=False)
        start = time.monotonic()

        def on_chunk(done, total, tokens):
            bar.set_postfix_str(f"{tokens / max(time.monotonic() - start, 1e-9):.0f} tok/s", refresh=False)
            bar.update(done - bar.n)
            # update() skips redrawing within tqdm's mininterval, and the bar is cleared on close (leave=False):
            # a shown bar draws its last state, so the call's end is visible, not a count short of it.
            if done >= total and time.monotonic() - start >= self.progress_after_s:
                bar.refresh()

        return bar, on_chunk

    def _decode(self, params, state, config, prompt_PxQ, mask_PxQ, rows, stop_ids, on_chunk):
        return run_decode(
            self._fn(params.max_new_tokens),
            state=state,
            config=config,
            prompt_PxQ=prompt_PxQ,
            mask_PxQ=mask_PxQ,
            n=params.n,
            rows=rows,
            chunk=self.decode_chunk,
            samp=(jnp.float32(params.temperature), jnp.float32(params.top_p), jnp.int32(params.top_k)),
            stop_ids=jnp.asarray(stop_ids),
            key=jax.random.key(params.seed),
            cache_dtype=self.cache_dtype,
            mesh=self.mesh,
            place=self._place,
            shrink=self.decode_shrink,
            min_rows=self.decode_min_rows,
            on_chunk=on_chunk,
            **self._process_layout(),
        )


def _layout(state):
    leaves, treedef = jax.tree.flatten(state)
    return treedef, [(x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves]
