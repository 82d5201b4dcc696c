"""Runs the points of a sweep as ``conspo train`` subprocesses: skip finished runs, resume interrupted
ones, keep N workers busy, and print progress (done / running / left, ETA).

A run is finished when its ``results.json`` has ``eval/accuracy_after`` (the trainer writes it only after
the last step). Anything else that exists is relaunched with the same command, and the trainer resumes
from its last checkpoint, so re-running the sweep command finishes the study.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable

from conspo_jax.sweep.grid import Point, train_command

# Opt-in (single_thread=True): pin each run to one thread. On the 2-core machine this was slower than
# leaving XLA's threads alone with 2 workers (experiments/sweeps/README.md), so it is off by default.
SINGLE_THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def run_state(run_dir: str) -> str:
    """'done' (results.json has eval/accuracy_after), 'partial' (the run dir exists) or 'new'."""
    path = os.path.join(run_dir, "results.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                if "eval/accuracy_after" in json.load(f):
                    return "done"
        except (OSError, json.JSONDecodeError):
            pass  # written while we read it, or truncated by a kill: treat as not finished
    return "partial" if os.path.isdir(run_dir) else "new"


def worker_env(workers: int, base: dict | None = None, *, single_thread: bool = False) -> dict:
    """The environment of one run: the caller's, plus single-thread settings when asked (and workers > 1)."""
    env = dict(os.environ if base is None else base)
    if single_thread and workers > 1:
        for key, value in SINGLE_THREAD_ENV.items():
            env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
    return env


def launch_order(points: list[Point]) -> list[Point]:
    """The first point of every seed first: those compute the seed's warm start while the rest wait for it."""
    firsts, rest, seen = [], [], set()
    for p in points:
        (rest if p.seed in seen else firsts).append(p)
        seen.add(p.seed)
    return firsts + rest


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def estimate_remaining(durations: list[float], running_elapsed: list[float], left: int, workers: int) -> float | None:
    """Seconds until the study ends: queued runs take the mean finished duration, running ones its rest."""
    if not durations:
        return None
    d = sum(durations) / len(durations)
    work = sum(max(d - e, 0.0) for e in running_elapsed) + left * d
    return work / max(1, min(workers, left + len(running_elapsed)))


@dataclasses.dataclass
class SweepSummary:
    skipped: list[str]
    launched: list[str]
    failed: list[str]
    wall_s: float


def run_sweep(
    points: list[Point],
    *,
    config_spec: str,
    workdir: str,
    workers: int = 1,
    extra_overrides: dict | None = None,
    warmstart_cache: bool = True,
    warmstart_dir: str | None = None,
    progress_every_s: float = 30.0,
    log: Callable[[str], None] | None = None,
    poll_s: float = 0.2,
    single_thread: bool = False,
) -> SweepSummary:
    """Runs every unfinished point, at most ``workers`` at a time; returns what was skipped/launched/failed."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    say = log or (lambda msg: print(f"[sweep] {msg}", flush=True))
    runs_root = os.path.join(workdir, "runs")
    # Another study's warm starts may be shared (--warmstart_dir): the fingerprint refuses a mismatch.
    cache_root = (warmstart_dir or os.path.join(workdir, "warmstart")) if warmstart_cache else None
    os.makedirs(runs_root, exist_ok=True)
    commands = {
        p.name: train_command(
            p,
            config_spec=config_spec,
            run_dir=os.path.join(runs_root, p.name),
            cache_root=cache_root,
            extra_overrides=extra_overrides,
        )
        for p in points
    }
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump(
            {
                "config": config_spec,
                "points": [dataclasses.asdict(p) | {"command": commands[p.name]} for p in points],
            },
            f,
            indent=2,
        )
    t_start = time.time()
    skipped = [p.name for p in points if run_state(os.path.join(runs_root, p.name)) == "done"]
    queue = [p for p in launch_order(points) if p.name not in set(skipped)]
    total = len(points)
    say(f"{total} runs: {len(skipped)} finished already, {len(queue)} to run on {workers} worker(s)")
    env = worker_env(workers, single_thread=single_thread)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    durations: list[float] = []
    launched, failed, done_now = [], [], 0
    last_report = time.time()

    def report(event: str = "") -> None:
        now = time.time()
        eta = estimate_remaining(durations, [now - t for _, t, _ in running.values()], len(queue), workers)
        done = len(skipped) + done_now
        say(
            f"{done}/{total} done, {len(running)} running, {len(queue)} left, "
            f"elapsed {format_duration(now - t_start)}, ETA {format_duration(eta)}" + (f"  ({event})" if event else "")
        )

    try:
        while queue or running:
            while queue and len(running) < workers:
                p = queue.pop(0)
                run_dir = os.path.join(runs_root, p.name)
                resumed = run_state(run_dir) == "partial"
                os.makedirs(run_dir, exist_ok=True)
                logf = open(os.path.join(run_dir, "train.log"), "a")
                logf.write(f"\n$ {' '.join(commands[p.name])}\n")
                logf.flush()
                proc = subprocess.Popen(
                    commands[p.name], stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
                running[p.name] = (proc, time.time(), logf)
                launched.append(p.name)
                report(f"{'resumed' if resumed else 'started'} {p.name}")
            time.sleep(poll_s)
            for name in list(running):
                proc, t0, logf = running[name]
                if proc.poll() is None:
                    continue
                logf.close()
                del running[name]
                if proc.returncode == 0 and run_state(os.path.join(runs_root, name)) == "done":
                    durations.append(time.time() - t0)
                    done_now += 1
                    report(f"finished {name} in {format_duration(durations[-1])}")
                else:
                    failed.append(name)
                    log_path = os.path.join(runs_root, name, "train.log")
                    report(f"FAILED {name} (exit {proc.returncode}; see {log_path})")
            if time.time() - last_report >= progress_every_s:
                last_report = time.time()
                report()
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            os.killpg(proc.pid, signal.SIGTERM)  # our own children, started in their own sessions
        for proc, _, logf in running.values():
            proc.wait()
            logf.close()
        say("interrupted; re-run the same command to resume")
        raise
    wall = time.time() - t_start
    say(f"done in {format_duration(wall)}: {len(launched)} launched, {len(skipped)} skipped, {len(failed)} failed")
    return SweepSummary(skipped=skipped, launched=launched, failed=failed, wall_s=wall)
