"""The math verifier against a table of equivalent / wrong / malformed / adversarial answers."""

import time

import numpy as np
import pytest

from conspo_jax.rewards import default_pool, extract_boxed, math_reward, math_reward_batch, normalize_answer
from conspo_jax.rewards.extract import ground_truth_answer, quick_verdict

B = "The answer is \\boxed{%s}."

# (response, ground truth, expected reward)
EQUIVALENT = [
    (B % "\\frac{1}{2}", "0.5", 1.0),
    (B % "0.5", "\\frac{1}{2}", 1.0),
    (B % "1/2", "\\frac12", 1.0),
    (B % "\\dfrac{3}{4}", "\\frac{3}{4}", 1.0),
    (B % "\\tfrac{3}{4}", "0.75", 1.0),
    (B % "\\frac{2}{4}", "\\frac{1}{2}", 1.0),
    (B % "12\\frac{1}{2}", "12.5", 1.0),
    (B % "\\sqrt{12}", "2\\sqrt{3}", 1.0),
    (B % "\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    (B % "11\\sqrt{2}", "11\\sqrt2", 1.0),
    (B % "\\sqrt[3]{8}", "2", 1.0),
    (B % "2 \\pi", "2\\pi", 1.0),
    (B % "\\frac{\\pi}{2}", "\\dfrac{\\pi}{2}", 1.0),
    (B % "(1,3]", "(1, 3]", 1.0),
    (B % "(-\\infty,0)", "(-\\infty, 0)", 1.0),
    (B % "[2,5)", "x \\in [2, 5)", 1.0),
    (B % "\\{2,1\\}", "\\{1,2\\}", 1.0),
    (B % "5, 3", "3, 5", 1.0),
    (B % "x=1 \\text{ or } x=2", "1, 2", 1.0),
    (B % "\\left(3,\\frac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    (B % "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0),
    (B % "30^\\circ", "30", 1.0),
    (B % "30^{\\circ}", "30^\\circ", 1.0),
    (B % "30°", "30", 1.0),  # our normalisation: unicode degree sign
    (B % "70 \\text{ degrees}", "70", 1.0),
    (B % "10\\%", "10", 1.0),
    (B % "10\\%", "0.1", 1.0),
    (B % "25", "25\\%", 1.0),
    (B % "5 \\text{ cm}", "5", 1.0),
    (B % "5\\,\\mathrm{cm}^2", "5", 1.0),
    (B % "12 \\text{ inches}", "12", 1.0),
    (B % "5", "5\\text{ cm}", 1.0),
    (B % "\\$5.00", "5", 1.0),
    (B % "\\text{Evelyn}", "\\text{Evelyn}", 1.0),
    (B % "Evelyn", "\\text{Evelyn}", 1.0),
    (B % "C", "\\text{(C)}", 1.0),
    (B % "\\textbf{(B)}", "B", 1.0),
    (B % "-3", "-3", 1.0),
    (B % "−3", "-3", 1.0),  # our normalisation: unicode minus
    (B % "1,000,000", "1000000", 1.0),
    (B % "1{,}000{,}000", "1000000", 1.0),
    (B % "1\\,000", "1000", 1.0),  # our normalisation: thin-space thousands separator
    (B % "1234", "1,234", 1.0),
    (B % "23", "023", 1.0),
    (B % "27", 27.0, 1.0),  # AMC stores floats
    (B % "70", 70, 1.0),  # AIME25 stores ints
    (B % "4.0", "4", 1.0),
    (B % "5.", "5", 1.0),  # our normalisation: sentence period inside the box
    (B % "(x+1)^2", "x^2+2x+1", 1.0),
    (B % "y=2x+1", "2x+1", 1.0),
    (B % "x = 3", "3", 1.0),
    (B % "i+1", "1+i", 1.0),
    (B % "2^{10}", "1024", 1.0),
    (B % "\\varnothing", "\\emptyset", 1.0),  # our normalisation
    (B % "1 \\text{ and } 2", "1,2", 1.0),
    (B % "\\text{north}", "North", 1.0),  # our normalisation: a bare-word ground truth is text
    (B % "East", "\\text{east}", 1.0),
    (B % "North", "North", 1.0),
    (B % "864 \\text{ square inches}", "864 \\mbox{ inches}^2", 1.0),
    ("$\\fbox{204}$ minutes", "204", 1.0),
    ("so the answer is $\\boxed 7$.", "7", 1.0),
    ("\\boxed{5}", "$\\boxed{5}$", 1.0),
    ("\\boxed{\\frac{1}{576}}", "$\\frac{1}{576}$", 1.0),
    ("\\boxed{69, 84}", "$69$,$84$", 1.0),  # OlympiadBench multi-answer ground truth
]

WRONG = [
    (B % "-3", "3", 0.0),
    (B % "24", "023", 0.0),
    (B % "[1,3]", "(1, 3]", 0.0),
    (B % "(2, 1)", "(1,2)", 0.0),
    (B % "0.33", "\\frac{1}{3}", 0.0),
    (B % "3.14", "\\pi", 0.0),
    (B % "4.0001", "4", 0.0),
    (B % "\\text{No}", "\\text{Yes}", 0.0),
    (B % "\\text{(D)}", "\\text{(C)}", 0.0),
    (B % "x^2+1", "x^2-1", 0.0),
    (B % "\\sqrt{2}", "2", 0.0),
    (B % "10\\%", "10\\%0", 0.0),
    (B % "\\text{odd}", "\\text{even}", 0.0),
    (B % "\\tan x", "\\cot x", 0.0),
    (B % "\\text{south}", "North", 0.0),
]

STRUCTURE = [
    ("I think the answer is 42.", "42", 0.0),  # no box: nothing to grade
    ("\\boxed{}", "0", 0.0),  # empty box
    ("first \\boxed{41} then, correcting myself, \\boxed{42}", "42", 1.0),  # last box counts
    ("first \\boxed{42} then, correcting myself, \\boxed{41}", "42", 0.0),
    ("\\boxed{42} ... truncated \\boxed{4", "42", 0.0),  # last box unterminated: no answer
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1, 2\\}", 1.0),  # escaped braces inside
    ("The \\boxedtext{3} macro is not a box; \\boxed{8}", "8", 1.0),
]

TABLE = EQUIVALENT + WRONG + STRUCTURE


def test_table_has_enough_cases():
    assert len(TABLE) >= 60


@pytest.fixture(scope="module")
def pool():
    p = default_pool(2)
    p.wait_ready()
    return p


def test_verifier_table(pool):
    responses = [r for r, _, _ in TABLE]
    gts = [g for _, g, _ in TABLE]
    verdicts = pool.verify(responses, gts)
    wrong = [(r, g, want, v) for (r, g, want), v in zip(TABLE, verdicts) if v.score != want]
    assert not wrong, "\n".join(f"{r!r} vs {g!r}: want {w}, got {v}" for r, g, w, v in wrong)
    # The batch API agrees with the verdicts.
    np.testing.assert_array_equal(math_reward_batch(responses, gts, num_workers=2), [w for _, _, w in TABLE])


def test_math_reward_single_calls(pool):
    assert math_reward("\\boxed{\\dfrac{1}{2}}", "0.5") == 1.0
    assert math_reward("\\boxed{7}", "8") == 0.0
    assert math_reward("no answer", "8") == 0.0
    with pytest.raises(TypeError, match="response must be str"):
        math_reward(None, "1")


ADVERSARIAL = [
    ("x" * 100_000 + "\\boxed{3}", "3", 1.0),  # 100 kB of text, answer at the end
    ("\\boxed{3}" + "y" * 100_000, "3", 1.0),
    ("\\boxed{" + "7" * 100_000 + "}", "7", 0.0),  # 100 kB box: refused before parsing
    ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1", 0.0),  # 5000-deep braces
    ("\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}", "1", 0.0),
    ("\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "1", 0.0),
    ("\\boxed{9^9^9^9}", "9", 0.0),
    ("\\boxed{9^{9^{9^{9}}}}", "1", 0.0),
    ("\\boxed{10^{10^{10}}}", "5", 0.0),
    ("\\boxed{(10^{100})!}", "1", 0.0),
    ("\\boxed{x^{x^{x^{x^{x^{x}}}}}}", "y", 0.0),
    ("\\boxed{" * 20_000, "1", 0.0),
]


def test_adversarial_inputs_finish_within_limit(pool):
    """Each case ends within 2 s of wall time, unless the machine starved the worker of CPU (a shared
    box): then it still used at most its CPU budget, and ended by the starvation cap (4 x timeout_s)."""
    limit = pool.timeout_s
    for resp, gt, want in ADVERSARIAL:
        t0 = time.monotonic()
        (v,) = pool.verify([resp], [gt])
        took = time.monotonic() - t0
        assert v.score == want, (resp[:40], v)
        if v.cpu_s is None:  # decided in this process: extraction and size checks only
            assert took < 0.5, f"{resp[:40]!r}... took {took:.2f}s in-process"
            continue
        assert v.cpu_s <= limit + 0.2, f"{resp[:40]!r}... used {v.cpu_s:.2f}s CPU"
        waited = took - v.cpu_s > 0.5  # the extra wall time went to waiting for a CPU, not computing
        assert took < 2.0 or (waited and took < 4 * limit + 1.0), f"{resp[:40]!r}... took {took:.2f}s, {v}"


@pytest.mark.parametrize(
    "text, want",
    [
        ("\\boxed{1}", "1"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\fbox{3} then \\boxed{4}", "4"),
        ("\\boxed{4} then \\fbox{3}", "3"),
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed {5}", "5"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{ \\{1\\} }", "\\{1\\}"),
        ("\\boxed{a} \\boxedx", "a"),
        ("no box", None),
        ("\\boxed{unclosed", None),
        ("\\boxed{}", None),
        ("\\boxed", None),
    ],
)
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_extract_boxed_rejects_non_strings():
    with pytest.raises(TypeError, match="text must be str"):
        extract_boxed(b"\\boxed{1}")


def test_normalisation_and_quick_paths():
    assert normalize_answer("1\\,000\\,000") == "1000000"
    assert normalize_answer("1\\, 2") == "1\\, 2"  # a thin space that is not a thousands separator stays
    assert normalize_answer("$69$,$84$") == "69,84"
    assert normalize_answer("\\$5") == "5"
    assert ground_truth_answer("$\\boxed{\\frac12}$") == "\\frac12"
    assert ground_truth_answer(27.0) == "27" and ground_truth_answer(70) == "70"
    assert ground_truth_answer("North") == "\\text{North}" and ground_truth_answer("ab") == "ab"
    with pytest.raises(TypeError, match="ground_truth must be str or number"):
        ground_truth_answer(None)
    assert quick_verdict("023", "23") == (1.0, "integer")
    assert quick_verdict("1,234", "1234") == (1.0, "integer")
    assert quick_verdict("24", "23") == (0.0, "integer")
    assert quick_verdict("\\frac{1}{2}", "\\frac{1}{2}") == (1.0, "exact")
    assert quick_verdict("0.5", "\\frac12") is None  # needs math-verify
    assert quick_verdict("North", "\\text{North}") == (1.0, "text")
    assert quick_verdict("\\text{east}", "East") == (1.0, "text")
    assert quick_verdict("\\text{odd}", "\\text{even}") == (0.0, "text")
    assert quick_verdict("x", "\\text{y}") is None  # one letter may be a variable: math-verify decides


@pytest.mark.parametrize(
    "text, want",
    [
        ("26 + 30 = 56", "56"),  # no box: the last number of the tail
        ("so \\boxed{7}, not 9", "7"),  # a box always wins
        ("I think 3.5.", "3.5"),
        ("v2 and x3 and -4", "-4"),  # digits inside words are not numbers
        ("no answer here", None),
        ("12 " + "word " * 200, None),  # the number is outside the graded tail
    ],
)
def test_boxed_or_last_number(text, want):
    from conspo_jax.rewards.extract import extract_answer

    assert extract_answer(text, "boxed_or_last_number") == want
    assert extract_answer(text) == extract_boxed(text)  # the default grades boxes only
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer(text, "last")


def test_pool_grades_unboxed_answers_only_when_asked(pool):
    texts, gts = ["26 + 30 = 56", "26 + 30 = 57", "\\boxed{56}"], ["56", "56", "56"]
    assert [v.score for v in pool.verify(texts, gts)] == [0.0, 0.0, 1.0]
    got = pool.verify(texts, gts, answer_format="boxed_or_last_number")
    assert [v.score for v in got] == [1.0, 0.0, 1.0] and got[0].extracted == "56"
