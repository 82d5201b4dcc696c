"""Run outputs: ``metrics.jsonl`` (one object per step), TensorBoard scalars and a reward-curve PNG."""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
    """Appends per-step scalars to metrics.jsonl and TensorBoard.

    On resume, records past the restored step are dropped first, so an interrupted run followed by
    a resumed one leaves exactly the log an uninterrupted run would have written.
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            keep = [json.dumps(r) + "\n" for r in read_metrics(workdir) if r["step"] <= resume_step]
            atomic_write(self.path, "".join(keep))
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in sorted(scalars.items())})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and np.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self):
        self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (a kill mid-write) is dropped; a bad line anywhere
    else means the file was damaged, which is an error naming the line."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def atomic_write(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a kill) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_reward_curve(workdir: str, out_name: str = "reward_curve.png") -> str | None:
    """Training reward (and held-out accuracy where measured) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows if "reward/mean" in r]
    ax.plot(steps, [r["reward/mean"] for r in rows if "reward/mean" in r], label="train reward (mean)")
    ev = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = os.path.join(workdir, out_name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
