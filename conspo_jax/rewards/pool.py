"""Parallel, time-bounded answer verification in worker processes.

Why processes: math-verify's own timeouts use ``signal.alarm``, which only works in the main thread and
cannot interrupt sympy while it is inside C code (a ``9^{9^{9^9}}`` answer computes a huge integer).
The only bound that always holds is killing the process. ``RewardPool`` keeps ``num_workers``
``python -m conspo_jax.rewards._worker`` subprocesses, gives each at most one task at a time with a
hard deadline, SIGKILLs a worker that misses it (that sample scores 0.0, reason "timeout") and starts a
replacement. Workers are plain subprocesses rather than ``multiprocessing`` children so that they never
re-import the caller's ``__main__`` and never inherit a forked JAX runtime.

The parent does the cheap part itself (``extract.py``): extraction of the last box, size bounds, exact
and integer matches. Only the bounded remainder crosses the pipe.

The time limit ``timeout_s`` (default 1.5 s) holds in two layers. The worker stops a task itself after
0.85 x timeout_s of CPU time (a CPU timer, so no restart is needed); the parent SIGKILLs a worker still
busy at timeout_s of wall time (work stuck in C code). On an idle machine a pathological answer thus
costs at most timeout_s. On a machine whose CPUs other processes hog, a worker that has not yet had its
CPU budget by the deadline is waiting for a CPU, not stuck: it keeps running up to ``max_wall_s``
(default 4 x timeout_s) so that a correct answer is not scored 0 just because the machine was busy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from conspo_jax.rewards import extract as ex

DEFAULT_TIMEOUT_S = 1.5
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc); None where that is unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome for one response: score 1.0/0.0, the extracted answer, and how it was decided."""

    score: float
    extracted: str | None
    reason: str
    cpu_s: float | None = None  # worker CPU seconds spent on it (None: decided in the parent)


def default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _Worker:
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
        self.deadline = 0.0
        self.sent = self.last_chance = 0.0
        self.cpu_at_send: float | None = None
        self.cpu_budget = 0.0

    def send(self, task_id: int, pred: str, gold: str, timeout_s: float, max_wall_s: float) -> None:
        # The worker stops itself after ~85% of the limit in CPU, before the parent's wall-clock kill
        # would cost a process restart.
        self.cpu_budget = round(0.85 * timeout_s, 3)
        msg = {"i": task_id, "p": pred, "g": gold, "t": self.cpu_budget}
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        self.task = task_id
        self.sent = time.monotonic()
        self.deadline = self.sent + timeout_s
        self.last_chance = self.sent + max(timeout_s, max_wall_s)
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


class RewardPool:
    """Verifies (response, ground truth) pairs in parallel with a hard per-task deadline.

    Reusable across training steps; use it as a context manager or call ``close()``. Calls from several
    threads are serialised. Workers start in the background at construction (about a second each to
    import sympy), so build the pool before the first rollout to hide that.

    num_workers:      verifier processes (default: cores - 1, between 1 and 8).
    timeout_s:        limit per verification once a worker has it (CPU-time in the worker, wall-clock
                      in the parent; see the module docstring).
    max_wall_s:       the limit for a worker starved of CPU by other processes (default 4 x timeout_s).
    memory_limit_mb:  address-space cap of each worker.
    start_timeout_s:  how long to wait for a first worker to come up before raising.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit_mb: int = 2048,
        start_timeout_s: float = 120.0,
        max_answer_chars: int = ex.MAX_ANSWER_CHARS,
        max_wall_s: float | None = None,
    ):
        num_workers = default_num_workers() if num_workers is None else num_workers
        if int(num_workers) < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s}")
        self.num_workers, self.timeout_s = int(num_workers), float(timeout_s)
        self.memory_limit_mb, self.start_timeout_s = int(memory_limit_mb), float(start_timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.max_wall_s = None if max_wall_s is None else float(max_wall_s)
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self.num_timeouts = 0  # total over the pool's life, for logging
        self.num_restarts = 0
        self._start_failures = 0
        self._top_up()

    # --- lifecycle ---------------------------------------------------------------------------------

    def _top_up(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.memory_limit_mb))

    def _drop(self, w: _Worker) -> None:
        """Kills ``w`` and starts its replacement at once, so it warms up while others work."""
        w.kill()
        self._workers.remove(w)
        self.num_restarts += 1
        self._top_up()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Blocks until every worker has warmed up (optional; ``verify`` waits as needed)."""
        with self._lock:
            self._check_open()
            deadline = time.monotonic() + (self.start_timeout_s if timeout_s is None else timeout_s)
            while not all(w.ready for w in self._workers):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"RewardPool: workers not ready after {timeout_s or self.start_timeout_s}s")
                self._pump({}, [], [], 0.5)

    def close(self) -> None:
        """Stops every worker (EOF, then SIGKILL after a short grace). Idempotent."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        for w in self._workers:
            w.shutdown(grace_s=1.0)
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; close() is the contract
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RewardPool is closed")

    # --- verification ------------------------------------------------------------------------------

    def verify(
        self, responses: Sequence[str], ground_truths: Sequence, *, timeout_s: float | None = None
    ) -> list[Verdict]:
        """One ``Verdict`` per response, in order; ``timeout_s`` overrides the pool's per-task limit."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"RewardPool.verify: {len(responses)} responses but {len(ground_truths)} ground truths")
        verdicts: list[Verdict | None] = [None] * len(responses)
        todo: collections.deque = collections.deque()
        extracted: list[str | None] = []
        for i, (resp, gt) in enumerate(zip(responses, ground_truths)):
            if not isinstance(resp, str):
                raise TypeError(f"RewardPool.verify: responses[{i}] must be str, got {type(resp).__name__}")
            box = ex.extract_boxed(resp)
            extracted.append(box)
            if box is None:
                verdicts[i] = Verdict(0.0, None, ex.NO_BOX)
                continue
            if len(box) > self.max_answer_chars:
                verdicts[i] = Verdict(0.0, box[:200], ex.TOO_LONG)
                continue
            pred, gold = ex.normalize_answer(box), ex.ground_truth_answer(gt)
            quick = ex.quick_verdict(pred, gold)
            if quick is not None:
                verdicts[i] = Verdict(quick[0], box, quick[1])
            else:
                todo.append((i, pred, gold))
        if todo:
            with self._lock:
                self._check_open()
                self._run(todo, verdicts, extracted, self.timeout_s if timeout_s is None else float(timeout_s))
        return verdicts  # type: ignore[return-value]

    def score(self, responses: Sequence[str], ground_truths: Sequence, *, timeout_s: float | None = None) -> np.ndarray:
        """Rewards as a float32 array of 1.0 / 0.0."""
        return np.asarray([v.score for v in self.verify(responses, ground_truths, timeout_s=timeout_s)], np.float32)

    __call__ = score

    def _run(self, todo, verdicts, extracted, timeout_s) -> None:
        inflight: dict[int, _Worker] = {}
        try:
            self._loop(todo, verdicts, extracted, timeout_s, inflight)
        finally:
            for w in set(inflight.values()):  # interrupted mid-batch: no worker may keep a stale task
                self._drop(w)

    def _loop(self, todo, verdicts, extracted, timeout_s, inflight) -> None:
        waiting_since = time.monotonic()
        while todo or inflight:
            self._top_up()
            for w in self._workers:
                if todo and w.ready and w.task is None:
                    i, pred, gold = todo.popleft()
                    try:
                        w.send(i, pred, gold, timeout_s, 4 * timeout_s if self.max_wall_s is None else self.max_wall_s)
                        inflight[i] = w
                    except (BrokenPipeError, OSError):  # died between tasks: not this task's fault
                        todo.appendleft((i, pred, gold))
                        self._drop(w)
            if not any(w.ready for w in self._workers):
                if time.monotonic() - waiting_since > self.start_timeout_s:
                    raise RuntimeError(
                        f"RewardPool: no verifier worker came up within {self.start_timeout_s}s "
                        f"(try `{sys.executable} -m conspo_jax.rewards._worker` to see why)"
                    )
            else:
                waiting_since = time.monotonic()
            busy = [w.deadline for w in inflight.values()]
            wait = max(0.0, min(busy) - time.monotonic()) if busy else 0.5
            self._pump(inflight, verdicts, extracted, wait)
            now = time.monotonic()
            for i, w in list(inflight.items()):
                if now >= w.deadline and now < w.last_chance and w.starved():
                    w.deadline = min(now + 0.1, w.last_chance)  # busy machine: look again soon
                elif now >= w.deadline:
                    verdicts[i] = Verdict(0.0, extracted[i], ex.TIMEOUT, w.task_cpu())
                    del inflight[i]
                    self.num_timeouts += 1
                    self._drop(w)

    def _pump(self, inflight, verdicts, extracted, wait_s) -> None:
        """Waits up to ``wait_s`` for worker output (the select wakes on the first line) and applies it."""
        sel = selectors.DefaultSelector()
        try:
            for w in self._workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            events = sel.select(timeout=wait_s)
        finally:
            sel.close()
        for key, _ in events:
            w = key.data
            msgs, eof = w.read_messages()
            for m in msgs:
                if "ready" in m:
                    w.ready = True
                    self._start_failures = 0
                elif m.get("i") == w.task and w.task in inflight:
                    i = w.task
                    reason = ex.TIMEOUT if m.get("timeout") else ex.ERROR if "err" in m else ex.PARSED
                    verdicts[i] = Verdict(float(m["ok"]), extracted[i], reason, m.get("cpu"))
                    self.num_timeouts += reason == ex.TIMEOUT
                    del inflight[i]
                    w.task = None
            if eof:  # crashed (e.g. killed by the CPU cap): its task, if any, scores 0
                if w.task is not None and w.task in inflight:
                    verdicts[w.task] = Verdict(0.0, extracted[w.task], ex.ERROR)
                    del inflight[w.task]
                self._drop(w)
                if not w.ready:
                    self._start_failures += 1
                    if self._start_failures >= 3:
                        raise RuntimeError(
                            "RewardPool: verifier workers exit during start-up (see stderr); "
                            f"run `{sys.executable} -m conspo_jax.rewards._worker` to reproduce"
                        )
