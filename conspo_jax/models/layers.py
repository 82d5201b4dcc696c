"""Pure-function building blocks of the decoder layer: RMSNorm, RoPE (incl. llama3 scaling),
grouped-query attention and the LoRA low-rank path. They take plain arrays so the layer stack can run under
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
    causal_prefix=False,
):
    """Causal attention where query t sits at key slot `q_slot[t]`: it sees slots <= q_slot[t] that
    are valid (and, when packed, in the same segment).

    The boolean mask is built per block of `q_chunk` queries, each block rematerialised, so neither
    a [B, T, S] mask nor [B, N, T, S] logits ever exist whole: memory is O(q_chunk * S) per block.
    `self_visible` lets padding queries see their own slot so no softmax row is empty.

    `causal_prefix=True` promises q_slot == arange(T) and S == T (a full forward, no cache): block i
    then reads only keys [0, end of block i), skipping the key blocks causality masks out anyway, so
    attention costs about (n + 1) / (2 n) of the dense work for n blocks.
    """
    b, t = q_BxTxHxE.shape[:2]
    s = k_BxSxKxE.shape[1]

    def block(q, k, v, q_slot, kv_valid, q_seg, kv_seg):
        kv_slot = jnp.arange(k.shape[1], dtype=jnp.int32)
        allowed = (kv_slot[None, :] <= q_slot[:, None])[None] & kv_valid[:, None, :]
        if q_seg is not None:
            allowed &= q_seg[:, :, None] == kv_seg[:, None, :]
        if self_visible:
            allowed |= (kv_slot[None, :] == q_slot[:, None])[None]
        # cuDNN's fused kernel takes no general boolean mask: masked attention always runs on XLA.
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")

    if t <= q_chunk:
        return block(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, q_slot_T, kv_valid_BxS, q_seg_BxT, kv_seg_BxS)
    # Inside the layer scan, so CSE across the recomputation cannot happen: prevent_cse=False is safe.
    body = jax.checkpoint(block, prevent_cse=False)
    if causal_prefix:
        if s != t:
            raise ValueError(f"slot_attention causal_prefix needs as many keys as queries, got T={t}, S={s}")
        outs = []
        for start in range(0, t, q_chunk):
            end = min(start + q_chunk, t)
            q_seg = None if q_seg_BxT is None else q_seg_BxT[:, start:end]
            kv_seg = None if kv_seg_BxS is None else kv_seg_BxS[:, :end]
            args = (q_BxTxHxE[:, start:end], k_BxSxKxE[:, :end], v_BxSxKxE[:, :end], q_slot_T[start:end])
            outs.append(body(*args, kv_valid_BxS[:, :end], q_seg, kv_seg))
        return jnp.concatenate(outs, axis=1)
    n = -(-t // q_chunk)
    pad = n * q_chunk - t
    qs = jnp.pad(q_BxTxHxE, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qs = qs.reshape(b, n, q_chunk, *qs.shape[2:]).swapaxes(0, 1)
    slots = jnp.pad(q_slot_T, (0, pad)).reshape(n, q_chunk)
    segs = None
    if q_seg_BxT is not None:
        segs = jnp.pad(q_seg_BxT, ((0, 0), (0, pad))).reshape(b, n, q_chunk).swapaxes(0, 1)

    def scan_body(c, xs):
        q, q_slot, q_seg = xs
        return c, body(q, k_BxSxKxE, v_BxSxKxE, q_slot, kv_valid_BxS, q_seg, kv_seg_BxS)

    _, out = jax.lax.scan(scan_body, None, (qs, slots, segs))
    return out.swapaxes(0, 1).reshape(b, n * q_chunk, *out.shape[3:])[:, :t]


def lora_delta(x_BxTxI, a_IxR: jax.Array, b_RxO: jax.Array, scale: float) -> jax.Array:
    """The low-rank path of a LoRA projection, scale * (x @ A) @ B, without forming A @ B.

    `a` is [in..., R] over the weight's input dims (which x's trailing dims match), `b` is [R, out...];
    the result is [B, T, out...] like x @ W. Two thin matmuls cost 2 * tokens * R * (in + out) FLOPs, and
    the backward needs no full-size weight gradient (only [in, R] and [R, out] ones), which is what makes
    a frozen base cheaper to train than the merged form W + scale * A @ B.
    """
    xa_BxTxR = jnp.tensordot(x_BxTxI, a_IxR, axes=a_IxR.ndim - 1)
    # The scale multiplies the R-wide activation, the smallest tensor on the path.
    return jnp.tensordot(xa_BxTxR * scale, b_RxO, axes=1)


# Activations the layer names with `checkpoint_name`; the 'names' policy saves exactly these: every
# matmul output whose backward needs it (q/k/v, the attention context, the output projection, the
# MLP gate and up projections), so the backward recomputes only norms, RoPE and elementwise ops.
# The MLP down projection is left out: nothing in the backward reads it (it only joins the residual).
SAVED_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlp_gate", "mlp_up")

# `model.remat` values. none: save every residual; full: save only each layer's input and recompute
# its forward in the backward; dots: save matmul outputs without batch dimensions (the projections,
# not attention's batched dots); names: save SAVED_NAMES.
REMAT_POLICIES = ("none", "full", "dots", "names")


def _policy(remat: str):
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)


def maybe_remat(fn, remat: str):
    """Wraps a layer body in `jax.checkpoint` with the named policy ('none' leaves it alone)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} not supported; expected one of {list(REMAT_POLICIES)}")
    if remat == "none":
        return fn
    # The layer body runs under lax.scan, so prevent_cse=False is safe and lets XLA fuse freely.
    return jax.checkpoint(fn, policy=_policy(remat), prevent_cse=False)
