"""DAPO's dynamic sampling and overlong shaping in the trainer's collect stage, and the Figure 1 credit dump."""

import os

import numpy as np
import pytest

from conspo_jax.base.configs import UsageError, load_config_module
from conspo_jax.rollout import MockEngine
from conspo_jax.run.validation import validate_config
from conspo_jax.train import train
from conspo_jax.train.collect import Round, dynamic_batch, gather_groups, round_seed
from conspo_jax.train.diagnostics import DUMP_FIELDS, credits
from conspo_jax.train.metrics import read_metrics
from conspo_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"


def _round(rewards_GxN, tag):
    g, n = np.shape(rewards_GxN)
    ids = np.arange(g * n * 3, dtype=np.int32).reshape(g * n, 3) + 1000 * tag
    from conspo_jax.rollout import Rollouts

    ro = Rollouts(
        ids,
        np.full(g * n, 3, np.int32),
        -np.ones((g * n, 3), np.float32),
        ["stop"] * (g * n),
        np.repeat(np.arange(g), n),
    )
    recs = [{"id": f"{tag}-{k}"} for k in range(g)]
    return Round(recs, [[tag, k] for k in range(g)], ro, np.asarray(rewards_GxN, np.float32).reshape(-1))


def test_dynamic_batch_keeps_varied_groups_in_order_and_pads_at_the_cap():
    r0 = _round([[1, 1], [0, 1], [0, 0], [1, 0]], 0)
    r1 = _round([[0, 0], [1, 0], [1, 1], [0, 1]], 1)
    picks, mask, stats = dynamic_batch([r0], target_groups=3, n=2)
    # One round only (the cap): two varied groups, then the first dropped group as masked padding.
    assert picks == [(0, 1), (0, 3), (0, 0)] and mask.tolist() == [1, 1, 1, 1, 0, 0]
    assert stats == {"rollout/sampling_rounds": 1.0, "rollout/dropped_frac": 0.5, "rollout/padded_groups": 1.0}
    picks, mask, stats = dynamic_batch([r0, r1], target_groups=3, n=2)
    assert picks == [(0, 1), (0, 3), (1, 1)] and mask.all() and stats["rollout/padded_groups"] == 0
    records, prompts, ro, rewards = gather_groups([r0, r1], picks, 2)
    assert [r["id"] for r in records] == ["0-1", "0-3", "1-1"] and prompts == [[0, 1], [0, 3], [1, 1]]
    assert rewards.tolist() == [0, 1, 1, 0, 1, 0] and ro.group_ids_R.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(ro.completion_ids_RxC[4:], r1.rollouts.completion_ids_RxC[2:4])  # round 1, group 1


class VariedByIdEngine(MockEngine):
    """Verifies like the sidecar: a prompt whose id number is a multiple of ``every`` gets mixed rewards, the
    others all 1. Records the seed of every call."""

    def __init__(self, every):
        super().__init__(vocab_high=20)
        self.every, self.seeds, self.ids = every, [], []

    def generate(self, prompts, params, *, answers=None, prompt_ids=None):
        self.seeds.append(params.seed)
        self.ids += list(prompt_ids)
        out = super().generate(prompts, params)
        varied = [int(i.rsplit("-", 1)[1]) % self.every == 0 for i in prompt_ids]
        out.rewards_R = np.array(
            [float(k % 2 == 0) if varied[g] else 1.0 for g in range(len(prompts)) for k in range(params.n)], np.float32
        )
        return out


def _config(**rollout):
    c = load_config_module(SMOKE)
    c.objective.name = "dapo"
    c.sft.steps = 0
    c.eval.at_start, c.eval.every = False, 0
    c.train.progress_bar = False
    for k, v in rollout.items():
        c.rollout[k] = v
    return c


@pytest.mark.parametrize("cap", [10, 2])
def test_collect_refills_the_batch_with_varied_groups_up_to_the_round_cap(tmp_path, cap):
    trainer = Trainer(_config(max_sampling_rounds=cap, overlong_buffer=4), str(tmp_path))
    try:
        trainer.engine = VariedByIdEngine(every=4)
        rb = trainer.collect(3)
        ppg, n, s = 8, 4, rb.stats
        rounds = int(s["rollout/sampling_rounds"])
        assert len(trainer.engine.seeds) == rounds and trainer.data_iter.get_state()["next_index"] == rounds
        assert trainer.engine.seeds == [round_seed(trainer.state.rng, 3, k) for k in range(rounds)]
        assert len(set(trainer.engine.seeds)) == rounds  # every round samples afresh
        ids = [int(r["id"].rsplit("-", 1)[1]) for r in rb.records]
        real = int(ppg - s["rollout/padded_groups"])
        assert len(rb.records) == ppg and all(i % 4 == 0 for i in ids[:real]) and all(i % 4 for i in ids[real:])
        np.testing.assert_array_equal(rb.rollout_mask_R, np.repeat(np.arange(ppg) < real, n))
        # Each group keeps its own verifier rewards (mixed for the kept groups, all-ones for the padding), and
        # DAPO's Eq. 13 is added on the gathered lengths: L_max = 8, L_cache = 4.
        raw = np.where(np.repeat(np.arange(ppg) < real, n), np.tile([1.0, 0.0, 1.0, 0.0], ppg), 1.0)
        lens = rb.rollouts.completion_lens_R
        np.testing.assert_allclose(rb.rewards_R, raw - np.clip(lens - 4, 0, 4) / 4, rtol=1e-6)
        assert (lens > 4).any()
        varied = sum(int(i.rsplit("-", 1)[1]) % 4 == 0 for i in trainer.engine.ids)  # surplus ones are not dropped
        assert s["rollout/dropped_frac"] == pytest.approx(1 - varied / (rounds * ppg))
        if cap == 10:
            assert real == ppg and rounds > 1
        else:
            assert rounds == 2 and real < ppg  # about 1 in 4 prompts is varied: 2 rounds of 8 cannot fill 8
        batch = trainer.make_batches(rb)[0]
        np.testing.assert_array_equal(batch.rollout_mask.reshape(-1), rb.rollout_mask_R)
    finally:
        trainer.close()


def test_rollout_keys_are_validated_naming_key_and_value():
    for key, value, match in [
        ("dynamic_sampling", "yes", "rollout.dynamic_sampling must be one of"),
        ("max_sampling_rounds", 0, "rollout.max_sampling_rounds must be >= 1, got 0"),
        ("oversample", 0, "rollout.oversample must be >= 1, got 0"),
        ("overlong_buffer", -2, "rollout.overlong_buffer must be >= 0 or -1, got -2"),
        ("overlong_buffer", 9, "rollout.overlong_buffer=9 must be at most rollout.max_new_tokens=8"),
        ("overlong_penalty", -1.0, "rollout.overlong_penalty must be >= 0.0, got -1.0"),
    ]:
        with pytest.raises(UsageError, match=match):
            validate_config(_config(**{key: value}), check_paths=False)


def _eq9_eq12(scores, rewards, gids, tau, margin):
    """Lemma 1 and Lemma 2 per group, written out in numpy."""
    g_grpo, g_conspo = np.zeros(len(scores)), np.zeros(len(scores))
    for k in np.unique(gids):
        idx = np.flatnonzero(gids == k)
        pos, neg = idx[rewards[idx] > 0.5], idx[rewards[idx] <= 0.5]
        if not len(pos) or not len(neg):
            continue
        p = len(pos) / len(idx)
        g_grpo[pos], g_grpo[neg] = np.sqrt(p * (1 - p)) / len(pos), -np.sqrt(p * (1 - p)) / len(neg)
        e_pos, e_neg = np.exp((scores[pos] - margin) / tau), np.exp(scores[neg] / tau)
        z = e_pos + e_neg.sum()
        g_conspo[pos] = (1 - e_pos / z) / len(pos)
        g_conspo[neg] = -(e_neg[None, :] / z[:, None]).sum(0) / len(pos)
    return g_grpo, g_conspo


def test_credits_match_lemma_1_and_lemma_2():
    rng = np.random.default_rng(0)
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0], np.float32)  # group 1 all-positive: no credit
    gids = np.repeat(np.arange(3), 4)
    mask = np.ones(12, np.float32)
    mask[-1] = 0  # a padding rollout
    scores = -rng.uniform(0.1, 2.0, 12).astype(np.float32)
    out = credits(scores, rewards, gids, mask, 3, tau=0.7, margin=0.05)
    real = mask > 0
    want_grpo, want_conspo = _eq9_eq12(scores[real], rewards[real], gids[real], 0.7, 0.05)
    np.testing.assert_allclose(out["credit_grpo_R"][real], want_grpo, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["credit_conspo_R"][real], want_conspo, rtol=1e-5, atol=1e-7)
    assert out["valid_R"].tolist() == [True] * 4 + [False] * 4 + [True] * 3 + [False]
    assert out["gap_R"][0] == pytest.approx(scores[0] - scores[1:3].mean())  # positive vs mean negative
    assert out["gap_R"][9] == pytest.approx(scores[9] - scores[[8, 10]].mean())  # the padding row 11 is left out
    assert out["gap_R"][10] == pytest.approx(scores[10] - scores[9])  # negative vs mean positive
    assert np.isnan(out["gap_R"][4:8]).all() and not out["credit_conspo_R"][4:8].any()


def test_tiny_dapo_run_samples_dynamically_shapes_rewards_and_dumps_credits(tmp_path):
    c = load_config_module(SMOKE)
    c.objective.name = "dapo"
    c.train.num_steps, c.train.diagnostics_every = 2, 1
    c.eval.at_start, c.eval.every = False, 0
    c.train.progress_bar, c.train.export_hf = False, False
    c.rollout.overlong_buffer = 4  # answers are ~5 tokens of 8: some fall in the buffer
    train(c, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if r["step"] > 0]
    assert len(rows) == 2
    for r in rows:
        assert 1 <= r["rollout/sampling_rounds"] <= 10 and 0 <= r["rollout/dropped_frac"] <= 1
        assert r["rollout/overlong_penalty_mean"] < 0  # lengths 5..8 against L_max - L_cache = 4
    for step in (1, 2):
        z = np.load(tmp_path / "diagnostics" / f"step_{step}.npz")
        assert set(z.files) == set(DUMP_FIELDS) and int(z["step"]) == step and str(z["objective"]) == "dapo"
        rows_r = 8 * 4  # prompts_per_step x n of the smoke config
        assert all(z[k].shape == (rows_r,) for k in DUMP_FIELDS if k.endswith("_R"))
        valid = z["valid_R"]
        assert valid.any() and np.all(z["scores_R"] <= 0)
        # The dump's credits are Lemma 1 / 2 on its own scores and (shaped) rewards.
        g, s = z["group_ids_R"][valid], z["scores_R"][valid]
        want_grpo, want_conspo = _eq9_eq12(s, z["rewards_R"][valid], g, float(z["tau"]), float(z["margin"]))
        np.testing.assert_allclose(z["credit_grpo_R"][valid], want_grpo, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(z["credit_conspo_R"][valid], want_conspo, rtol=1e-4, atol=1e-6)
