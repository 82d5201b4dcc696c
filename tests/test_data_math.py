"""Loaders on every shared data file (row count, first record) and the paper's prompt."""

import json
import os

import pytest

from conspo_jax.data import files
from conspo_jax.data import math_data as md
from conspo_jax.data.prompts import INSTRUCTION, build_prompt, encode_prompt
from tests.conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason=f"shared data not found at {SHARED_DATA}")

# name -> (rows, first id, first answer, start of first problem)
REGISTRY_CASES = {
    "math500": (500, "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)", "Convert the point $(0,3)$"),
    "aime24": (30, "60", "204", "Every morning Aya goes for a $9$-kilometer-long walk"),
    "aime25": (30, "0", "70", "Find the sum of all integer bases $b>9$"),
    "aime26": (30, "2026-I-1", "277", "Patrick started walking at a constant rate"),
    "amc23": (40, "0", "27", "Cities $A$ and $B$ are $45$ miles apart."),
    "amc": (83, "0", "142", "$\\frac{m}{n}$ is the Irreducible fraction value"),
    "hmmt25": (30, "0", "103", "Compute the sum of the positive divisors (including $1$) of $9!$"),
    "olympiadbench": (675, "1606", "2", "Xenia and Sergey play the following game."),
    "minerva": (272, "0", "1.6", "Each of the two Magellan telescopes has a diameter"),
    "gsm8k": (1319, "0", "18", "Janet\u2019s ducks lay 16 eggs per day."),
    "gsm8k_train": (7473, "0", "72", "Natalia sold clips to 48 of her friends in April"),
    "dapo_math_17k": (17917, "0", "34", "In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$"),
    "deepscaler_aime": (975, "0", "60", "Let $x$, $y$ and $z$ all exceed $1$"),
    "deepscaler_math": (7470, "0", "0", "Let \\[f(x) = \\left\\{"),  # 4 of 7474 rows have no answer
    "deepscaler": (8445, "aime/0", "60", "Let $x$, $y$ and $z$ all exceed $1$"),
}


@needs_data
@pytest.mark.parametrize("name", list(REGISTRY_CASES))
def test_load_benchmark(name):
    rows, first_id, first_answer, prefix = REGISTRY_CASES[name]
    recs = md.load_benchmark(name, data_dir=SHARED_DATA)
    assert len(recs) == rows
    assert set(recs[0]) == {"id", "problem", "answer"}
    assert (recs[0]["id"], recs[0]["answer"]) == (first_id, first_answer)
    assert recs[0]["problem"].startswith(prefix)
    assert all(isinstance(r["answer"], str) and r["answer"] for r in recs)
    assert len({r["id"] for r in recs}) == rows, "ids must be unique"
    # No source instruction survives: our prompt adds the paper's own.
    assert not any("Please reason step by step" in r["problem"] or "Answer: $Answer" in r["problem"] for r in recs)


@needs_data
def test_set_specific_normalisation():
    hmmt = md.load_benchmark("hmmt25", data_dir=SHARED_DATA)
    assert hmmt[0]["problem"].endswith("that have units digit $1$.")
    raw = json.loads(open(os.path.join(SHARED_DATA, "hmmt_feb_2025/hmmt25.jsonl")).readline())
    assert raw["prompt"].endswith("within \\boxed{}.")
    assert md.load_benchmark("hmmt25", data_dir=SHARED_DATA)[2]["answer"] == "\\frac{1}{576}"
    obench = md.load_benchmark("olympiadbench", data_dir=SHARED_DATA)
    # A multi-answer final_answer list keeps its LaTeX; the verifier strips the $ (tests/test_rewards.py).
    assert obench[13]["id"] == "1664" and obench[13]["answer"] == "$69$,$84$"
    assert md.load_benchmark("olympiad", data_dir=SHARED_DATA, limit=3) == obench[:3]  # alias + limit


# Files not covered by a registry name, read through the generic loader.
FILE_CASES = {
    "aime24/dapo_aime-2024.parquet": (960, "2", "540", "Find the largest possible real part"),  # DAPO wrapper gone
    "aime24/deepscaler_aime.json": (30, "0", "204", "Every morning Aya"),
    "math500/deepscaler_math.json": (
        500,
        "test/precalculus/807.json",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "Convert",
    ),
    "minerva_math/deepscaler_minerva.json": (272, "9", "9.6", "If the Bohr energy levels scale as $Z^{2}$"),
    "olympiadbench/deepscaler_olympiad_bench.json": (675, "1606", "2", "Xenia and Sergey"),
}


@needs_data
@pytest.mark.parametrize("rel", list(FILE_CASES))
def test_load_records_generic(rel):
    rows, first_id, first_answer, prefix = FILE_CASES[rel]
    recs = md.load_records(os.path.join(SHARED_DATA, rel))
    assert len(recs) == rows
    assert (recs[0]["id"], recs[0]["answer"]) == (first_id, first_answer)
    assert recs[0]["problem"].startswith(prefix)


def test_load_records_formats_and_errors(tmp_path):
    rows = [
        {"question": "What is 1+1?", "final_answer": ["$2$"], "idx": 7},
        {
            "prompt": [
                {"role": "system", "content": "sys"},
                {
                    "role": "user",
                    "content": "Solve the following math "
                    "problem step by step. The last line of your response should be of the form Answer: $Answer (without "
                    "quotes) where $Answer is the answer to the problem.\n\nFind x.\n\nRemember to put your answer on its "
                    'own line after "Answer:".',
                },
            ],
            "reward_model": {"ground_truth": "3"},
        },
        {"problem": "Q", "solution": "so \\boxed{\\frac{1}{2}}."},
        {"problem": "Q2", "answer": 27.0},
    ]
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    recs = md.load_records(str(p))
    assert recs == [
        {"id": "7", "problem": "What is 1+1?", "answer": "$2$"},
        {"id": "1", "problem": "Find x.", "answer": "3"},
        {"id": "2", "problem": "Q", "answer": "\\frac{1}{2}"},
        {"id": "3", "problem": "Q2", "answer": "27"},
    ]
    j = tmp_path / "x.json"
    j.write_text(json.dumps(rows))
    assert md.load_records(str(j)) == recs
    c = tmp_path / "x.csv"
    c.write_text("problem,answer\nWhat is 2+2?,4\n")
    assert md.load_records(str(c)) == [{"id": "0", "problem": "What is 2+2?", "answer": "4"}]
    assert md.load_benchmark(str(c)) == md.load_records(str(c))  # a path works where a name does
    assert md.load_dataset_spec(str(c)) == md.load_records(str(c))
    assert md.load_dataset_spec(str(c.rename(tmp_path / "x.txt")), fmt="csv")[0]["answer"] == "4"
    with pytest.raises(ValueError, match="dataset 'nope' is neither a known name"):
        md.load_dataset_spec("nope")
    custom = tmp_path / "y.jsonl"
    custom.write_text(json.dumps({"q": "Z?", "meta": {"gt": "5"}}))
    assert md.load_records(str(custom), problem_field="q", answer_field="meta.gt")[0]["answer"] == "5"

    with pytest.raises(files.MissingAnswerError, match=r"y.jsonl row 0: no answer field"):
        md.load_records(str(custom), problem_field="q")
    with pytest.raises(ValueError, match="row 0: no problem field"):
        md.load_records(str(custom))
    with pytest.raises(files.DataError, match="CONSPO_DATA_DIR"):
        md.load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="format must be one of"):
        md.load_records(str(p), format="xml")
    with pytest.raises(ValueError, match="unknown benchmark 'aime99'"):
        md.load_benchmark("aime99")


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(files.DATA_DIR_ENV, str(tmp_path))
    assert files.default_data_dir() == str(tmp_path)
    (tmp_path / "aime25").mkdir()
    (tmp_path / "aime25" / "test.jsonl").write_text(json.dumps({"problem": "P", "answer": 5, "id": "a"}) + "\n")
    assert md.load_benchmark("aime25") == [{"id": "a", "problem": "P", "answer": "5"}]
    monkeypatch.delenv(files.DATA_DIR_ENV)
    assert files.default_data_dir().endswith(os.path.join("shared", "data"))


def test_load_hf_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the 'datasets' package"):
            md.load_hf("HuggingFaceH4/MATH-500")
    else:
        pytest.skip("datasets is installed; the hub itself is unreachable here")


def test_build_prompt_plain_and_chat():
    assert (
        build_prompt("What is 1+1?") == "What is 1+1? Let's think step by step and output the final answer "
        "within \\boxed{}."
    )
    with pytest.raises(ValueError, match="problem must be a non-empty string"):
        build_prompt("  ")

    from conspo_jax.data.arith import build_arith_tokenizer

    tok = build_arith_tokenizer()
    plain_ids = encode_prompt("1+2", tok)
    assert plain_ids == tok.encode(build_prompt("1+2"))
    tok.chat_template = (
        "{% for m in messages %}<bos>Q:{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
    )
    text = build_prompt("1+2", tok)
    assert text == f"<bos>Q:1+2 {INSTRUCTION} A:"
    ids = encode_prompt("1+2", tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS only
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
