"""Per-token log-probabilities of a batch under the policy, without a [B, T, V] fp32 buffer.

The LM head + log-softmax run over sequence chunks of about `policy.logprob_chunk` tokens inside a
`lax.scan` whose body is rematerialised, so the forward and the backward pass each hold one chunk of
fp32 logits at a time. Batches may be left-padded (`attention_mask`) or packed (`segment_ids`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from conspo_jax.models.transformer import Transformer, hidden_states


def mask_positions(attention_mask_BxT: jax.Array) -> jax.Array:
    """RoPE positions counting only real tokens (left padding does not shift them)."""
    m = attention_mask_BxT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions restarting at 0 at every segment boundary of a packed row."""
    t = jnp.arange(segment_ids_BxT.shape[1], dtype=jnp.int32)
    boundary = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(boundary, t, 0), axis=1)
    return t - start


def chunked_target_logprobs(model: Transformer, h_BxTxD: jax.Array, targets_BxT: jax.Array):
    """log p(target) [B, T] fp32 from final hidden states, one sequence chunk at a time."""
    b, t, d = h_BxTxD.shape
    chunk = max(1, min(t, model.logprob_chunk // max(b, 1)))
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    tgt = tgt.reshape(b, n, chunk).swapaxes(0, 1)
    w_DxV = model.head_weight()

    @jax.checkpoint
    def one_chunk(h_BxWxD, tgt_BxW):
        logits = jnp.einsum("bcd,dv->bcv", h_BxWxD.astype(w_DxV.dtype), w_DxV, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt_BxW[..., None], axis=-1)[..., 0]
        return picked - lse

    _, logp = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (h, tgt))
    return logp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def token_logprobs(
    model: Transformer,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) as fp32 [B, T-1]; 0 where no prediction exists.

    `attention_mask` [B, T] marks real tokens (left/right padding both allowed). With `segment_ids`
    (packed rows, 0 = padding) attention stays inside each segment, positions restart per segment
    and the prediction across a segment boundary is 0. Traceable under jit and differentiable.

    With cuDNN attention (attn_impl 'cudnn', or 'auto' on GPU in bf16) and no segment_ids, each row's
    real tokens must form one contiguous span (left-padded prompt + response + right padding, as RL
    batches are): rows are rotated so attention needs no mask.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"token_logprobs input_ids must be [B, T], got shape {input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"token_logprobs attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
        )
    valid = attention_mask.astype(bool)
    b, t = input_ids.shape
    if segment_ids is not None:
        if segment_ids.shape != input_ids.shape:
            raise ValueError(
                f"token_logprobs segment_ids shape {segment_ids.shape} != input_ids shape {input_ids.shape}"
            )
        if positions is None:
            positions = segment_positions(segment_ids)
    elif positions is None:
        positions = mask_positions(valid)
    target_ok = valid[:, 1:] & valid[:, :-1]
    if segment_ids is not None:
        target_ok &= segment_ids[:, 1:] == segment_ids[:, :-1]

    if segment_ids is None and model.resolved_attn_impl() == "cudnn":
        logp = _logprobs_right_aligned(model, input_ids, valid, positions)
    else:
        h = hidden_states(model, input_ids, positions, valid, segment_ids_BxT=segment_ids)
        logp = chunked_target_logprobs(model, h[:, :-1], input_ids[:, 1:])
    return jnp.where(target_ok, logp, 0.0)


def _logprobs_right_aligned(model, input_ids, valid, positions):
    """Same result for rows whose real tokens are one contiguous span: rotate each row so the span
    starts at 0, run causal attention with key lengths (cuDNN flash attention, no [T, T] mask), then
    rotate the log-probs back."""
    b, t = input_ids.shape
    start = jnp.argmax(valid, axis=1)
    length = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.int32)
    idx = (jnp.arange(t)[None, :] + start[:, None]) % t
    ids_r = jnp.take_along_axis(input_ids, idx, axis=1)
    pos_r = jnp.take_along_axis(positions, idx, axis=1)
    h = hidden_states(model, ids_r, pos_r, right_aligned_lengths_B=length)
    logp_r = chunked_target_logprobs(model, h[:, :-1], ids_r[:, 1:])
    logp_r = jnp.pad(logp_r, ((0, 0), (0, 1)))
    back = (jnp.arange(t)[None, :] - start[:, None]) % t
    return jnp.take_along_axis(logp_r, back, axis=1)[:, :-1]
