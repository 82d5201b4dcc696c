"""Per-token log-probabilities of a batch under the policy, without a [B, T, V] fp32 buffer.

The LM head + log-softmax run over sequence chunks of about `policy.logprob_chunk` tokens inside a
`lax.scan`, so the forward and the backward pass each hold one chunk of fp32 logits at a time. A custom
VJP (`head_logprobs`) keeps the backward's [tokens, V] work in the compute dtype (bf16 on GPU). Batches may be left-padded (`attention_mask`) or packed (`segment_ids`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    h = jnp.pad(h_BxTxD.astype(model.dtype), ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    h_NxBxWxD = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    tgt_NxBxW = tgt.reshape(b, n, chunk).swapaxes(0, 1)
    logp_NxBxW = head_logprobs(h_NxBxWxD, model.head_weight_param(), tgt_NxBxW)
    return logp_NxBxW.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def _chunk_logits(h_BxWxD, w_DxV):
    # Compute-dtype operands, fp32 accumulation and result: log-softmax runs in fp32.
    return jnp.einsum("bwd,dv->bwv", h_BxWxD, w_DxV, preferred_element_type=jnp.float32)


@jax.custom_vjp
def head_logprobs(h_NxBxWxD: jax.Array, w_DxV: jax.Array, tgt_NxBxW: jax.Array) -> jax.Array:
    """log softmax(h @ w)[target] fp32 [N, B, W], one chunk of N at a time; h's dtype is the compute dtype.

    The head weight arrives in its parameter dtype and is cast once. The backward (custom VJP) keeps
    only the per-token logsumexp from the forward, recomputes each chunk's logits, forms the logits
    gradient in the compute dtype and runs both matmuls on compute-dtype operands with fp32
    accumulation; the weight gradient sums over chunks in fp32. No [tokens, V] fp32 operand exists.
    """
    return _head_fwd(h_NxBxWxD, w_DxV, tgt_NxBxW)[0]


def _head_fwd(h_NxBxWxD, w_DxV, tgt_NxBxW):
    w_c = w_DxV.astype(h_NxBxWxD.dtype)

    def one_chunk(carry, xs):
        h_BxWxD, tgt_BxW = xs
        logits_BxWxV = _chunk_logits(h_BxWxD, w_c)
        lse_BxW = jax.nn.logsumexp(logits_BxWxV, axis=-1)
        picked_BxW = jnp.take_along_axis(logits_BxWxV, tgt_BxW[..., None], axis=-1)[..., 0]
        return carry, (picked_BxW - lse_BxW, lse_BxW)

    _, (logp_NxBxW, lse_NxBxW) = jax.lax.scan(one_chunk, None, (h_NxBxWxD, tgt_NxBxW))
    # w's own dtype travels as a zero-size array: residuals must be arrays.
    return logp_NxBxW, (h_NxBxWxD, w_c, tgt_NxBxW, lse_NxBxW, jnp.zeros((0,), w_DxV.dtype))


def _head_bwd(res, g_NxBxW):
    h_NxBxWxD, w_c, tgt_NxBxW, lse_NxBxW, w_dtype_tag = res
    cdt = h_NxBxWxD.dtype
    vocab = w_c.shape[1]

    def one_chunk(dw_DxV, xs):
        h_BxWxD, tgt_BxW, lse_BxW, g_BxW = xs
        p_BxWxV = jnp.exp(_chunk_logits(h_BxWxD, w_c) - lse_BxW[..., None])
        is_tgt = jnp.arange(vocab, dtype=tgt_BxW.dtype) == tgt_BxW[..., None]
        # d logp / d logits = onehot(target) - softmax; cast to the compute dtype inside the fusion.
        dlogits_BxWxV = (g_BxW[..., None] * (is_tgt.astype(jnp.float32) - p_BxWxV)).astype(cdt)
        dh_BxWxD = jnp.einsum("bwv,dv->bwd", dlogits_BxWxV, w_c, preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.einsum("bwd,bwv->dv", h_BxWxD, dlogits_BxWxV, preferred_element_type=jnp.float32)
        return dw_DxV, dh_BxWxD.astype(cdt)

    dw0 = jnp.zeros(w_c.shape, jnp.float32)
    dw_DxV, dh_NxBxWxD = jax.lax.scan(one_chunk, dw0, (h_NxBxWxD, tgt_NxBxW, lse_NxBxW, g_NxBxW))
    dtgt = np.zeros(tgt_NxBxW.shape, jax.dtypes.float0)
    return dh_NxBxWxD, dw_DxV.astype(w_dtype_tag.dtype), dtgt


head_logprobs.defvjp(_head_fwd, _head_bwd)


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
