"""The parent's side of one verifier subprocess (``conspo_jax/rewards/_worker.py`` is the subprocess itself).

A ``Worker`` starts ``python -m conspo_jax.rewards._worker`` in its own session (plain subprocesses, not
``multiprocessing`` children: they never re-import the caller's ``__main__`` nor inherit a forked JAX
runtime), sends it one task at a time as a JSON line with the task's CPU budget, reads its replies
without blocking, and keeps the clock of the task in flight: when its caller's wall deadline falls, when
it counts as stuck in C code, when it is killed anyway. It reads the task's CPU time from /proc, so the
pool can tell a stuck worker from one starved of CPU by other processes. ``RewardPool`` (pool.py) decides
what to do with these facts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc); None where that is unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Worker:
    """The pool's handle on one ``python -m conspo_jax.rewards._worker`` subprocess: its pipes, the task it
    runs, that task's deadlines and CPU budget, and how to stop it."""

    def __init__(self, memory_limit_mb: int):
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "conspo_jax.rewards._worker", "--mem-mb", str(memory_limit_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # the terminal's Ctrl-C goes to the parent, which then closes us
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0  # when the parent looks at this task next
        self.sent = self.wall_deadline = self.stuck_at = self.kill_at = 0.0
        self.cpu_at_send: float | None = None
        self.cpu_budget = 0.0

    def send(self, task_id: int, pred: str, gold: str, timeout_s: float, wall_deadline: float) -> None:
        # The worker stops itself after ~85% of the limit in CPU, before the parent's wall-clock kill
        # would cost a process restart; never more CPU than the wall time the task has left.
        now = time.monotonic()
        self.cpu_budget = round(0.85 * min(timeout_s, wall_deadline - now), 3)
        msg = {"i": task_id, "p": pred, "g": gold, "t": self.cpu_budget}
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        self.task = task_id
        self.sent, self.wall_deadline = now, wall_deadline  # the caller has its verdict by wall_deadline
        self.stuck_at = now + timeout_s  # had its CPU by then and no reply: stuck in C code, killed
        self.kill_at = now + max(4 * timeout_s, wall_deadline - now)  # starved this long: killed anyway
        self.deadline = min(self.stuck_at, wall_deadline)
        self.cpu_at_send = _cpu_seconds(self.proc.pid)

    def task_cpu(self) -> float | None:
        cpu = _cpu_seconds(self.proc.pid)
        return None if cpu is None or self.cpu_at_send is None else cpu - self.cpu_at_send

    def starved(self) -> bool:
        """True if the task has not yet had its CPU budget (plus time for the worker's own timer to
        act): it was waiting for a CPU, so the wall-clock deadline says nothing about it."""
        used = self.task_cpu()
        return used is not None and used < self.cpu_budget + 0.1

    def read_messages(self) -> tuple[list[dict], bool]:
        """Messages available now, and whether the worker's stdout hit EOF (it died)."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()], eof

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def shutdown(self, grace_s: float) -> None:
        try:
            self.proc.stdin.close()  # EOF: the worker's read loop ends and it exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
