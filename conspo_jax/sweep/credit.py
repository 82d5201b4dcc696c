"""Figure 1 (left) of the paper from a sweep's real training batches: credit against score gap, GRPO vs ConSPO.

Runs trained with ``train.diagnostics_every`` leave ``<run>/diagnostics/step_<s>.npz`` (written by the
trainer, fields in conspo_jax/train/diagnostics.py). This module pools them over the GRPO runs and the
ConSPO runs of a sweep and plots, for the rollouts of valid groups, each run's *own* objective's credit:
the GRPO runs' Lemma 1 credit, the ConSPO runs' Lemma 2 credit, against the positive-negative score gap
(log-likelihood scores under the policy that sampled the batch). Left panel: positives, dJ/ds_i+;
right panel: negatives, |dJ/ds_j-|. Each point is one rollout; the lines are means in gap bins.
"""

from __future__ import annotations

import os

import numpy as np

METHODS = {"grpo": ("GRPO", "credit_grpo_R", "tab:gray"), "conspo": ("ConSPO", "credit_conspo_R", "tab:blue")}


def read_dumps(run_dir: str) -> list[dict]:
    """A run's credit dumps in step order (empty when it wrote none)."""
    d = os.path.join(run_dir, "diagnostics")
    if not os.path.isdir(d):
        return []
    names = [n for n in os.listdir(d) if n.startswith("step_") and n.endswith(".npz") and n[5:-4].isdigit()]
    out = []
    for n in sorted(names, key=lambda n: int(n[5:-4])):
        with np.load(os.path.join(d, n)) as z:
            out.append({k: z[k] for k in z.files})
    return out


def pooled_credit(run_dirs: list[str], method: str) -> dict[str, np.ndarray]:
    """gap, credit and is_pos over the valid rollouts of every dump of ``run_dirs``, with ``method``'s credit."""
    key = METHODS[method][1]
    gaps, creds, pos = [], [], []
    for run_dir in run_dirs:
        for z in read_dumps(run_dir):
            v = z["valid_R"].astype(bool)
            gaps.append(z["gap_R"][v])
            creds.append(z[key][v])
            pos.append(z["is_pos_R"][v].astype(bool))
    if not gaps:
        return {"gap": np.zeros(0), "credit": np.zeros(0), "is_pos": np.zeros(0, bool)}
    return {"gap": np.concatenate(gaps), "credit": np.concatenate(creds), "is_pos": np.concatenate(pos)}


def _binned(x, y, bins=12):
    bins = max(1, min(bins, x.size // 20))  # about 20 rollouts a bin at least: a mean, not noise
    edges = np.quantile(x, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    keep = [b for b in range(bins) if (idx == b).any()]
    return np.array([x[idx == b].mean() for b in keep]), np.array([y[idx == b].mean() for b in keep])


def plot_credit_figure(runs_by_method: dict[str, list[str]], path: str) -> bool:
    """Draws Figure 1 (left) to ``path`` from the runs' dumps; False (and nothing written) when there are none."""
    data = {m: pooled_credit(dirs, m) for m, dirs in runs_by_method.items() if m in METHODS}
    if not any(d["gap"].size for d in data.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, positive in zip(axes, (True, False)):
        for m, d in data.items():
            label, _, color = METHODS[m]
            sel = d["is_pos"] == positive
            if not sel.any():
                continue
            x, y = d["gap"][sel], d["credit"][sel] if positive else -d["credit"][sel]
            ax.scatter(x, y, s=4, alpha=0.25, color=color)
            bx, by = _binned(x, y)
            ax.plot(bx, by, color=color, lw=2, label=f"{label} ({sel.sum()} rollouts)")
        side = "positive" if positive else "negative"
        ax.set(
            xlabel="score gap  $s_i^+ - \\overline{s^-}$" if positive else "score gap  $s_j^- - \\overline{s^+}$",
            ylabel="credit  $\\partial J/\\partial s_i^+$" if positive else "|credit|  $|\\partial J/\\partial s_j^-|$",
            title=f"{side} rollouts (training batches)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
