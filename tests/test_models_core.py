"""Core behaviour of the policy model: log-probs under jit/grad, KV-cache decode vs full forward,
packing, the right-aligned (cuDNN-layout) path, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.models import (ModelConfig, forward_cached, get_model_config, hidden_states,
                               init_kv_cache, init_policy, mask_positions, policy_logits,
                               token_logprobs)
from conspo_jax.models import logprobs as lp_mod

VOCAB = 384


@pytest.fixture(scope="module")
def model():
  # Small chunk so the chunked log-softmax path really runs several chunks.
  return init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32, logprob_chunk=8)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, (3, 14)).astype(np.int32)
  mask = np.ones((3, 14), bool)
  mask[0, :4] = False   # left-padded prompt
  mask[1, -3:] = False  # right-padded response
  mask[2, :2] = False
  mask[2, -2:] = False
  ids[~mask] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def _reference_logprobs(model, ids, mask):
  """Unchunked reference: full [B,T,V] logits, log-softmax, gather."""
  pos = mask_positions(mask)
  t = ids.shape[1]
  allowed = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
  allowed |= jnp.eye(t, dtype=bool)[None]
  h = hidden_states(model, ids, pos, mask=allowed[:, None])
  logp = jax.nn.log_softmax(policy_logits(model, h), axis=-1)[:, :-1]
  out = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.where(mask[:, 1:] & mask[:, :-1], out, 0.0)


def test_chunked_logprobs_match_reference_and_mask_padding(model, batch):
  ids, mask = batch
  got = np.asarray(jax.jit(token_logprobs)(model, ids, mask))
  want = np.asarray(_reference_logprobs(model, ids, mask))
  assert got.shape == (3, 13) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  valid = np.asarray(mask[:, 1:] & mask[:, :-1])
  assert np.all(got[~valid] == 0) and np.all(got[valid] < 0)


def test_left_padding_does_not_change_logprobs(model, batch):
  ids, mask = batch
  row = ids[0:1, 4:]  # the same tokens without the 4 padding slots
  got = jax.jit(token_logprobs)(model, ids, mask)[0, 4:]
  alone = token_logprobs(model, row, jnp.ones_like(row, bool))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=1e-5)


def test_right_aligned_path_equals_masked_path(model, batch):
  ids, mask = batch
  pos = mask_positions(mask)
  got = jax.jit(lp_mod._logprobs_right_aligned)(model, ids, mask, pos)
  valid = mask[:, 1:] & mask[:, :-1]
  want = token_logprobs(model, ids, mask)
  np.testing.assert_allclose(np.asarray(jnp.where(valid, got, 0)), np.asarray(want), atol=1e-5)


def test_packed_rows_equal_unpacked(model):
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, VOCAB, 6), rng.integers(3, VOCAB, 5)
  packed = np.zeros((1, 14), np.int32)
  seg = np.zeros((1, 14), np.int32)
  packed[0, :6], seg[0, :6] = a, 1
  packed[0, 6:11], seg[0, 6:11] = b, 2
  got = np.asarray(token_logprobs(model, jnp.asarray(packed), jnp.asarray(seg > 0),
                                  segment_ids=jnp.asarray(seg)))[0]
  la = np.asarray(token_logprobs(model, jnp.asarray(a[None]), jnp.ones((1, 6), bool)))[0]
  lb = np.asarray(token_logprobs(model, jnp.asarray(b[None]), jnp.ones((1, 5), bool)))[0]
  np.testing.assert_allclose(got[:5], la, atol=1e-5)
  assert got[5] == 0  # prediction across the segment boundary
  np.testing.assert_allclose(got[6:10], lb, atol=1e-5)
  assert np.all(got[10:] == 0)


def test_jit_over_split_state_and_gradients_flow(model, batch):
  ids, mask = batch
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss(params, rest, ids, mask):
    m = nnx.merge(graphdef, params, rest)
    logp = token_logprobs(m, ids, mask)
    n = jnp.maximum((mask[:, 1:] & mask[:, :-1]).sum(1), 1)
    return -(logp.sum(1) / n).mean()

  value, grads = jax.value_and_grad(loss)(params, rest, ids, mask)
  assert np.isfinite(value)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
  # A small step along -grad lowers the loss: the gradient is the real one.
  stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
  assert loss(stepped, rest, ids, mask) < value


def test_kv_cache_prefill_then_decode_matches_full_forward(model):
  rng = np.random.default_rng(2)
  b, prompt, new, s = 2, 6, 4, 12
  ids = rng.integers(3, VOCAB, (b, prompt + new)).astype(np.int32)
  mask = np.ones((b, prompt + new), bool)
  mask[1, :3] = False  # row 1: left-padded prompt
  ids[~mask] = 0
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  pos = mask_positions(mask)
  full = np.asarray(policy_logits(model, hidden_states(
      model, ids, pos, mask=(jnp.tril(jnp.ones((prompt + new,) * 2, bool))[None]
                             & mask[:, None, :] | jnp.eye(prompt + new, dtype=bool))[:, None])))

  step = jax.jit(forward_cached)
  cache = init_kv_cache(model.config, b, s, dtype=jnp.float32)
  kv_mask = jnp.zeros((b, s), bool).at[:, :prompt].set(mask[:, :prompt])
  h, cache = step(model, ids[:, :prompt], pos[:, :prompt], cache, 0, kv_mask)
  logits = np.asarray(policy_logits(model, h))
  real = np.asarray(mask[:, :prompt])
  np.testing.assert_allclose(logits[real], full[:, :prompt][real], atol=2e-5)
  for t in range(prompt, prompt + new):
    kv_mask = kv_mask.at[:, t].set(True)
    h, cache = step(model, ids[:, t:t + 1], pos[:, t:t + 1], cache, jnp.int32(t), kv_mask)
    np.testing.assert_allclose(np.asarray(policy_logits(model, h))[:, 0], full[:, t], atol=2e-5)
  assert cache.k.shape == (2, b, s, 2, 16)
  assert float(jnp.abs(cache.k[:, :, prompt + new:]).max()) == 0  # untouched slots stay empty


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
