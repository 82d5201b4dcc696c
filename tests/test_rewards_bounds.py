"""The verifier is bounded whatever the response: linear box extraction, huge integers scored, and
concurrent callers spread over every worker. Times are CPU seconds of this process (the machine is
shared, so wall time says little about the code)."""

import threading
import time

import pytest

from conspo_jax.rewards import RewardPool, extract_boxed, math_reward
from conspo_jax.rewards import extract as ex

MB = 1 << 20
DIGITS = "7" * 5000

ADVERSARIAL = {
    "boxedx look-alikes": "\\boxedx" * (MB // 7),
    "fboxa look-alikes": "\\fboxa" * (MB // 6),
    "unclosed boxes": "\\boxed{" * (MB // 7),
    "braces around an unclosed box": "{" * MB + "\\boxed{" + "{" * MB,
    "deeply nested box": "\\boxed" + "{" * (MB // 2) + "1" + "}" * (MB // 2),
    "backslashes": "\\boxed{" + "\\" * MB,
    "many boxes": "\\boxed{1}" * (MB // 9),
}


def _cpu(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_a_megabyte_of_adversarial_text_is_scored_in_linear_time(name):
    text = ADVERSARIAL[name]
    extract_boxed("\\boxed{1}")  # first-call imports out of the timing
    # A quadratic scan (the old rfind loop) took 20 s on 1 MB of look-alikes; linear work takes < 0.1 s.
    score, cpu_s = _cpu(math_reward, text, "1")
    assert cpu_s < 0.2, f"{name}: {cpu_s:.3f} s of CPU"
    assert score == (1.0 if name == "many boxes" else 0.0)


def test_box_extraction_semantics_survive_the_linear_scan():
    assert extract_boxed("\\boxedx \\boxed{a{b}c} \\boxedtext") == "a{b}c"  # look-alikes after the box skipped
    assert extract_boxed("\\fbox{1} \\boxed{2} \\fbox{3}") == "3"
    assert extract_boxed("\\boxed{a\\{b}") == "a\\{b"  # an escaped brace does not close
    assert extract_boxed("\\boxed{a\\\\{b}}") == "a\\\\{b}"  # an escaped backslash, then a real brace
    assert extract_boxed("\\boxed{1} \\boxed{") is None  # the last box is truncated: no earlier box
    assert extract_boxed("\\boxed 5$") == "5"
    assert extract_boxed("\\boxedx{1}") is None


def test_huge_integers_are_scored_not_raised():
    # Python refuses int("7" * 5000) (the 4300-digit conversion limit): integers compare as digit strings.
    assert math_reward(f"\\boxed{{{DIGITS}}}", DIGITS) == 1.0
    assert math_reward(f"\\boxed{{{'0' * 3}{DIGITS}}}", DIGITS) == 1.0  # leading zeros, as for small integers
    assert math_reward(f"\\boxed{{{DIGITS}8}}", DIGITS) == 0.0
    assert math_reward(f"\\boxed{{-{DIGITS}}}", DIGITS) == 0.0
    assert math_reward("\\boxed{1}", DIGITS) == 0.0
    assert math_reward(f"\\boxed{{{DIGITS}}}", 7 * (10**5000 - 1) // 9) == 1.0  # a 5000-digit Python int
    assert math_reward("\\boxed{-0}", "0") == 1.0
    # Long answers the cheap checks cannot decide score 0 without reaching a worker.
    assert math_reward("\\boxed{" + "x+" * 5000 + "1}", "\\frac{1}{2}") == 0.0
    with RewardPool(1) as pool:
        (v,) = pool.verify(["\\boxed{" + "x+" * 5000 + "1}"], ["1"])
        assert (v.score, v.reason) == (0.0, ex.TOO_LONG)
        (v,) = pool.verify([f"\\boxed{{{DIGITS}}}"], [DIGITS])
        assert (v.score, v.reason) == (1.0, ex.EXACT)


def test_concurrent_callers_are_served_by_every_worker():
    """Two threads each send one slow task: both workers hold a task at the same time (a pool that
    serialised its callers ran the second only after the first finished)."""
    slow, slow_gt = "\\boxed{\\int_0^\\infty e^{-x^2} dx}", "\\frac{\\sqrt{\\pi}}{2}"
    with RewardPool(2, timeout_s=0.6) as pool:
        pool.wait_ready()
        out = {}

        def call(k):
            out[k] = pool.verify([slow], [slow_gt])[0].reason

        threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        most_busy = 0
        while any(t.is_alive() for t in threads):
            most_busy = max(most_busy, sum(w.task is not None for w in pool._workers))
            time.sleep(0.005)
        assert most_busy == 2
        assert out == {0: ex.TIMEOUT, 1: ex.TIMEOUT}

        # Many threads with cheap tasks: every caller gets its own answer back.
        results = {}

        def cheap(k):
            results[k] = pool.score([f"\\boxed{{\\frac{{{k}}}{{2}}}}", "\\boxed{x^2}"], [str(k / 2), "x*x"]).tolist()

        threads = [threading.Thread(target=cheap, args=(k,)) for k in range(1, 21)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {k: [1.0, 1.0] for k in range(1, 21)}


def test_a_caller_waiting_on_a_closed_pool_fails_cleanly():
    pool = RewardPool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.verify(["\\boxed{x^2}"], ["x*x"])
