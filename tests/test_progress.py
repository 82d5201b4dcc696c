"""Long work shows progress: the embedded engine's generation bar (samples done, tokens/s, ETA) appears for a
call that outlasts ``progress_after_s`` and never for one that doesn't; the trainer's first line names the run
before anything slow starts."""

import os

import jax.numpy as jnp
import pytest

from conspo_jax.base.configs import load_config_module
from conspo_jax.models import get_model_config, init_policy
from conspo_jax.rollout import SamplingParams
from conspo_jax.rollout.jax_engine import JaxEngine

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "arith_tiny.py:smoke")


def _engine(progress_after_s):
    pol = init_policy(get_model_config("tiny-qwen2"), seed=0, dtype=jnp.float32)
    eng = JaxEngine(pol, eos_token_ids=[2], prompt_bucket=8, cache_dtype=jnp.float32, progress_after_s=progress_after_s)
    eng.decode_rows, eng.decode_chunk, eng.decode_min_rows = 4, 4, 2
    eng.decode_compiler_options = {"xla_backend_optimization_level": 0}
    return eng


PROMPTS = [[5, 9, 11], [17, 3], [100, 4, 4]]
PARAMS = SamplingParams(n=3, max_new_tokens=12, temperature=1.0, seed=0)


def test_generation_bar_counts_samples_and_reports_a_rate(capsys):
    out = _engine(0.0).generate(PROMPTS, PARAMS)
    err = capsys.readouterr().err
    assert "generate" in err and "tok/s" in err, err
    # the bar ends at the call's sample count (9 pairs on 4 rows: refills update it chunk by chunk)
    assert f"{out.num_rows}/{out.num_rows}" in err, err


def test_short_calls_and_engines_without_progress_stay_silent(capsys):
    quiet = _engine(None).generate(PROMPTS, PARAMS)
    delayed = _engine(600.0).generate(PROMPTS, PARAMS)
    assert "generate" not in capsys.readouterr().err
    assert quiet.completions() == delayed.completions()  # the hook does not touch what is sampled


@pytest.mark.parametrize("bar", [True, False])
def test_the_config_turns_the_training_bars_on_and_off(bar):
    from conspo_jax.run import build

    c = load_config_module(SMOKE)
    c.train.progress_bar = bar
    tok = build.build_tokenizer(c)
    pol = build.build_policy(c, tok, None, seed=0)
    assert build.make_engine(c, pol, tok).progress_after_s == (5.0 if bar else None)
