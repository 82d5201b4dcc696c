"""KV cache and the cached forward pass used by the JAX sampler (prefill + token-by-token decode).

The cache holds every layer's keys/values, [L, B, Hkv, S, Dh]: heads before slots, so a decode step's
attention is a dot batched over (row, KV head) whose window of slots is one strided read.
`forward_cached` writes the new tokens' K/V at slots [cache_start, cache_start + T) in place (the whole
cache is a scan carry, so XLA updates it without copies when the caller donates it) and attends over all
slots allowed by the caller's `kv_mask`. Long prefills attend in query blocks of `policy.attn_chunk`, so memory stays
O(attn_chunk * S) per layer.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from conspo_jax.models import layers as L
from conspo_jax.models.config import ModelConfig
from conspo_jax.models.sharding import logical_to_spec
from conspo_jax.models.transformer import Transformer, attn_output_and_mlp, qkv_projection

CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", None)


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, Hkv, S, Dh]
    v: jax.Array  # [L, B, Hkv, S, Dh]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def kv_cache_sharding(config: ModelConfig, batch_size: int, max_len: int, mesh: Mesh):
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
    spec = logical_to_spec(CACHE_AXES, shape, mesh)
    return KVCache(k=NamedSharding(mesh, spec), v=NamedSharding(mesh, spec))


def init_kv_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16, mesh: Mesh | None = None
) -> KVCache:
    """Zero cache; with `mesh`, created directly in its sharding (batch over data x fsdp, KV heads
    over tensor when they divide)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_kv_cache batch_size={batch_size} and max_len={max_len} must be >= 1")
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
    shardings = kv_cache_sharding(config, batch_size, max_len, mesh) if mesh is not None else None
    return _zeros_fn(shape, jnp.dtype(dtype), shardings)()


@functools.lru_cache(maxsize=64)
def _zeros_fn(shape, dtype, shardings):
    # One compiled zero-filler per cache shape: the sampler makes a fresh cache every generate call.
    return jax.jit(lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)), out_shardings=shardings)


def forward_cached(
    model: Transformer,
    input_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    cache: KVCache,
    cache_start,
    kv_mask_BxS: jax.Array,
):
    """Runs T new tokens through the model with the cache; returns (final-norm h [B,T,D], cache).

    The caller keeps cache_start + T <= S (dynamic_update_slice would clamp the write otherwise).

    Query t (at slot cache_start + t) attends to slots s <= cache_start + t with kv_mask[b, s] True;
    `kv_mask` must already include the new tokens' slots. `positions` are the RoPE positions.
    """
    b, t = input_ids_BxT.shape
    s = cache.max_len
    if kv_mask_BxS.shape != (b, s):
        raise ValueError(f"forward_cached kv_mask shape {kv_mask_BxS.shape} != (batch, cache len) {(b, s)}")
    cache_start = jnp.asarray(cache_start, jnp.int32)
    cos, sin = L.rope_tables(model.config, positions_BxT)
    q_slot = cache_start + jnp.arange(t, dtype=jnp.int32)
    kv_valid = kv_mask_BxS.astype(bool)
    zero = jnp.zeros((), jnp.int32)

    def layer(carry, xs):
        x, k_all, v_all = carry
        p, i = xs
        q, k, v = qkv_projection(model, p, x, cos, sin)
        at = (i, zero, zero, cache_start, zero)
        k_all = jax.lax.dynamic_update_slice(k_all, _heads_first(k)[None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, _heads_first(v)[None].astype(v_all.dtype), at)
        k_i = _heads_first(jax.lax.dynamic_index_in_dim(k_all, i, 0, keepdims=False)).astype(q.dtype)
        v_i = _heads_first(jax.lax.dynamic_index_in_dim(v_all, i, 0, keepdims=False)).astype(q.dtype)
        o = L.slot_attention(q, k_i, v_i, q_slot_T=q_slot, kv_valid_BxS=kv_valid, q_chunk=model.attn_chunk)
        return (attn_output_and_mlp(model, p, x, o), k_all, v_all), None

    x = model.embed_tokens(input_ids_BxT)
    layer_ids = jnp.arange(model.config.num_layers, dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (model.layers.arrays(), layer_ids))
    return model.final_hidden(x), KVCache(k=k_all, v=v_all)


def _heads_first(x_BxTxKxE):
    """[B, T, K, E] <-> [B, K, T, E] (its own inverse)."""
    return jnp.swapaxes(x_BxTxKxE, 1, 2)


def decode_attention(q_BxHxE, k_BxKxWxE, v_BxKxWxE, kv_valid_BxW):
    """One query token per row against a window of cache slots (grouped-query, softmax in fp32).

    Two dots batched over (row, KV head), accumulating in fp32. XLA's CPU runtime ran the broadcast-
    multiply-reduce this replaced as slow generic fusions: in a 30-layer stand-in for SmolLM2-135M's
    decode attention (64 rows x 128 slots, 2-core AMD EPYC VM, 2026-12-07) the layers took 127 ms that
    way and 81 ms as dots, window reads included.
    """
    b, h, e = q_BxHxE.shape
    kh = k_BxKxWxE.shape[1]
    q_BxKxGxE = (q_BxHxE.astype(jnp.float32) * (e**-0.5)).reshape(b, kh, h // kh, e).astype(k_BxKxWxE.dtype)
    s_BxKxGxW = jnp.einsum("bkge,bkwe->bkgw", q_BxKxGxE, k_BxKxWxE, preferred_element_type=jnp.float32)
    s_BxKxGxW = jnp.where(kv_valid_BxW[:, None, None, :], s_BxKxGxW, -jnp.inf)
    p_BxKxGxW = jax.nn.softmax(s_BxKxGxW, axis=-1).astype(v_BxKxWxE.dtype)
    o_BxKxGxE = jnp.einsum("bkgw,bkwe->bkge", p_BxKxGxW, v_BxKxWxE, preferred_element_type=jnp.float32)
    return o_BxKxGxE.reshape(b, 1, h, e).astype(q_BxHxE.dtype)


def forward_decode_step(model: Transformer, tok_B, pos_B, slot_B, cache: KVCache, kv_valid_BxW):
    """One new token per row, each row writing its K/V at its own slot; attention reads only the first
    W = kv_valid.shape[1] slots. Returns (final-norm h [B, 1, D], cache).

    Every row's slot must be < W and kv_valid must include it. The cache slabs are scan carries updated
    by a scatter, so XLA keeps them in place (no copy) when the caller donates the cache.
    """
    b = tok_B.shape[0]
    w = kv_valid_BxW.shape[1]
    if w > cache.max_len:
        raise ValueError(f"forward_decode_step window {w} > cache length {cache.max_len}")
    cos, sin = L.rope_tables(model.config, pos_B[:, None])
    rows = jnp.arange(b, dtype=jnp.int32)

    def layer(carry, xs):
        x, k_all, v_all = carry
        p, i = xs
        q, k, v = qkv_projection(model, p, x, cos, sin)
        k_all = k_all.at[i, rows, :, slot_B].set(k[:, 0].astype(k_all.dtype))
        v_all = v_all.at[i, rows, :, slot_B].set(v[:, 0].astype(v_all.dtype))
        k_w = jax.lax.dynamic_index_in_dim(k_all, i, 0, keepdims=False)[:, :, :w]
        v_w = jax.lax.dynamic_index_in_dim(v_all, i, 0, keepdims=False)[:, :, :w]
        o = decode_attention(q[:, 0], k_w, v_w, kv_valid_BxW)
        return (attn_output_and_mlp(model, p, x, o), k_all, v_all), None

    x = model.embed_tokens(tok_B[:, None])
    layer_ids = jnp.arange(model.config.num_layers, dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (model.layers.arrays(), layer_ids))
    return model.final_hidden(x), KVCache(k=k_all, v=v_all)


def prefill_rows(model: Transformer, prompt_NxQ, prompt_mask_NxQ, rows_N, cache: KVCache):
    """Runs N left-padded prompts (attending only to themselves) and writes their K/V into cache rows
    `rows_N`, slots [0, Q); a row index >= the cache's batch is dropped (bucket padding).
    Returns (final-norm h of each prompt's last token [N, 1, D], cache)."""
    n, q_len = prompt_NxQ.shape
    mask_NxQ = prompt_mask_NxQ.astype(bool)
    positions_NxQ = jnp.maximum(jnp.cumsum(mask_NxQ, axis=-1) - 1, 0).astype(jnp.int32)
    cos, sin = L.rope_tables(model.config, positions_NxQ)
    q_slot = jnp.arange(q_len, dtype=jnp.int32)

    def layer(carry, xs):
        x, k_all, v_all = carry
        p, i = xs
        q, k, v = qkv_projection(model, p, x, cos, sin)
        k_all = k_all.at[i, rows_N, :, :q_len].set(_heads_first(k).astype(k_all.dtype), mode="drop")
        v_all = v_all.at[i, rows_N, :, :q_len].set(_heads_first(v).astype(v_all.dtype), mode="drop")
        o = L.slot_attention(
            q, k, v, q_slot_T=q_slot, kv_valid_BxS=mask_NxQ, self_visible=True, q_chunk=model.attn_chunk
        )
        return (attn_output_and_mlp(model, p, x, o), k_all, v_all), None

    x = model.embed_tokens(prompt_NxQ)
    layer_ids = jnp.arange(model.config.num_layers, dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (model.layers.arrays(), layer_ids))
    return model.final_hidden(x[:, -1:]), KVCache(k=k_all, v=v_all)
