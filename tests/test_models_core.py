"""Core behaviour of the policy model: log-probs under jit/grad, KV-cache decode vs full forward,
packing, the right-aligned (cuDNN-layout) path, config validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.models import (
    ModelConfig,
    forward_cached,
    get_model_config,
    hidden_states,
    init_kv_cache,
    init_policy,
    mask_positions,
    policy_logits,
    token_logprobs,
)
from conspo_jax.models import logprobs as lp_mod

VOCAB = 384
# Correctness-only compiles: skip XLA's backend optimisation (halves CPU compile time).
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def model():
    # Small chunks so the chunked log-softmax and the query-blocked attention run several blocks.
    return init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32, logprob_chunk=8, attn_chunk=4)


B, T = 4, 14
_lp = jax.jit(token_logprobs, **FAST)


@pytest.fixture(scope="module")
def batch():
    """Row 0: tokens X left-padded by 4; row 1: the same X right-padded; rows 2-3: other layouts."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[0, :4] = False
    ids[1, :10], mask[1, 10:] = ids[0, 4:], False
    mask[2, :2] = False
    mask[2, -2:] = False
    ids[~mask] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _reference_logprobs(model, ids, mask):
    """Unchunked reference: full [B,T,V] logits, log-softmax, gather."""
    h = hidden_states(model, ids, mask_positions(mask), mask)
    logp = jax.nn.log_softmax(policy_logits(model, h), axis=-1)[:, :-1]
    out = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(mask[:, 1:] & mask[:, :-1], out, 0.0)


def test_chunked_logprobs_match_reference_and_padding_is_invisible(model, batch):
    ids, mask = batch
    got = np.asarray(_lp(model, ids, mask))
    want = np.asarray(jax.jit(_reference_logprobs, **FAST)(model, ids, mask))
    assert got.shape == (B, T - 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    valid = np.asarray(mask[:, 1:] & mask[:, :-1])
    assert np.all(got[~valid] == 0) and np.all(got[valid] < 0)
    # Left padding (row 0) gives the same log-probs as right padding (row 1) of the same tokens.
    np.testing.assert_allclose(got[0, 4:], got[1, :9], atol=1e-5)


def test_right_aligned_path_equals_masked_path(model, batch):
    ids, mask = batch
    pos = mask_positions(mask)
    got = jax.jit(lp_mod._logprobs_right_aligned, **FAST)(model, ids, mask, pos)
    valid = mask[:, 1:] & mask[:, :-1]
    want = _lp(model, ids, mask)
    np.testing.assert_allclose(np.asarray(jnp.where(valid, got, 0)), np.asarray(want), atol=1e-5)


def test_packed_rows_equal_unpacked(model):
    """Row 0 packs sequences a and b; rows 1 and 2 hold a and b alone (one segment each)."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, VOCAB, 6), rng.integers(3, VOCAB, 5)
    ids = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    ids[0, :6], seg[0, :6] = a, 1
    ids[0, 6:11], seg[0, 6:11] = b, 2
    ids[1, :6], seg[1, :6] = a, 1
    ids[2, :5], seg[2, :5] = b, 1
    seg_j = jnp.asarray(seg)
    got = np.asarray(jax.jit(token_logprobs, **FAST)(model, jnp.asarray(ids), seg_j > 0, segment_ids=seg_j))
    np.testing.assert_allclose(got[0, :5], got[1, :5], atol=1e-5)
    assert got[0, 5] == 0  # no prediction across the segment boundary
    np.testing.assert_allclose(got[0, 6:10], got[2, :4], atol=1e-5)
    assert np.all(got[0, 10:] == 0) and np.all(got[0, :5] < 0)


def test_jit_over_split_state_and_gradients_flow(model, batch):
    ids, mask = batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, ids, mask):
        m = nnx.merge(graphdef, params, rest)
        logp = token_logprobs(m, ids, mask)
        n = jnp.maximum((mask[:, 1:] & mask[:, :-1]).sum(1), 1)
        return -(logp.sum(1) / n).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss), **FAST)
    value, grads = value_and_grad(params, rest, ids, mask)
    assert np.isfinite(value)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
    # A small step along -grad lowers the loss: the gradient is the real one.
    stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
    assert value_and_grad(stepped, rest, ids, mask)[0] < value


def test_kv_cache_prefill_then_decode_matches_full_forward(model):
    rng = np.random.default_rng(2)
    b, prompt, new, s = 2, 6, 4, 12
    ids = rng.integers(3, VOCAB, (b, prompt + new)).astype(np.int32)
    mask = np.ones((b, prompt + new), bool)
    mask[1, :3] = False  # row 1: left-padded prompt
    ids[~mask] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    pos = mask_positions(mask)
    n = prompt + new
    full = np.asarray(jax.jit(lambda m: policy_logits(m, hidden_states(m, ids, pos, mask)), **FAST)(model))

    @functools.partial(jax.jit, **FAST)
    def step(model, ids, pos, cache, start, kv_mask):
        h, cache = forward_cached(model, ids, pos, cache, start, kv_mask)
        return policy_logits(model, h), cache

    cache = init_kv_cache(model.config, b, s, dtype=jnp.float32)
    kv_mask = np.zeros((b, s), bool)
    kv_mask[:, :prompt] = mask[:, :prompt]
    logits, cache = step(model, ids[:, :prompt], pos[:, :prompt], cache, jnp.int32(0), jnp.asarray(kv_mask))
    real = np.asarray(mask[:, :prompt])
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt][real], atol=2e-5)
    for t in range(prompt, n):
        kv_mask[:, t] = True
        logits, cache = step(model, ids[:, t : t + 1], pos[:, t : t + 1], cache, jnp.int32(t), jnp.asarray(kv_mask))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=2e-5)
    assert cache.k.shape == (2, b, 2, s, 16)
    assert float(jnp.abs(cache.k[:, :, :, prompt + new :]).max()) == 0  # untouched slots stay empty


def test_config_roundtrip_and_validation():
    for name in ("r1-distill-qwen-1.5b", "llama-3.2-3b-instruct", "qwen3-4b-base", "tiny-llama"):
        c = get_model_config(name)
        assert ModelConfig.from_hf(c.to_hf()) == c
    c = get_model_config("r1-distill-qwen-1.5b")
    assert abs(c.num_params() - 1.777e9) / 1.777e9 < 0.01  # published size
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_model_config("tiny-llama", num_kv_heads=3)
    with pytest.raises(ValueError, match="model name"):
        get_model_config("gpt-2")
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        get_model_config("tiny-llama", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="remat='bogus'"):
        init_policy(get_model_config("tiny-llama"), remat="bogus")
