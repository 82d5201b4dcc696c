"""The overlapped pipeline (rollout.async_steps=1): step t+1's rollouts are generated while step t
trains, every rollout is one weight version old, resume is exact, and the sidecar path overlaps too."""

import os
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from conspo_jax.base.configs import UsageError, load_config_module
from conspo_jax.train import Trainer, train
from conspo_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"


@pytest.fixture(scope="module")
def warm_cache(smoke_warm_cache):
    return smoke_warm_cache  # the 200-step warm start (conftest.py), shared with other modules


def _config(warm_cache, *, async_steps=1, **train_kw):
    c = load_config_module(SMOKE)
    c.train.progress_bar = False
    c.train.num_steps = 5
    c.train.ckpt_every = 2
    c.eval.at_start = False
    c.eval.every = 0
    c.sft.cache_dir = warm_cache
    c.sft.steps = 200
    c.rollout.async_steps = async_steps
    c.rollout.tis_cap = 2.0
    c.optim.warmup_steps = 0  # the first update moves the weights, so step 2's rollouts are visibly stale
    for k, v in train_kw.items():
        c.train[k] = v
    return c


def _rows(workdir):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(workdir)]


def _params(workdir):
    return load_file(os.path.join(workdir, "hf", "model.safetensors"))


def test_async_rollouts_are_one_version_old_and_resume_exactly(warm_cache, tmp_path):
    full, split, sync = str(tmp_path / "full"), str(tmp_path / "split"), str(tmp_path / "sync")
    train(_config(warm_cache), full)
    rows = _rows(full)
    # Step 1 samples with the starting weights; every later step with the previous step's weights.
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 1.0]
    # Orbax keeps the checkpoints of steps 4 and 5 (keep_ckpts=2); step 2's batch went with its checkpoint,
    # and the last step has nothing in flight.
    assert sorted(os.listdir(os.path.join(full, "inflight"))) == ["step_4.p0.npz"]

    train(_config(warm_cache, stop_after=2), split)  # stops right after the step-2 checkpoint
    train(_config(warm_cache), split)
    assert _rows(split) == rows
    a, b = _params(full), _params(split)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # The same seed without overlap: step 1 is the same draws from the same weights, and from step 2 on
    # the overlapped run's engine log-probs come from the weights one update behind the trainer's.
    train(_config(warm_cache, async_steps=0), sync)
    srows = _rows(sync)
    assert srows[0] == rows[0]
    assert all(r["rollout/staleness"] == 0.0 for r in srows)
    # Only a step after one that moved the weights samples from other weights; which steps do depends on the
    # processor's rounding (one had no mixed group under SSE4_2 code generation), so this is an implication.
    for prev, s, r in zip(rows[:-1], srows[1:], rows[1:], strict=True):
        if prev["grad_norm"] > 0:
            assert r["rollout/logp_mismatch"] > 10 * s["rollout/logp_mismatch"] + 1e-6, (s, r)


def test_next_batch_is_collected_while_the_update_runs(warm_cache, tmp_path):
    """The producer starts step t+1's collect before step t's update returns."""
    trainer = Trainer(_config(warm_cache, num_steps=3), str(tmp_path / "run"))
    events, lock = [], threading.Lock()
    collect, update = trainer.collect, trainer.update

    def traced_collect(step):
        with lock:
            events.append(("collect", step, threading.current_thread().name))
        return collect(step)

    def traced_update(minis, step):
        with lock:
            events.append(("update start", step, None))
        out = update(minis, step)
        with lock:
            events.append(("update end", step, None))
        return out

    trainer.collect, trainer.update = traced_collect, traced_update
    try:
        trainer.run()
    finally:
        trainer.close()
    order = [e[:2] for e in events]
    for step in (0, 1):
        # collect(step+1) is submitted before update(step) starts and never after it ends
        assert order.index(("collect", step + 1)) < order.index(("update end", step)), order
    assert all(name.startswith("rollouts") for kind, step, name in events if kind == "collect" and step > 0)


def test_a_stale_batch_is_refused(warm_cache, tmp_path):
    trainer = Trainer(_config(warm_cache, num_steps=3), str(tmp_path / "run"))
    try:
        rb = trainer.collect(0)
        trainer.check_staleness(rb, 0)
        rb.step = 2
        with pytest.raises(RuntimeError, match="collected for step 2"):
            trainer.check_staleness(rb, 0)
        rb.step, rb.rollouts.weight_version = 3, 0  # 3 versions old with a bound of 1
        with pytest.raises(RuntimeError, match="3 versions old, over the bound of 1"):
            trainer.check_staleness(rb, 3)
    finally:
        trainer.close()


def test_async_steps_other_than_0_or_1_is_a_usage_error(warm_cache, tmp_path):
    with pytest.raises(UsageError, match=r"rollout\.async_steps"):
        Trainer(_config(warm_cache, async_steps=2), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_async_over_the_sidecar_matches_the_embedded_engine(warm_cache, tmp_path):
    """With the sidecar the next batch streams while the trainer updates: the same one-step-off
    schedule, so every metric equals the embedded overlapped run's (token-identical rollouts)."""
    from conspo_jax.sidecar.options import SidecarOptions
    from conspo_jax.sidecar.server import serve

    def config():
        c = _config(warm_cache, num_steps=3)
        c.sft.steps = 0  # the sidecar starts from the same seeded random init as the trainer
        return c

    train(config(), str(tmp_path / "embedded"))
    c = config()
    srv = serve(c, engine_name="jax", options=SidecarOptions(weights_dir=str(tmp_path / "w"), workers=0))
    try:
        c.rollout.backend = "sidecar"
        c.rollout.sidecar.address = srv.target
        c.rollout.sidecar.weights_dir = str(tmp_path / "w")
        train(c, str(tmp_path / "sidecar"))
    finally:
        srv.stop(grace=0)
    emb, side = _rows(str(tmp_path / "embedded")), _rows(str(tmp_path / "sidecar"))
    assert [r["rollout/staleness"] for r in side] == [0.0, 1.0, 1.0]
    for a, b in zip(emb, side, strict=True):
        assert b.keys() - a.keys() == {"sync/bytes"}  # only a sidecar moves weight bytes
        assert a.keys() <= b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k, a[k], b[k])
