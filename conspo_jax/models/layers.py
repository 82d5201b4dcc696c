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


def apply_rope(x_BxTxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates q or k; math in fp32, result in x's dtype."""
  x = x_BxTxNxH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x_BxTxNxH.dtype)


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask=None, causal=False, kv_lengths=None,
              implementation: str | None = None):
  """Grouped-query attention (softmax in fp32) through `jax.nn.dot_product_attention`.

  Either `mask` (bool, broadcastable to [B, N, T, S]) or `causal` + `kv_lengths` (right padding; the
  form cuDNN flash attention takes without materialising a mask).
  """
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask, is_causal=causal,
      key_value_seq_lengths=kv_lengths, implementation=implementation)


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
