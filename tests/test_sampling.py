"""Sampling filters: top-k / top-p keep exactly the right tokens, log-probs are the untruncated ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conspo_jax.rollout import MockEngine, SamplingParams
from conspo_jax.rollout.sampling import sample_tokens

_sample = jax.jit(sample_tokens)
PROBS = np.array([0.5, 0.25, 0.15, 0.07, 0.03])


def _draw(top_p, top_k, temperature=1.0, n=4000):
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (n, 1)), jnp.float32))
    return _sample(logits, jax.random.key(0), jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))


@pytest.mark.parametrize(
    "top_p,top_k,allowed",
    [(1.0, 0, 5), (1.0, 2, 2), (0.7, 0, 2), (0.75, 0, 2), (0.76, 0, 3), (0.01, 0, 1), (0.9, 1, 1)],
)
def test_support_is_top_k_and_nucleus(top_p, top_k, allowed):
    toks, _ = _draw(top_p, top_k)
    assert set(np.unique(np.asarray(toks))) == set(range(allowed))


def test_frequencies_follow_renormalised_nucleus():
    toks, _ = _draw(0.76, 0)
    freq = np.bincount(np.asarray(toks), minlength=5) / toks.shape[0]
    expect = np.r_[PROBS[:3] / PROBS[:3].sum(), 0, 0]
    np.testing.assert_allclose(freq, expect, atol=0.03)


def test_logprob_is_temperature_scaled_untruncated():
    toks, logp = _draw(0.5, 0, temperature=0.5, n=64)
    ref = jax.nn.log_softmax(jnp.log(jnp.asarray(PROBS)) / 0.5)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(ref)[np.asarray(toks)], rtol=1e-6)


def test_greedy_at_zero_temperature():
    toks, logp = _draw(1.0, 0, temperature=0.0, n=16)
    assert np.all(np.asarray(toks) == 0)
    np.testing.assert_allclose(np.asarray(logp), np.log(0.5), rtol=1e-6)


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_mock_engine_shapes_and_groups():
    r = MockEngine().generate([[5, 6], [7]], SamplingParams(n=3, max_new_tokens=5, seed=1))
    assert r.num_rows == 6 and list(r.group_ids_R) == [0, 0, 0, 1, 1, 1]
    assert r.completion_ids_RxC.shape[1] <= 5 and all(1 <= n <= 5 for n in r.completion_lens_R)
    assert all((f == "stop") == (c[-1] == 1) for f, c in zip(r.finish_reasons, r.completions()))
