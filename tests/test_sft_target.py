"""sft.target_pass: the warm start stops at a pass rate, not a step count, so seeds start RL alike."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from conspo_jax.base.configs import UsageError, load_config_module
from conspo_jax.run import build
from conspo_jax.train import sft

SMOKE = os.path.join(os.path.dirname(__file__), "..", "experiments", "arith_tiny.py")


def _parts(seed=0):
    c = load_config_module(f"{SMOKE}:smoke")
    c.seed = seed
    tok = build.build_tokenizer(c)
    task = build.build_task(c, tok)
    policy = build.build_policy(c, tok, None, seed=seed)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    return c, tok, task, graphdef, params, rest


def _run(parts, **kw):
    c, tok, task, graphdef, params, rest = parts
    width = c.data.max_prompt_len + c.rollout.max_new_tokens
    return sft.warm_start(
        graphdef, params, rest, task.train_records, task.encode, task.sft_target, tok,
        lr=3e-3, batch_size=32, warmup_steps=5, seed=c.seed, width=width, **kw,
    )  # fmt: skip


def _probe_rate(parts, params, n=512):
    c, tok, task, graphdef, _, rest = parts
    width = c.data.max_prompt_len + c.rollout.max_new_tokens
    ids, attn, tmask = sft.encode_sft(task.train_records[:n], task.encode, task.sft_target, tok, width)
    return float(sft._pass_rate(params, graphdef, rest, ids, attn, tmask))


def test_stops_at_the_first_check_past_the_target_and_reports_it():
    parts = _parts()
    start = _probe_rate(parts, parts[4])
    assert start < 0.005  # random weights: the target is far away
    params, done, rate = _run(parts, steps=400, target_pass=0.02, check_every=5)
    assert done < 400 and done % 5 == 0, (done, rate)
    assert rate >= 0.02 and abs(_probe_rate(parts, params) - rate) < 1e-5
    # the check before the stop had not reached the target: it stopped at the first check that did
    _, done_before, rate_before = _run(_parts(), steps=done - 5, target_pass=0.02, check_every=5)
    assert done_before == done - 5 and rate_before < 0.02


def test_without_a_target_every_step_runs_and_the_cap_holds():
    _, done, rate = _run(_parts(), steps=30)
    assert done == 30 and np.isnan(rate)
    _, done, rate = _run(_parts(), steps=10, target_pass=0.99, check_every=5)
    assert done == 10 and rate < 0.99


def test_the_target_is_part_of_the_cache_fingerprint_and_validated():
    c = load_config_module(f"{SMOKE}:smoke")
    off = sft._fingerprint(c)
    assert "target_pass" not in off["sft"]  # caches made before the key existed stay valid
    assert "eval" not in off["data"]  # likewise data.eval, at its off value ''
    c.data.eval = "gsm8k"
    assert sft._fingerprint(c)["data"]["eval"] == "gsm8k"
    c.data.eval = ""
    # a stamp saved while the key was written at its off value matches too
    saved = json.loads(json.dumps(off))
    saved["data"]["eval"] = ""
    assert sft._without_off_keys(saved) == off
    c.sft.target_pass = 0.3
    on = sft._fingerprint(c)
    assert on["sft"]["target_pass"] == 0.3 and on != off
    c.sft.target_pass = 1.0
    with pytest.raises(UsageError, match="sft.target_pass"):
        build.validate(c)
    assert json.dumps(on)  # written to fingerprint.json as is
