"""RewardPool lifecycle: hard deadlines kill and replace workers, nothing leaks, bad input is refused."""

import os
import signal
import threading
import time

import pytest

from conspo_jax.rewards import RewardPool

SLOW = "\\boxed{\\int_0^\\infty e^{-x^2} dx}"  # sympy needs ~1 s on this
SLOW_GT = "\\frac{\\sqrt{\\pi}}{2}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_pool_deadline_kill_replace_threads_and_clean_shutdown():
    with RewardPool(1, timeout_s=1.5) as pool:
        pool.wait_ready()
        (first_pid,) = pool.pids
        assert _alive(first_pid)

        # A task over its deadline: the worker is SIGKILLed, the sample scores 0, a new worker takes over.
        t0 = time.monotonic()
        (v,) = pool.verify([SLOW], [SLOW_GT], timeout_s=0.1)
        assert time.monotonic() - t0 < 1.0
        assert (v.score, v.reason) == (0.0, "timeout")
        assert v.extracted == "\\int_0^\\infty e^{-x^2} dx"
        assert pool.num_timeouts == 1
        assert not _alive(first_pid), "the timed-out worker must be gone (killed and reaped)"
        (second_pid,) = pool.pids
        assert second_pid != first_pid

        # The replacement serves the next batch (it waits for the new worker to warm up).
        assert pool.score(["\\boxed{0.5}", "\\boxed{3}"], ["\\frac12", "4"]).tolist() == [1.0, 0.0]

        # A worker that dies between tasks is replaced transparently.
        os.kill(second_pid, signal.SIGKILL)
        time.sleep(0.2)
        assert pool.score(["\\boxed{\\sqrt{4}}"], ["2"]).tolist() == [1.0]
        assert pool.pids[0] != second_pid

        # Concurrent callers are serialised, and each gets its own answers.
        out = {}

        def call(k):
            out[k] = pool.score([f"\\boxed{{\\frac{{{k}}}{{2}}}}"] * 3, [str(k / 2)] * 3).tolist()

        threads = [threading.Thread(target=call, args=(k,)) for k in (1, 3, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == {1: [1.0] * 3, 3: [1.0] * 3, 5: [1.0] * 3}
        last_pids = pool.pids

    assert all(not _alive(p) for p in last_pids), "close() must leave no worker behind"
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.verify(["\\boxed{\\frac{1}{3}}"], ["0.3"])


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        RewardPool(0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RewardPool(1, timeout_s=0)
    with RewardPool(1) as pool:
        with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
            pool.verify(["a", "b"], ["1"])
        with pytest.raises(TypeError, match=r"responses\[0\] must be str"):
            pool.verify([None], ["1"])
        # Cases decided in-process never wait for a worker, even one that is still starting.
        assert pool.score(["\\boxed{23}", "nothing"], ["023", "1"]).tolist() == [1.0, 0.0]
