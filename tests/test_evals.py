"""pass@k against brute force, and the evaluation runner on a scripted engine with known accuracy."""

import itertools
import json
import os

import numpy as np
import pytest

from conspo_jax.evals import evaluate, format_table, load_results, mean_pass_at_k, pass_at_k
from conspo_jax.evals.metrics import avg_at_k, report_ks
from conspo_jax.rewards import default_pool
from conspo_jax.rollout import MockEngine
from tests.conftest import SHARED_DATA


def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 10):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    # Large n stays finite and exact where the binomials would overflow a float.
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(1 - (1000 * 999 * 998) / (2000 * 1999 * 1998))
    assert avg_at_k([[1, 0, 0, 1], [0, 0, 0, 0]]) == 0.25
    assert mean_pass_at_k(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), 4) == 0.5
    assert report_ks(32) == [1, 2, 4, 8, 16, 32] and report_ks(6) == [1, 2, 4, 6] and report_ks(1) == [1]
    with pytest.raises(ValueError, match="need 1 <= k <= n, got k=5, n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="need 0 <= c <= n, got c=5, n=4"):
        pass_at_k(4, 5, 1)


class CharTokenizer:
    """Reversible stand-in tokenizer: one token per character (code point), id 1 is EOS."""

    eos_token_id = 1

    def encode(self, text):
        return [ord(ch) for ch in text]

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(t) for t in row if not (skip_special_tokens and t == 1)) for row in rows]


def scripted_engine(records_by_bench, num_correct):
    """A MockEngine whose sample s of problem p is right iff s < num_correct(p); a few samples are
    unboxed or truncated so every verdict path appears."""
    tok = CharTokenizer()
    index = {r["problem"]: (i, r["answer"]) for recs in records_by_bench.values() for i, r in enumerate(recs)}
    calls = []

    def script(prompt_ids, s):
        text = "".join(map(chr, prompt_ids))
        ((i, answer),) = [v for p, v in index.items() if text.startswith(p)]
        if s < num_correct(i):
            return tok.encode(f"Work... so the answer is $\\boxed{{{answer}}}$.") + [1]
        if s % 3 == 1:
            return tok.encode("I am not sure.") + [1]
        return tok.encode(f"\\boxed{{{answer}}} wait, no: \\boxed{{\\text{{wrong}}}}") + [1]

    engine = MockEngine(script=script)
    real_generate = engine.generate

    def generate(prompts, params):
        calls.append((len(prompts), params.n, params.seed, params.temperature, params.top_p, params.max_new_tokens))
        return real_generate(prompts, params)

    engine.generate = generate
    return engine, tok, calls


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason=f"shared data not found at {SHARED_DATA}")
def test_runner_scores_a_scripted_engine_exactly(tmp_path):
    from conspo_jax.data.math_data import load_benchmark

    recs = {
        "aime24": load_benchmark("aime24", SHARED_DATA, limit=5),
        "math500": load_benchmark("math500", SHARED_DATA, limit=5),
    }
    k_aime = 4
    num_correct = lambda i: i % (k_aime + 1)  # problem i has i of its 4 samples right
    engine, tok, calls = scripted_engine(recs, num_correct)
    pool = default_pool(2)
    out = evaluate(
        engine,
        tok,
        ["aime24", "math500"],
        out_dir=str(tmp_path),
        max_new_tokens=4096,
        k_overrides={"aime24": k_aime},
        data_dir=SHARED_DATA,
        limit=5,
        pool=pool,
        rows_per_call=8,
        label="scripted",
        progress=False,
    )
    aime, math = out["benchmarks"]["aime24"], out["benchmarks"]["math500"]

    correct_aime = np.array([[s < num_correct(i) for s in range(k_aime)] for i in range(5)])
    assert aime["metric"] == "avg@4" and aime["k"] == 4 and aime["num_problems"] == 5
    assert aime["score"] == pytest.approx(100 * correct_aime.mean()) == 50.0  # 10 of 20 samples
    for kk in (1, 2, 4):
        brute = np.mean([brute_pass_at_k(4, int(c), kk) for c in correct_aime.sum(1)])
        assert aime["pass_at_k"][str(kk)] == pytest.approx(100 * brute)
    correct_math = np.array([num_correct(i) > 0 for i in range(5)])
    assert math["metric"] == "pass@1" and math["num_problems"] == 5
    assert math["score"] == pytest.approx(100 * correct_math.mean()) == 80.0
    assert out["average"] == pytest.approx((aime["score"] + math["score"]) / 2)
    assert aime["no_box_frac"] == pytest.approx(
        np.mean([(not c) and s % 3 == 1 for c, s in zip(correct_aime.ravel(), np.tile(np.arange(4), 5))])
    )

    # Engine calls: the paper's sampling settings, 8 rows per call, the short last chunk padded.
    assert {c[3:] for c in calls} == {(0.6, 0.95, 4096)}
    assert [c[:2] for c in calls] == [(2, 4)] * 3 + [(5, 1)] and len({c[2] for c in calls}) == 4
    # Files: results.json equals the return value; one jsonl line per sample; the table.
    assert load_results(str(tmp_path)) == json.loads(json.dumps(out))
    lines = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert len(lines) == 5 * 4 + 5
    first = lines[0]
    assert (first["benchmark"], first["id"], first["sample"], first["answer"]) == ("aime24", "60", 0, "204")
    assert first["correct"] is False and first["verdict"] == "parsed" and first["extracted"] == "\\text{wrong}"
    ok = [x for x in lines if x["benchmark"] == "aime24" and x["id"] == recs["aime24"][1]["id"]]
    assert [x["correct"] for x in ok] == [True, False, False, False] and ok[0]["extracted"] == recs["aime24"][1][
        "answer"
    ]
    table = (tmp_path / "table.md").read_text()
    assert table == out["table"]
    header, _, row = table.splitlines()
    assert header == "| Method | AIME24 | AIME25 | AIME26 | HMMT25 | MATH500 | AMC | O-Bench | Avg. |"
    assert row == f"| scripted | {aime['score']:.1f} | - | - | - | {math['score']:.1f} | - | - | {out['average']:.1f} |"


def test_runner_owns_and_closes_its_pool_and_takes_records(tmp_path, monkeypatch):
    import conspo_jax.evals.runner as runner

    made = []

    class Recording(runner.RewardPool):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self, list(self.pids)))

    monkeypatch.setattr(runner, "RewardPool", Recording)
    recs = {
        "toy": [
            {"id": "a", "problem": "What is 6*7?", "answer": "42"},
            {"id": "b", "problem": "What is 1/2?", "answer": "\\frac{1}{2}"},
        ]
    }
    engine, tok, _ = scripted_engine(recs, lambda i: 1)
    out = evaluate(engine, tok, recs, out_dir=str(tmp_path), max_new_tokens=64, k_overrides=2, progress=False)
    assert out["benchmarks"]["toy"]["score"] == 50.0 and out["benchmarks"]["toy"]["column"] == "toy"
    ((pool, pids),) = made
    assert pool._closed and all(not os.path.exists(f"/proc/{p}") for p in pids)
    assert "| toy | Avg. |" in out["table"]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        evaluate(engine, tok, recs, out_dir=str(tmp_path), max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown benchmark 'aime99'"):
        evaluate(engine, tok, ["aime99"], out_dir=str(tmp_path), max_new_tokens=8)


def test_format_table_lines_up_rows_and_averages_filled_cells():
    t = format_table([("Base", {"AIME24": 20.9, "MATH500": 79.2}), ("Ours", {"AIME24": 34.7, "Minerva": 30.0})])
    assert t.splitlines() == [
        "| Method | AIME24 | AIME25 | AIME26 | HMMT25 | MATH500 | AMC | O-Bench | Minerva | Avg. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| Base | 20.9 | - | - | - | 79.2 | - | - | - | 50.0 |",
        "| Ours | 34.7 | - | - | - | - | - | - | 30.0 | 32.4 |",
    ]


def test_aime26_is_registered_avg_at_32_in_the_papers_column_order():
    from conspo_jax.data.math_data import benchmark_spec
    from conspo_jax.evals.report import PAPER_COLUMNS

    spec = benchmark_spec("aime26")
    assert (spec.files, spec.metric_k, spec.column) == (("aime26/test.jsonl",), 32, "AIME26")
    # Table 1's order: AIME24, AIME25, AIME26, HMMT25, MATH500, AMC, O-Bench.
    assert PAPER_COLUMNS == ("AIME24", "AIME25", "AIME26", "HMMT25", "MATH500", "AMC", "O-Bench")
    t = format_table([("m", {"HMMT25": 1.0, "AIME26": 3.0, "AIME24": 2.0})])
    assert t.splitlines()[0].split(" | ")[1:4] == ["AIME24", "AIME25", "AIME26"]
    assert t.splitlines()[2] == "| m | 2.0 | - | 3.0 | 1.0 | - | - | - | 2.0 |"
