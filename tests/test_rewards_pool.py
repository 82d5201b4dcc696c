"""RewardPool lifecycle: CPU budgets, the hard wall bound on starved workers, replacement of dead workers
by the warm spare, no leaks."""

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


def test_pool_cpu_budget_worker_replacement_threads_and_clean_shutdown():
    with RewardPool(1, timeout_s=1.5) as pool:
        pool.wait_ready()
        first_pid, spare_pid = pool.pids  # one worker and one warm spare
        assert _alive(first_pid) and _alive(spare_pid)

        # A task over its budget stops itself on the worker's CPU timer: 0 points, no restart needed.
        t0 = time.monotonic()
        (v,) = pool.verify([SLOW], [SLOW_GT], timeout_s=0.3)
        assert (v.score, v.reason) == (0.0, "timeout")
        assert v.extracted == "\\int_0^\\infty e^{-x^2} dx"
        assert v.cpu_s <= 0.35 and (time.monotonic() - t0 < 1.0 or v.cpu_s < 0.5 * (time.monotonic() - t0))
        assert pool.num_timeouts == 1 and pool.num_restarts == 0 and pool.pids == [first_pid, spare_pid]

        # A worker that dies between tasks is replaced transparently.
        os.kill(first_pid, signal.SIGKILL)
        time.sleep(0.2)
        # The warm spare serves the next batch at once while the replacement starts.
        assert pool.score(["\\boxed{0.5}", "\\boxed{3}", "\\boxed{\\sqrt{4}}"], ["\\frac12", "4", "2"]).tolist() == [
            1.0,
            0.0,
            1.0,
        ]
        assert not _alive(first_pid) and first_pid not in pool.pids and pool.num_restarts == 1
        assert len(pool.pids) == 2

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


def test_starved_worker_gets_max_wall_then_is_killed():
    """A worker that gets no CPU (here: SIGSTOPped, as on an overloaded machine) is not killed at
    timeout_s but at max_wall_s after the call started, and then replaced."""
    with RewardPool(1, timeout_s=0.2, max_wall_s=1.2) as pool:
        pool.wait_ready()
        result = {}

        def run():
            t0 = time.monotonic()
            result["v"] = pool.verify([SLOW], [SLOW_GT])[0]
            result["t"] = time.monotonic() - t0

        th = threading.Thread(target=run)
        th.start()
        while not any(w.task is not None for w in pool._workers):
            time.sleep(0.005)
        (pid,) = [w.proc.pid for w in pool._workers if w.task is not None]
        os.kill(pid, signal.SIGSTOP)
        th.join()
        assert result["v"].reason == "timeout" and pool.num_restarts == 1
        assert 1.1 <= result["t"] < 2.0, result["t"]
        assert not _alive(pid) and pid not in pool.pids and len(pool.pids) == 2


def test_interrupted_batch_leaves_the_pool_usable():
    with RewardPool(1) as pool:
        pool.wait_ready()
        pid = pool.pids[0]  # the first idle worker gets the task
        real_pump = pool._pump

        class Interrupted(Exception):  # stands in for Ctrl-C while a task is in flight
            pass

        def broken_pump(*a, **kw):
            raise Interrupted

        pool._pump = broken_pump
        with pytest.raises(Interrupted):
            pool.verify(["\\boxed{x^2}"], ["x*x"])
        pool._pump = real_pump
        assert pid not in pool.pids and not _alive(pid), "the worker holding the abandoned task is replaced"
        assert pool.score(["\\boxed{x^2}"], ["x \\cdot x"]).tolist() == [1.0]
