"""Pure-function building blocks of the decoder layer: RMSNorm, RoPE (incl. llama3 scaling),
grouped-query attention and SwiGLU. They take plain arrays so the layer stack can run under
`jax.lax.scan` + `jax.checkpoint` with stacked [L, ...] weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from conspo_jax.models.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; statistics in fp32 (as HF does), output in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Per-pair inverse frequencies [Dh/2] in fp32, with `llama3` or `linear` scaling applied."""
    dh = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv = inv / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept; the band between is interpolated.
        scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_tables(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, Dh] (fp32) for the given integer positions (HF half-rotation layout)."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x_BxTxHxE: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates q or k; math in fp32, result in x's dtype."""
    x = x_BxTxHxE.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x_BxTxHxE.dtype)


def attention(
    q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, *, causal=False, lengths=None, mask=None, implementation: str | None = None
):
    """Grouped-query attention (softmax in fp32) through `jax.nn.dot_product_attention`.

    Either `mask` (bool, broadcastable to [B, N, T, S]) or `causal` + `lengths` [B] (right padding,
    the form cuDNN flash attention takes without materialising any mask).
    """
    return jax.nn.dot_product_attention(
        q_BxTxHxE,
        k_BxSxKxE,
        v_BxSxKxE,
        mask=mask,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )


def slot_attention(
    q_BxTxHxE,
    k_BxSxKxE,
    v_BxSxKxE,
    *,
    q_slot_T,
    kv_valid_BxS,
    q_seg_BxT=None,
    kv_seg_BxS=None,
    self_visible=False,
    q_chunk=1024,
):
    """Causal attention where query t sits at key slot `q_slot[t]`: it sees slots <= q_slot[t] that
    are valid (and, when packed, in the same segment).

    The boolean mask is built per block of `q_chunk` queries inside a rematerialised scan, so neither
    a [B, T, S] mask nor [B, N, T, S] logits ever exist whole: memory is O(q_chunk * S) per block.
    `self_visible` lets padding queries see their own slot so no softmax row is empty.
    """
    b, t = q_BxTxHxE.shape[:2]
    s = k_BxSxKxE.shape[1]
    kv_slot = jnp.arange(s, dtype=jnp.int32)

    def block(q, q_slot, q_seg):
        allowed = (kv_slot[None, :] <= q_slot[:, None])[None] & kv_valid_BxS[:, None, :]
        if q_seg is not None:
            allowed &= q_seg[:, :, None] == kv_seg_BxS[:, None, :]
        if self_visible:
            allowed |= (kv_slot[None, :] == q_slot[:, None])[None]
        # cuDNN's fused kernel takes no general boolean mask: masked attention always runs on XLA.
        return jax.nn.dot_product_attention(q, k_BxSxKxE, v_BxSxKxE, mask=allowed[:, None], implementation="xla")

    if t <= q_chunk:
        return block(q_BxTxHxE, q_slot_T, q_seg_BxT)
    n = -(-t // q_chunk)
    pad = n * q_chunk - t
    qs = jnp.pad(q_BxTxHxE, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qs = qs.reshape(b, n, q_chunk, *qs.shape[2:]).swapaxes(0, 1)
    slots = jnp.pad(q_slot_T, (0, pad)).reshape(n, q_chunk)
    segs = None
    if q_seg_BxT is not None:
        segs = jnp.pad(q_seg_BxT, ((0, 0), (0, pad))).reshape(b, n, q_chunk).swapaxes(0, 1)
    body = jax.checkpoint(block, prevent_cse=False)
    _, out = jax.lax.scan(lambda c, xs: (c, body(*xs)), None, (qs, slots, segs))
    return out.swapaxes(0, 1).reshape(b, n * q_chunk, *out.shape[3:])[:, :t]


def swiglu(x_BxTxD, gate_DxF, up_DxF, down_FxD):
    g = jnp.einsum("btd,df->btf", x_BxTxD, gate_DxF)
    u = jnp.einsum("btd,df->btf", x_BxTxD, up_DxF)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, down_FxD)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def maybe_remat(fn, remat: str):
    """Wraps a layer body in `jax.checkpoint` with the named policy ('none' leaves it alone)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} not supported; expected one of {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)
