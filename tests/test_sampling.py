"""Sampling filters: top-k / top-p keep exactly the right tokens (the bisection matches the sorted
reference), log-probs are the untruncated ones; the continuous-batching decoder returns the tokens a
static batch would, with teacher-forced log-probs, and copies no KV cache per step."""

import json
import os
import re
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.models import get_model_config, init_kv_cache, init_policy, token_logprobs
from conspo_jax.rollout import MockEngine, SamplingParams
from conspo_jax.rollout import decode as D
from conspo_jax.rollout.jax_engine import JaxEngine
from conspo_jax.rollout.sampling import (
    DRAW_BLOCK,
    _truncate,
    draw_from_weights,
    first_max_index,
    sample_tokens,
    truncate_sorted,
)
from tests.conftest import xla_flags

FAST = {"xla_backend_optimization_level": 0}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_two_level_draw_follows_weights_across_blocks_and_skips_zeros():
    """Weights spread over several draw blocks (the last one partial), whole blocks of zeros between
    them and zero entries inside a block: frequencies follow the weights and no zero is ever drawn."""
    vocab = 3 * DRAW_BLOCK + 17
    w = np.zeros(vocab, np.float32)
    picks = {1: 4.0, 5: 1.0, DRAW_BLOCK - 1: 2.0, 2 * DRAW_BLOCK + 3: 0.5, vocab - 1: 2.5}  # block 1 is empty
    for i, v in picks.items():
        w[i] = v
    rows = 20000
    toks = np.asarray(jax.jit(draw_from_weights)(jnp.asarray(np.tile(w, (rows, 1))), jax.random.key(3)))
    assert set(np.unique(toks)) <= set(picks)
    freq = np.bincount(toks, minlength=vocab)[list(picks)] / rows
    np.testing.assert_allclose(freq, np.array(list(picks.values())) / sum(picks.values()), atol=0.015)


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


@pytest.mark.parametrize("top_p,top_k", [(0.95, 0), (0.5, 0), (0.05, 0), (1.0, 7), (0.9, 40), (0.999, 0), (1.0, 1)])
def test_bisection_nucleus_equals_sorted_nucleus(top_p, top_k):
    rng = np.random.default_rng(int(top_p * 1000) + top_k)
    logits = rng.normal(size=(48, 500)) * rng.uniform(0.5, 6.0, size=(48, 1))
    logits[::2] = np.round(logits[::2], 1)  # heavy ties, incl. at the cut-off
    logits[1, :] = 0.0  # all tied
    logits[3, :5] = 9.0  # a tied top
    x, p, k = jnp.asarray(logits, jnp.float32), jnp.float32(top_p), jnp.int32(top_k)
    got = np.isfinite(np.asarray(jax.jit(_truncate)(x, p, k)))
    want = np.isfinite(np.asarray(jax.jit(truncate_sorted)(x, p, k)))
    np.testing.assert_array_equal(got, want)
    assert got.sum(-1).min() >= 1 and (got.sum(-1) < 500).any()


def test_first_max_index_is_argmax_incl_ties():
    z = jnp.asarray(np.round(np.random.default_rng(0).normal(size=(64, 300)), 1), jnp.float32)
    np.testing.assert_array_equal(np.asarray(first_max_index(z)), np.asarray(jnp.argmax(z, axis=-1)))


@pytest.fixture(scope="module")
def policy():
    pol = init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32)
    # A strong EOS direction in the head: rows stop at scattered steps, so refills happen mid-batch.
    pol.embed[...] = pol.embed[...].at[2].multiply(60.0)
    return pol


@pytest.fixture(scope="module")
def engine(policy):
    # One engine for the decode tests, so they share compiled programs (the knobs are plain attributes).
    eng = JaxEngine(policy, eos_token_ids=[2], pad_id=0, prompt_bucket=8, cache_dtype=jnp.float32)
    eng.decode_chunk, eng.decode_min_rows, eng.decode_compiler_options = 4, 2, FAST
    return eng


def _generate(engine, rows, params, shrink=True):
    engine.decode_rows, engine.decode_shrink = rows, shrink
    return engine.generate(PROMPTS, params)


PROMPTS = [[5, 9, 11], [17, 3, 3, 40, 41, 42, 43, 44, 45], [100]]


_teacher_logprobs = jax.jit(token_logprobs, compiler_options=FAST)


def test_refilled_rows_carry_teacher_forced_logprobs(policy, engine):
    # The first seed whose rows stop at different steps (a real mix of refills); which seed that is
    # depends on the CPU's floating point, so the test searches rather than naming one.
    for seed in range(16):
        out = _generate(engine, 4, SamplingParams(n=3, max_new_tokens=12, seed=seed))
        lens = out.completion_lens_R
        if 1 < len(set(lens.tolist())) and {"stop", "length"} == set(out.finish_reasons):
            break
    else:
        pytest.fail("no seed in 0..15 gave a mix of stopped and length-capped rows")
    assert out.num_rows == 9 and list(out.group_ids_R) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.completion_ids_RxC.shape == (9, 12)
    for r, toks in enumerate(out.completions()):
        assert (out.finish_reasons[r] == "stop") == (toks[-1] == 2) and (toks[-1] == 2 or len(toks) == 12)
        assert np.all(out.completion_ids_RxC[r, len(toks) :] == 0) and np.all(out.logprobs_RxC[r, len(toks) :] == 0)
        p = PROMPTS[out.group_ids_R[r]]
        ids, mask = np.zeros((1, 24), np.int32), np.zeros((1, 24), np.int32)  # one shape: one compile
        ids[0, : len(p) + len(toks)], mask[0, : len(p) + len(toks)] = p + toks, 1
        ref = np.asarray(_teacher_logprobs(policy, jnp.asarray(ids), jnp.asarray(mask)))[0, len(p) - 1 :]
        np.testing.assert_allclose(out.logprobs_RxC[r, : len(toks)], ref[: len(toks)], atol=2e-5)


def test_greedy_refill_and_compaction_match_one_static_batch(engine):
    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.0, seed=0)
    static = _generate(engine, None, params, shrink=False)
    refilled = _generate(engine, 4, params)
    np.testing.assert_array_equal(refilled.completion_ids_RxC, static.completion_ids_RxC)
    np.testing.assert_allclose(refilled.logprobs_RxC, static.logprobs_RxC, atol=1e-5)
    assert refilled.finish_reasons == static.finish_reasons


def test_sampling_state_is_a_compute_dtype_copy():
    pol = init_policy(get_model_config("tiny-qwen2"), seed=0, dtype=jnp.bfloat16)
    state = nnx.state(pol)
    cast = D.prepare_sampling_state(state, pol.dtype)
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    eng = JaxEngine(pol, eos_token_ids=[2], prompt_bucket=8)
    assert eng._sampling_state()[0] is eng._sampling_state()[0]  # made once per weight update, not per call


def test_decode_chunk_copies_no_kv_cache(policy):
    graphdef, state = nnx.split(policy)
    b, plen, max_new, window = 4, 8, 40, 32
    cache = init_kv_cache(policy.config, b, plen + max_new, dtype=jnp.float32)
    rows = jax.tree.map(jnp.asarray, D.empty_rows(b, plen))
    samp = (jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
    programs = D.DecodePrograms(graphdef, max_new=max_new, pad_id=0)
    args = (state, cache, rows, jax.random.key(0), samp, jnp.full((8,), -1, jnp.int32))
    hlo = programs.chunk.lower(*args, steps=4, window=window).compile().as_text()
    kv_tail = (policy.config.num_kv_heads, policy.config.head_dim)
    copies = [tuple(map(int, m.group(1).split(","))) for m in re.finditer(r"\[([\d,]+)\]\{[^}]*\} copy\(", hlo)]
    assert copies, "expected the HLO to contain some (small) copies"
    cache_like = [c for c in copies if c[-2:] == kv_tail and np.prod(c) >= b * window * np.prod(kv_tail) // 2]
    assert not cache_like, f"decode copies KV-cache-sized buffers: {cache_like}"


# The sharded decode runs in a fresh interpreter with 4 host devices, XLA's default optimisation and no
# persistent cache: what a user runs. In two CI runs the xdist worker died of a native signal inside this
# test's first sharded prefill (never here: alone, in the full suite with a cold or a warm cache, or under
# --xla_cpu_max_isa=AVX/AVX2/SSE4_2), which lost the worker and XLA's message. Isolated, such a death is
# reported with the signal and XLA's stderr (a warning in the summary), and a second one fails the test.
SHARDED_WORKER = """
import faulthandler, json, sys
faulthandler.enable()
import jax, jax.numpy as jnp, numpy as np
from conspo_jax.models import get_model_config, init_policy, make_mesh
from conspo_jax.rollout import SamplingParams
from conspo_jax.rollout.jax_engine import JaxEngine

assert len(jax.devices()) == 4, jax.devices()
PROMPTS = json.loads(sys.argv[1])

def engine(mesh):
    pol = init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32, mesh=mesh)
    pol.embed[...] = pol.embed[...].at[2].multiply(60.0)  # as the `policy` fixture: refills mid-batch
    eng = JaxEngine(pol, eos_token_ids=[2], pad_id=0, prompt_bucket=8, cache_dtype=jnp.float32, mesh=mesh)
    eng.decode_rows, eng.decode_chunk, eng.decode_min_rows = 4, 4, 2
    return eng

params = SamplingParams(n=3, max_new_tokens=12, temperature=0.0, seed=0)
want = engine(None).generate(PROMPTS, params)
mesh = make_mesh((2, 1, 2))
sharded = engine(mesh)
assert any(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.state))
got = sharded.generate(PROMPTS, params)
np.testing.assert_array_equal(got.completion_ids_RxC, want.completion_ids_RxC)
np.testing.assert_allclose(got.logprobs_RxC, want.logprobs_RxC, atol=1e-5)
assert got.finish_reasons == want.finish_reasons
print("sharded ok", got.num_rows)
"""


def test_sharded_engine_matches_single_device():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", JAX_ENABLE_COMPILATION_CACHE="false")
    if xla_flags():  # XLA's default optimisation, with the suite's code-generation flags if it has any
        env["XLA_FLAGS"] = xla_flags()
    for attempt in (1, 2):  # a second fresh process only after a native crash, which is reported either way
        proc = subprocess.run(
            [sys.executable, "-c", SHARDED_WORKER, json.dumps(PROMPTS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            cwd=REPO,
        )
        if proc.returncode >= 0:
            break
        crash = f"the sharded decode died of {signal.Signals(-proc.returncode).name} (attempt {attempt}):\n"
        if attempt == 2:
            pytest.fail(crash + proc.stderr[-6000:])
        warnings.warn(crash + proc.stderr[-3000:], stacklevel=1)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.split()[-2:] == ["ok", str(3 * len(PROMPTS))], proc.stdout  # 9 pairs on 4 rows: refilled


def test_sampler_program_has_no_sort_and_no_value_index_argmax():
    args = (jnp.zeros((4, 50)), jax.random.key(0), jnp.float32(1.0), jnp.float32(0.9), jnp.int32(5))
    text = jax.jit(sample_tokens).lower(*args).as_text()
    # A fused value+index argmax lowers to a two-operand reduce: "%r:2 = stablehlo.reduce(...), (...)".
    assert not re.search(r"%\S+:2 = stablehlo\.reduce\(", text)
    assert "stablehlo.sort" not in text
    reference = jax.jit(lambda x: jax.random.categorical(jax.random.key(0), truncate_sorted(x, 0.9, 5))).lower(args[0])
    assert re.search(r"%\S+:2 = stablehlo\.reduce\(", reference.as_text()) and "stablehlo.sort" in reference.as_text()
