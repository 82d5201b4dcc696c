"""A verifier worker: ``python -m conspo_jax.rewards._worker --mem-mb N``, driven by ``RewardPool``.

Protocol (JSON lines): after warming up it writes ``{"ready": pid}``; then for every request
``{"i": id, "p": pred, "g": gold, "t": cpu_budget_s}`` on stdin it writes
``{"i": id, "ok": 0|1, "cpu": seconds}`` plus ``"timeout": 1`` when the task used up its CPU budget or
``"err": name`` when math-verify raised. It exits on EOF, so it never outlives a parent that died
without closing it.

Limits that hold even if the parent is gone: an address-space cap (a 9^9^9^9-style blow-up fails with
MemoryError instead of swapping the machine) and a CPU-time cap re-armed before every task (a task
that runs away while nobody is left to kill it ends with SIGXCPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time

_TASK_CPU_BUDGET_S = 30


def _cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _arm_cpu_limit() -> None:
    limit = int(_cpu_seconds()) + _TASK_CPU_BUDGET_S
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-mb", type=int, default=0)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it closes us.
    if args.mem_mb > 0:
        cap = args.mem_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    from math_verify.errors import TimeoutException  # a BaseException, so named explicitly

    from conspo_jax.rewards.verify import CpuBudgetExceeded, cpu_limit, verify_answer, warm_up

    warm_up()
    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        _arm_cpu_limit()
        reply = {"i": req["i"], "ok": 0}
        t0 = time.process_time()
        try:
            with cpu_limit(float(req.get("t", 1.0))):
                reply["ok"] = int(verify_answer(req["p"], req["g"]))
        except CpuBudgetExceeded:
            reply["timeout"] = 1
        except (Exception, TimeoutException) as e:  # noqa: BLE001 - any failure scores 0
            reply["err"] = type(e).__name__
        reply["cpu"] = round(time.process_time() - t0, 4)
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
