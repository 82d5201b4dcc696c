"""Parallel, time-bounded answer verification in worker processes.

Why processes: math-verify's own timeouts use ``signal.alarm``, which only works in the main thread and
cannot interrupt sympy while it is inside C code (a ``9^{9^{9^9}}`` answer computes a huge integer).
The only bound that always holds is killing the process. ``RewardPool`` keeps ``num_workers``
``python -m conspo_jax.rewards._worker`` subprocesses, gives each at most one task at a time with a
hard deadline, SIGKILLs a worker that misses it (that sample scores 0.0, reason "timeout") and starts a
replacement. Workers are plain subprocesses rather than ``multiprocessing`` children so that they never
re-import the caller's ``__main__`` and never inherit a forked JAX runtime.

The parent does the cheap part itself (``verdict.decide_in_parent``): extraction of the last box, size
bounds, exact and integer matches. Only the bounded remainder crosses the pipe, to workers driven through
their handles in ``worker_process.py``.

The bound (issue 14: no verifier call over 2 s, whatever the response). A *call* is the verification
of one response: ``math_reward(response, gt)``, or one element of ``verify([...])``. Its clock starts
when it enters the pool (``verify`` is called; for ``math_reward`` the call itself, so the in-process
box extraction counts too) and covers the wait for a free worker. Past ``max_wall_s`` (default 1.8 s, so that calls end within 2 s)
its verdict is 0.0 with reason "timeout", whatever it was doing: still queued, or running. Inside
that, the worker stops a task itself after 0.85 x min(timeout_s, the wall time left) of CPU time
(default timeout_s 1.5 s; a CPU timer, so no restart is needed). A task still running at the wall
deadline is detached rather than killed: its caller has its 0, and the worker, starved of CPU by
other processes, finishes its CPU slice in the background and is reused (a kill would cost a sympy
import, ~1 s of CPU, on a machine already short of it). A worker is SIGKILLed and replaced when it
has had its CPU budget and still not replied (stuck in C code) ``timeout_s`` after dispatch, or has
been starved for 4 x timeout_s. On a busy machine a slow-but-correct answer thus scores 0 rather
than hold its caller.

Queueing: a ``verify`` call of n responses keeps at most ``num_workers`` of them in the shared queue
or in flight; the next one enters (and its clock starts) when one of them finishes. (In a batch the
in-process pass over all n, linear in their lengths, comes first, outside the clocks.) So a
one-response call returns within ``max_wall_s`` of its start, even when every worker is busy with
other callers' work, and an n-response call within ceil(n / num_workers) x ``max_wall_s``. The only
wait outside the clock is a new pool's start-up: the first call waits for the first worker to warm
up (about 1 s idle; ``wait_ready()`` does it ahead of time). After that, one warm spare worker
(``spare_workers``) takes over at once from a killed or detached one: at most ``num_workers`` tasks
are live at a time, and detached ones do not count.
Measured in BENCHMARKS.md ("Verifier: the 2 s bound"); tests/test_rewards_wall.py checks it.

Threads: many threads may call ``verify`` at once (e.g. 200 ``math_reward`` callers). Every call puts
its tasks on one shared queue; whichever caller holds the driver lock feeds the queue to every free
worker and collects every reply, its own and other callers', until its own tasks are done, then hands
the lock to the next waiting caller. So concurrent callers are served by all workers, not one at a
time (bench/verifier.py measures it).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from conspo_jax.rewards import extract as ex
from conspo_jax.rewards.verdict import Verdict, decide_in_parent
from conspo_jax.rewards.worker_process import Worker, default_num_workers

DEFAULT_TIMEOUT_S = 1.5
DEFAULT_WALL_S = 1.8  # fires 0.2 s early so that, with the driver's wake-up and reaping, a call ends within 2 s
_MIN_SLICE_S = 0.05  # a task with less wall time left than this is not dispatched


@dataclasses.dataclass(eq=False)
class _Batch:
    """One ``verify`` call's share of the work: filled in by whichever thread drives the workers."""

    verdicts: list
    extracted: list
    timeout_s: float
    max_wall_s: float
    remaining: int
    todo: collections.deque  # (index, pred, gold) not yet in the shared queue
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def finish(self, i: int, verdict: Verdict) -> None:
        self.verdicts[i] = verdict
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


class RewardPool:
    """Verifies (response, ground truth) pairs in parallel with a hard per-task deadline.

    Reusable across training steps; use it as a context manager or call ``close()``. Calls from several
    threads share the workers (see the module docstring). Workers start in the background at
    construction (about a second each to import sympy), so build the pool before the first rollout to
    hide that.

    num_workers:      verifier processes working at once (default: cores - 1, between 1 and 8).
    timeout_s:        CPU limit per verification once a worker has it (the worker stops at 0.85 x it;
                      the parent kills a worker that used it and is stuck; see the module docstring).
    max_wall_s:       the hard wall-clock bound per response, counted from when its call starts,
                      queueing included (default 2 s). Past it the response scores 0.0 ("timeout").
    spare_workers:    warm idle workers kept beyond ``num_workers`` so that a killed worker's
                      successor needs no start-up (default 1; they cost memory, not CPU).
    memory_limit_mb:  address-space cap of each worker.
    start_timeout_s:  how long to wait for a first worker to come up before raising.
    max_answer_chars: answers (and ground truths) longer than this that the in-process checks do not
                      decide score 0.0 without reaching a worker.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit_mb: int = 2048,
        start_timeout_s: float = 120.0,
        max_answer_chars: int = ex.MAX_ANSWER_CHARS,
        max_wall_s: float = DEFAULT_WALL_S,
        spare_workers: int = 1,
    ):
        num_workers = default_num_workers() if num_workers is None else num_workers
        if int(num_workers) < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s}")
        if not max_wall_s > _MIN_SLICE_S:
            raise ValueError(f"RewardPool: max_wall_s must be > {_MIN_SLICE_S}, got {max_wall_s}")
        if int(spare_workers) < 0:
            raise ValueError(f"RewardPool: spare_workers must be >= 0, got {spare_workers}")
        self.num_workers, self.timeout_s = int(num_workers), float(timeout_s)
        self.memory_limit_mb, self.start_timeout_s = int(memory_limit_mb), float(start_timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.max_wall_s, self.spare_workers = float(max_wall_s), int(spare_workers)
        self._warmed = threading.Event()  # set once any worker has come up: the clock runs from then
        self._owner = os.getpid()
        self._lock = threading.Lock()  # the driver lock: its holder alone touches workers and _inflight
        self._queue_lock = threading.Lock()  # guards _pending, which every caller appends to
        self._pending: collections.deque = collections.deque()  # (batch, index, pred, gold, wall deadline)
        self._inflight: dict[int, tuple[Worker, _Batch, int]] = {}  # task id -> (worker, batch, index)
        self._task_ids = itertools.count()
        # A caller that queues work while the driver sleeps in select() wakes it through this pipe.
        # (Socket objects, not raw pipe fds: a late write after close() raises instead of landing in
        # whatever file reused the fd number.)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False
        self._workers: list[Worker] = []
        self.num_timeouts = 0  # total over the pool's life, for logging
        self.num_restarts = 0
        self._start_failures = 0
        self._top_up()

    # --- lifecycle ---------------------------------------------------------------------------------

    def _top_up(self) -> None:
        while len(self._workers) < self.num_workers + self.spare_workers:
            self._workers.append(Worker(self.memory_limit_mb))

    def _drop(self, w: Worker) -> None:
        """Kills ``w`` and starts its replacement at once, so it warms up while others work."""
        w.kill()
        if w in self._workers:
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
                self._pump(0.5)

    def close(self) -> None:
        """Stops every worker (EOF, then SIGKILL after a short grace). Idempotent.

        Waits for a caller that is driving the workers to finish its batch; callers still waiting fail
        with RuntimeError("RewardPool is closed").
        """
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        with self._lock:
            for w in self._workers:
                w.shutdown(grace_s=1.0)
            self._workers = []
            self._inflight.clear()
            with self._queue_lock:
                self._pending.clear()
            self._wake_r.close()
            self._wake_w.close()

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
        self,
        responses: Sequence[str],
        ground_truths: Sequence,
        *,
        timeout_s: float | None = None,
        started: float | None = None,
        answer_format: str = "boxed",
    ) -> list[Verdict]:
        """One ``Verdict`` per response, in order; ``timeout_s`` overrides the pool's per-task CPU limit.
        ``answer_format``: what is graded (``extract.extract_answer``); 'boxed' unless a task says otherwise.

        ``started`` (a ``time.monotonic()`` value, default now) is when the call's clock started, for a
        caller that did work of its own first (``math_reward``'s box extraction). It applies to a
        one-response call; in a batch, each response's clock starts when it enters the queue.
        """
        started = time.monotonic() if started is None else float(started)
        if len(responses) != len(ground_truths):
            raise ValueError(f"RewardPool.verify: {len(responses)} responses but {len(ground_truths)} ground truths")
        verdicts: list[Verdict | None] = [None] * len(responses)
        todo = []
        extracted: list[str | None] = []
        for i, (resp, gt) in enumerate(zip(responses, ground_truths)):
            if not isinstance(resp, str):
                raise TypeError(f"RewardPool.verify: responses[{i}] must be str, got {type(resp).__name__}")
            box, verdicts[i], pair = decide_in_parent(resp, gt, answer_format, self.max_answer_chars)
            extracted.append(box)
            if verdicts[i] is None:
                todo.append((i, *pair))
        if todo:
            self._check_open()
            if not self._warmed.is_set():  # a new pool's start-up is not part of any call
                self.wait_ready_one()
                started = max(started, time.monotonic())
            if len(responses) > 1:
                # A batch's in-process pass covered every response (linear time each); the clocks of its
                # first num_workers queued responses start when they enter the queue, not before it.
                started = max(started, time.monotonic())
            timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
            batch = _Batch(verdicts, extracted, timeout_s, self.max_wall_s, len(todo), collections.deque(todo))
            with self._queue_lock:
                # The first num_workers enter now, on the call's clock; each later one when a slot frees.
                for _ in range(min(self.num_workers, len(todo))):
                    i, pred, gold = batch.todo.popleft()
                    self._pending.append((batch, i, pred, gold, started + batch.max_wall_s))
            self._wake()
            self._wait_for(batch)
        return verdicts  # type: ignore[return-value]

    def score(self, responses: Sequence[str], ground_truths: Sequence, *, timeout_s: float | None = None) -> np.ndarray:
        """Rewards as a float32 array of 1.0 / 0.0."""
        return np.asarray([v.score for v in self.verify(responses, ground_truths, timeout_s=timeout_s)], np.float32)

    __call__ = score

    def wait_ready_one(self) -> None:
        """Blocks until some worker is warm (a new pool's start-up); raises after ``start_timeout_s``."""
        deadline = time.monotonic() + self.start_timeout_s
        while not self._warmed.is_set():
            if self._lock.acquire(timeout=0.05):
                try:
                    self._check_open()
                    self._top_up()
                    self._pump(min(0.5, max(0.0, deadline - time.monotonic())))
                finally:
                    self._lock.release()
            self._check_open()
            if time.monotonic() > deadline and not self._warmed.is_set():
                raise RuntimeError(
                    f"RewardPool: no verifier worker came up within {self.start_timeout_s}s "
                    f"(try `{sys.executable} -m conspo_jax.rewards._worker` to see why)"
                )

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # pipe full (a wake-up is pending anyway) or pool closed
            pass

    def _finish(self, batch: _Batch, i: int, verdict: Verdict) -> None:
        """Records a verdict and lets the batch's next task into the queue, its clock starting now."""
        batch.finish(i, verdict)
        if batch.todo:
            j, pred, gold = batch.todo.popleft()
            with self._queue_lock:
                self._pending.append((batch, j, pred, gold, time.monotonic() + batch.max_wall_s))

    def _wait_for(self, batch: _Batch) -> None:
        """Returns once ``batch`` is done, driving the workers whenever no other caller does."""
        while not batch.done.is_set():
            if self._lock.acquire(timeout=0.05):
                try:
                    if not batch.done.is_set():
                        self._check_open()
                        self._drive(batch)
                finally:
                    self._lock.release()
            elif self._closed:
                raise RuntimeError("RewardPool is closed")

    def _drive(self, batch: _Batch) -> None:
        """Feeds every caller's tasks to free workers until ``batch`` is done (driver lock held)."""
        try:
            while not batch.done.is_set():
                self._top_up()
                self._dispatch()
                # Sleep until a reply, a wake-up, or the next deadline of a running or queued task.
                with self._queue_lock:
                    times = [t[4] for t in self._pending]
                times += [w.deadline for w in self._workers if w.task is not None]
                wait = max(0.0, min(times) - time.monotonic()) if times else 0.5
                self._pump(wait)
                self._expire()
        except BaseException:
            self._abandon(batch)
            raise

    def _abandon(self, batch: _Batch) -> None:
        """Interrupted mid-batch: drop its queued tasks; no worker may keep one of its stale tasks."""
        batch.todo.clear()
        with self._queue_lock:
            self._pending = collections.deque(t for t in self._pending if t[0] is not batch)
        for tid, (w, b, _) in list(self._inflight.items()):
            if b is batch:
                del self._inflight[tid]
                self._drop(w)

    def _dispatch(self) -> None:
        for w in list(self._workers):
            if len(self._inflight) >= self.num_workers:
                return  # the rest are spares
            if not (w.ready and w.task is None):
                continue
            while True:
                with self._queue_lock:
                    if not self._pending:
                        return
                    item = self._pending.popleft()
                batch, i, pred, gold, wall_deadline = item
                if wall_deadline - time.monotonic() >= _MIN_SLICE_S:
                    break
                self._finish(batch, i, Verdict(0.0, batch.extracted[i], ex.TIMEOUT))  # ran out queueing
                self.num_timeouts += 1
            tid = next(self._task_ids)
            try:
                w.send(tid, pred, gold, batch.timeout_s, wall_deadline)
                self._inflight[tid] = (w, batch, i)
            except (BrokenPipeError, OSError):  # died between tasks: not this task's fault
                with self._queue_lock:
                    self._pending.appendleft(item)
                w.task = None
                self._drop(w)

    def _expire(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is None or now < w.deadline:
                continue
            live = w.task in self._inflight  # False: its caller already has its 0 (a detached task)
            stuck = now >= w.stuck_at and not w.starved()
            if live and (stuck or now >= w.wall_deadline):
                _, batch, i = self._inflight.pop(w.task)
                self._finish(batch, i, Verdict(0.0, batch.extracted[i], ex.TIMEOUT, w.task_cpu()))
                self.num_timeouts += 1
            if stuck or now >= w.kill_at:
                self._drop(w)
            else:
                # Starved of CPU: keep it (its CPU timer will stop it; a restart would cost a sympy
                # import on an already busy machine) but look again soon.
                w.deadline = min(now + 0.1, w.wall_deadline) if live else now + 0.1
        # Queued tasks whose time ran out while every worker was busy.
        with self._queue_lock:
            late = [t for t in self._pending if t[4] - now < _MIN_SLICE_S]
            if late:
                self._pending = collections.deque(t for t in self._pending if t[4] - now >= _MIN_SLICE_S)
        for batch, i, _, _, _ in late:
            self._finish(batch, i, Verdict(0.0, batch.extracted[i], ex.TIMEOUT))
            self.num_timeouts += 1

    def _pump(self, wait_s) -> None:
        """Waits up to ``wait_s`` for worker output or a wake-up (the select wakes on the first line)
        and applies every reply, whichever caller's task it answers."""
        sel = selectors.DefaultSelector()
        try:
            for w in self._workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            events = sel.select(timeout=wait_s)
        finally:
            sel.close()
        for key, _ in events:
            w = key.data
            if w is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                continue
            msgs, eof = w.read_messages()
            for m in msgs:
                if "ready" in m:
                    w.ready = True
                    self._warmed.set()
                    self._start_failures = 0
                elif m.get("i") == w.task:
                    if w.task in self._inflight:  # else a detached task: its caller already had its 0
                        _, batch, i = self._inflight.pop(w.task)
                        reason = ex.TIMEOUT if m.get("timeout") else ex.ERROR if "err" in m else ex.PARSED
                        self._finish(batch, i, Verdict(float(m["ok"]), batch.extracted[i], reason, m.get("cpu")))
                        self.num_timeouts += reason == ex.TIMEOUT
                    w.task = None
            if eof:  # crashed (e.g. killed by the CPU cap): its task, if any, scores 0
                if w.task is not None and w.task in self._inflight:
                    _, batch, i = self._inflight.pop(w.task)
                    self._finish(batch, i, Verdict(0.0, batch.extracted[i], ex.ERROR))
                self._drop(w)
                if not w.ready:
                    self._start_failures += 1
                    if self._start_failures >= 3:
                        raise RuntimeError(
                            "RewardPool: verifier workers exit during start-up (see stderr); "
                            f"run `{sys.executable} -m conspo_jax.rewards._worker` to reproduce"
                        )
