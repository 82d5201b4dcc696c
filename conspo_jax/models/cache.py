"""KV cache and the cached forward pass used by the JAX sampler (prefill + token-by-token decode).

The cache holds every layer's keys/values, [L, B, S, Hkv, Dh]. `forward_cached` writes the new
tokens' K/V at slots [cache_start, cache_start + T) in place (the whole cache is a scan carry, so
XLA updates it without copies when the caller donates it) and attends over all slots allowed by the
caller's `kv_mask`. Long prefills attend in query blocks of `policy.attn_chunk`, so memory stays
O(attn_chunk * S) per layer.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from conspo_jax.models import layers as L
from conspo_jax.models.config import ModelConfig
from conspo_jax.models.sharding import logical_to_spec
from conspo_jax.models.transformer import Transformer, attn_output_and_mlp, qkv_projection

CACHE_AXES = ("layers", "batch", "cache_seq", "act_kv_heads", None)


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, Hkv, Dh]
    v: jax.Array  # [L, B, S, Hkv, Dh]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def kv_cache_sharding(config: ModelConfig, batch_size: int, max_len: int, mesh: Mesh):
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    spec = logical_to_spec(CACHE_AXES, shape, mesh)
    return KVCache(k=NamedSharding(mesh, spec), v=NamedSharding(mesh, spec))


def init_kv_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16, mesh: Mesh | None = None
) -> KVCache:
    """Zero cache; with `mesh`, created directly in its sharding (batch over data x fsdp, KV heads
    over tensor when they divide)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_kv_cache batch_size={batch_size} and max_len={max_len} must be >= 1")
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    shardings = kv_cache_sharding(config, batch_size, max_len, mesh) if mesh is not None else None
    make = jax.jit(lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)), out_shardings=shardings)
    return make()


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
    s = cache.k.shape[2]
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
        at = (i, zero, cache_start, zero, zero)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
        k_i = jax.lax.dynamic_index_in_dim(k_all, i, 0, keepdims=False).astype(q.dtype)
        v_i = jax.lax.dynamic_index_in_dim(v_all, i, 0, keepdims=False).astype(q.dtype)
        o = L.slot_attention(q, k_i, v_i, q_slot_T=q_slot, kv_valid_BxS=kv_valid, q_chunk=model.attn_chunk)
        return (attn_output_and_mlp(model, p, x, o), k_all, v_all), None

    x = model.embed_tokens(input_ids_BxT)
    layer_ids = jnp.arange(model.config.num_layers, dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (model.layers.arrays(), layer_ids))
    return model.final_hidden(x), KVCache(k=k_all, v=v_all)
