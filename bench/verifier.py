"""Verifier bounds: worst-case box extraction time, and latency of many concurrent ``math_reward`` callers.

    python bench/verifier.py --sizes 131072 1048576 --concurrent 200 --workers 4
    python bench/verifier.py --bound --workers 1     # the 2 s per-call bound (tests/test_rewards_wall.py's corpus)

Part 1 times ``math_reward`` on adversarial responses of each size (look-alike box commands, deep and
unbalanced braces, a 5000-digit number); part 2 starts ``--concurrent`` threads that each call
``math_reward`` once on an answer that needs a worker (no in-process shortcut applies) and reports the
median and maximum latency and the wall time of the whole burst. ``--bound`` instead scores the
adversarial corpus of tests/test_rewards_wall.py with one caller (each response followed by an ordinary
one) and then with every response's caller at once, and reports the maximum per-call wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time

from conspo_jax.rewards import default_pool, math_reward


def adversarial(size: int) -> dict[str, tuple[str, str]]:
    digits = "7" * 5000
    return {
        "\\boxedx * n": ("\\boxedx" * (size // 7), "1"),
        "\\fboxa * n": ("\\fboxa" * (size // 6), "1"),
        "\\boxed{ * n (unbalanced)": ("\\boxed{" * (size // 7), "1"),
        "{ * n then \\boxed{": ("{" * size + "\\boxed{" + "{" * size, "1"),
        "\\boxed{{{...1}}}": ("\\boxed" + "{" * (size // 2) + "1" + "}" * (size // 2), "1"),
        "\\\\ * n": ("\\" * size, "1"),
        "5000-digit answer": (f"\\boxed{{{digits}}}", digits),
        "5000-digit gt, 1 answer": ("\\boxed{1}", digits),
        "slow integral (worker limit)": ("\\boxed{\\int_0^\\infty e^{-x^2} dx}", "\\frac{\\sqrt{\\pi}}{2}"),
        "9^{9^{9^9}} (worker limit)": ("\\boxed{9^{9^{9^9}}}", "1"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--bound", action="store_true", help="measure the per-call wall bound instead")
    args = ap.parse_args()
    print(f"host: {os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    pool = default_pool(args.workers)
    pool.wait_ready()
    if args.bound:
        return bound()
    for size in args.sizes:
        for name, (resp, gt) in adversarial(size).items():
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                score = math_reward(resp, gt)
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                score = f"raised {type(e).__name__}"
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"  {size:>8d} chars  {name:<28s} wall {wall:7.3f} s  cpu {cpu:7.3f} s  score {score}")

    serial = burst(args.concurrent, threading.Lock())
    shared = burst(args.concurrent, None)
    for name, (lat, wall, correct) in (("serialised (one lock, as before)", serial), ("shared workers", shared)):
        print(
            f"{args.concurrent} concurrent math_reward calls, {pool.num_workers} workers, {name}: "
            f"median {statistics.median(lat):.2f} s, max {max(lat):.2f} s, burst wall {wall:.2f} s, "
            f"correct {correct:.0f}/{len(lat)}"
        )
    print(
        f"median latency ratio serialised / shared: {statistics.median(serial[0]) / statistics.median(shared[0]):.2f}"
    )


def bound() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_rewards_wall import ADVERSARIAL, ORDINARY  # one corpus for the test and the measurement

    def timed(resp, gt):
        t0 = time.perf_counter()
        score = math_reward(resp, gt)
        return score, time.perf_counter() - t0

    print(f"max_wall_s {default_pool().max_wall_s} s, {default_pool().num_workers} worker(s) + spare")
    ordinary_ok = 0
    walls = []
    for k, (name, (resp, gt)) in enumerate(ADVERSARIAL.items()):
        score, wall = timed(resp, gt)
        ok, wall_ordinary = timed(*ORDINARY[k % len(ORDINARY)])
        ordinary_ok += ok
        walls += [wall, wall_ordinary]
        print(
            f"  1 caller   {name:<30s} wall {wall:6.3f} s  score {score}  | next ordinary {wall_ordinary:6.3f} s  {ok}"
        )
    print(f"1 caller: max per-call wall {max(walls):.3f} s, ordinary correct {ordinary_ok:.0f}/{len(ADVERSARIAL)}")
    cases = list(ADVERSARIAL.values()) + ORDINARY * 3
    out: list = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def call(k):
        start.wait()
        out[k] = timed(*cases[k])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ordinary = [s for s, _ in out[len(ADVERSARIAL) :]]
    print(
        f"{len(cases)} concurrent callers: max per-call wall {max(w for _, w in out):.3f} s, "
        f"median {statistics.median(w for _, w in out):.3f} s, ordinary correct {sum(ordinary):.0f}/{len(ordinary)} "
        f"(the rest timed out queueing), adversarial scored 1: {sum(s for s, _ in out[: len(ADVERSARIAL)]):.0f}"
    )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def burst(n: int, serialise: threading.Lock | None) -> tuple[list[float], float, float]:
    """``n`` threads call math_reward at once; ``serialise`` (a lock around each call) reproduces the old
    pool, which held one lock for a whole call and so served callers one at a time."""
    latencies: list[float] = []
    scores: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(n + 1)

    def call(k: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        # A trigonometric identity: sympy needs ~0.1 s of CPU for it, no in-process shortcut applies.
        with serialise or contextlib.nullcontext():
            score = math_reward(f"\\boxed{{\\sin^2 ({k}x) + \\cos^2 ({k}x) + {k}}}", f"{k + 1}")
        with lock:
            latencies.append(time.perf_counter() - t0)
            scores.append(score)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(1, n + 1)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, sum(scores)


if __name__ == "__main__":
    main()
