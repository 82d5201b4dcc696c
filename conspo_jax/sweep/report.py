"""The study's outputs from its runs' files: Table 1 and Table 6 in miniature, Figure 2 and training curves.

Per run: ``final`` = results.json's eval/accuracy_after, ``best`` = the best eval/accuracy row of
metrics.jsonl after step 0 (the paper reports each method's best evaluation), ``before`` =
eval/accuracy_before (the warm start alone: the "Base" row). Each cell is mean +- 95% CI over seeds
(Student t, see stats.py); "vs ConSPO" is the mean and CI of the per-seed paired difference.
Writes table.md, table.csv, results.json, curves.png, (when the sweep has a parameter study) params.png and
(when its GRPO / ConSPO runs wrote credit dumps, ``train.diagnostics_every``) figure1.png (credit.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import numpy as np

from conspo_jax.sweep.credit import plot_credit_figure
from conspo_jax.sweep.grid import Point
from conspo_jax.sweep.runner import run_state
from conspo_jax.sweep.stats import MeanCI, mean_ci, paired_difference

REFERENCE = "conspo"
ABLATIONS = ("conspo_no_contrastive", "conspo_no_loglik", "conspo_no_margin", "conspo_fixed_margin")
DISPLAY = {
    "base": "Base",
    "grpo": "GRPO",
    "dapo": "DAPO",
    "dr_grpo": "Dr. GRPO",
    "disco": "DisCO",
    "gmpo": "GMPO",
    "cispo": "CISPO",
    "sapo": "SAPO",
    "gspo": "GSPO",
    "conspo": "ConSPO",
    "conspo_no_contrastive": "w/o contrastive objective",
    "conspo_no_loglik": "w/o log-likelihood scores",
    "conspo_no_margin": "w/o scheduled margin",
    "conspo_fixed_margin": "w/ fixed margin",
}
PARAM_LABELS = {"tau": "τ (contrastive temperature)", "max_margin": "M (target margin)", "warmup_ratio": "α (warmup)"}
COLUMNS = ("final", "best")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect_run(point: Point, run_dir: str) -> dict | None:
    """The numbers of one finished run, or None when it has not finished."""
    if run_state(run_dir) != "done":
        return None
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    rows = _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r and r["eval/accuracy"] is not None]
    after = [v for s, v in evals if s > 0]
    return {
        "name": point.name,
        "method": point.method,
        "seed": point.seed,
        "params": dict(point.params),
        "in_table": point.in_table,
        "before": results.get("eval/accuracy_before"),
        "final": results["eval/accuracy_after"],
        "best": max(after) if after else results["eval/accuracy_after"],
        "curves": {
            "reward/mean": [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r],
            "eval/accuracy": evals,
        },
    }


def collect(points: list[Point], workdir: str) -> list[dict]:
    runs = [collect_run(p, os.path.join(workdir, "runs", p.name)) for p in points]
    return [r for r in runs if r is not None]


def per_seed(runs: list[dict], key: str) -> dict[str, dict[int, float]]:
    """method -> seed -> value (the mean if a method has several runs of one seed)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["in_table"]:
            acc[r["method"]][r["seed"]].append(r[key])
        if key in COLUMNS and r["before"] is not None and r["in_table"]:
            acc["base"][r["seed"]].append(r["before"])
    return {m: {s: float(np.mean(v)) for s, v in seeds.items()} for m, seeds in acc.items()}


def table_rows(runs: list[dict], methods: list[str]) -> list[dict]:
    """One row per method present: n seeds, mean/CI of final and best, paired difference to ConSPO."""
    by_col = {col: per_seed(runs, col) for col in COLUMNS}
    out = []
    for m in methods:
        if m not in by_col["final"]:
            continue
        row = {"method": m, "label": DISPLAY.get(m, m), "n": len(by_col["final"][m])}
        for col in COLUMNS:
            row[col] = mean_ci(by_col[col][m].values())
            ref = by_col[col].get(REFERENCE)
            row[f"diff_{col}"] = paired_difference(by_col[col][m], ref) if ref and m != REFERENCE else None
        out.append(row)
    return out


def ranks(values: list[float]) -> list[int]:
    """0 for the best (highest) distinct value, 1 for the runner-up, 2 for the rest; ties share a rank."""
    distinct = sorted({v for v in values if not math.isnan(v)}, reverse=True)
    return [min(distinct.index(v), 2) if not math.isnan(v) else 2 for v in values]


def fmt_ci(ci: MeanCI | None, *, scale: float = 100.0, signed: bool = False) -> str:
    if ci is None or ci.n == 0:
        return ""
    mean = f"{scale * ci.mean:+.1f}" if signed else f"{scale * ci.mean:.1f}"
    return f"{mean} ± n/a" if math.isnan(ci.half_width) else f"{mean} ± {scale * ci.half_width:.1f}"


def markdown_table(rows: list[dict], title: str) -> str:
    """Accuracy in %, best mean in bold and the runner-up underlined per column, as in the paper."""
    lines = [
        f"**{title}** (held-out accuracy, %, mean ± 95% CI over seeds)",
        "",
        "| Method | seeds | Final | Best | Final vs ConSPO | Best vs ConSPO |",
        "|---|---|---|---|---|---|",
    ]
    marks = {col: ranks([r[col].mean for r in rows]) for col in COLUMNS}
    for i, r in enumerate(rows):
        cells = []
        for col in COLUMNS:
            text = fmt_ci(r[col])
            cells.append({0: f"**{text}**", 1: f"<u>{text}</u>"}.get(marks[col][i], text))
        diffs = [fmt_ci(r[f"diff_{col}"], signed=True) for col in COLUMNS]
        lines.append(f"| {r['label']} | {r['n']} | {' | '.join(cells)} | {' | '.join(diffs)} |")
    return "\n".join(lines)


def param_study(runs: list[dict]) -> dict[str, list[dict]]:
    """param -> [{value, final, best, diff_final, diff_best}] sorted by value, from points carrying ``params``.

    ``diff_*`` is the paired difference to the defaults run of the same seed (the in-table point that
    carries ``params``, which lies on every curve): seeds' warm starts differ, so the unpaired CIs are
    wide while the paired ones show whether a setting moves the score."""
    groups: dict[str, dict[float, dict[str, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    reference = {col: {r["seed"]: r[col] for r in runs if r["params"] and r["in_table"]} for col in COLUMNS}
    for r in runs:
        for param, value in r["params"].items():
            for col in COLUMNS:
                groups[param][float(value)][col][r["seed"]] = r[col]
    return {
        param: [
            {
                "value": v,
                **{c: mean_ci(cols[c].values()) for c in COLUMNS},
                **{f"diff_{c}": paired_difference(cols[c], reference[c]) if reference[c] else None for c in COLUMNS},
            }
            for v, cols in sorted(by_value.items())
        ]
        for param, by_value in groups.items()
    }


def curve_stats(
    runs: list[dict], method: str, key: str, reference: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps logged by every seed of ``method``, with the mean and CI half-width of ``key`` there; with
    ``reference``, of ``method`` minus ``reference`` paired by seed (the seeds and steps both logged)."""

    def by_seed(m):
        return {r["seed"]: dict(r["curves"][key]) for r in runs if r["method"] == m and r["in_table"]}

    series = by_seed(method)
    if reference is not None:
        ref = by_seed(reference)
        series = {s: {t: v - ref[s][t] for t, v in c.items() if t in ref[s]} for s, c in series.items() if s in ref}
    if not series:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    steps = sorted(set.intersection(*(set(c) for c in series.values())))
    cis = [mean_ci([c[t] for c in series.values()]) for t in steps]
    return np.array(steps), np.array([c.mean for c in cis]), np.nan_to_num(np.array([c.half_width for c in cis]))


def _moving_average(steps: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(1, min(window, y.size))
    return steps[w - 1 :], np.convolve(y, np.ones(w) / w, mode="valid")


def plot_curves(runs: list[dict], groups: dict[str, list[str]], path: str, smooth: int = 10) -> None:
    """One row per group of methods (Table 1's, then the ablations'): the train reward (mean ± 95% CI
    over seeds, both as a ``smooth``-step moving average), held-out accuracy (mean ± 95% CI) and
    held-out accuracy minus ConSPO's, paired by seed. The unpaired bands mostly show how far RL carries
    each seed; the paired column is the comparison the tables make. A method keeps its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {title: ms for title, ms in groups.items() if ms}
    palette = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]
    colors = {
        m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(m for ms in groups.values() for m in ms))
    }
    paired = any(m != REFERENCE for ms in groups.values() for m in ms)  # else the third column is empty
    fig, axes = plt.subplots(len(groups), 2 + paired, figsize=(11 + 5 * paired, 4 * len(groups)), squeeze=False)
    for row, (title, methods) in zip(axes, groups.items()):
        for m in methods:
            label, color = DISPLAY.get(m, m), colors[m]
            steps, mean, half = curve_stats(runs, m, "reward/mean")
            if steps.size:
                (x, mean), (_, half) = _moving_average(steps, mean, smooth), _moving_average(steps, half, smooth)
                row[0].plot(x, mean, color=color, label=label)
                row[0].fill_between(x, mean - half, mean + half, color=color, alpha=0.08)
            panels = ((row[1], None), (row[2], REFERENCE)) if m != REFERENCE else ((row[1], None),)
            for ax, ref in panels:
                steps, mean, half = curve_stats(runs, m, "eval/accuracy", reference=ref)
                if steps.size:
                    ax.plot(steps, 100 * mean, color=color, label=label, marker="o", ms=3)
                    ax.fill_between(steps, 100 * (mean - half), 100 * (mean + half), color=color, alpha=0.15)
        if paired:
            row[2].axhline(0.0, color="grey", lw=0.8)
        titles = (
            f"train reward, mean ± 95% CI ({smooth}-step average)",
            "held-out accuracy %, mean ± 95% CI",
            f"minus {DISPLAY.get(REFERENCE, REFERENCE)}, paired by seed (points)",
        )
        for ax, what in zip(row, titles):
            ax.set_xlabel("step")
            ax.set_title(f"{title}: {what}", fontsize=9)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_params(study: dict[str, list[dict]], path: str) -> None:
    """Top row: accuracy against the value. Bottom row: the same, paired by seed against the defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(study), figsize=(4 * len(study), 6.5), squeeze=False, sharex="col")
    for j, (param, entries) in enumerate(study.items()):
        x = np.arange(len(entries))
        for row, prefix, ylabel in ((0, "", "held-out accuracy (%)"), (1, "diff_", "minus defaults, paired (points)")):
            ax = axes[row][j]
            for col, offset in (("final", -0.1), ("best", 0.1)):
                cis = [e[prefix + col] for e in entries]
                mean = np.array([100 * c.mean if c else np.nan for c in cis])
                half = np.nan_to_num(np.array([100 * c.half_width if c else np.nan for c in cis]))
                ax.errorbar(x + offset, mean, yerr=half, fmt="o-", capsize=3, label=col)
            if row == 1:
                ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_ylabel(ylabel)
        axes[1][j].set_xticks(x, [f"{e['value']:g}" for e in entries])
        axes[1][j].set_xlabel(PARAM_LABELS.get(param, param))
    axes[0][0].legend()
    axes[0][0].set_title("mean ± 95% CI over seeds", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_cells(row: dict) -> list:
    """mean, ci95 for final, best and their paired differences; '' where a value does not exist."""
    cells = []
    for col in (*COLUMNS, *(f"diff_{c}" for c in COLUMNS)):
        ci = row[col]
        cells += ["", ""] if ci is None else [ci.mean, "" if math.isnan(ci.half_width) else ci.half_width]
    return cells


def _ci_json(ci: MeanCI | None):
    return None if ci is None else ci.as_dict()


def write_report(points: list[Point], workdir: str) -> dict:
    """Writes table.md, table.csv, results.json and the PNGs into ``workdir``; returns the results dict."""
    runs = collect(points, workdir)
    order = list(dict.fromkeys(p.method for p in points if p.in_table))
    main = ["base"] + [m for m in order if m not in ABLATIONS]
    ablation = [REFERENCE] + [m for m in ABLATIONS if m in order]
    tables = {"table1": table_rows(runs, main)}
    if len(ablation) > 1:
        tables["table6"] = table_rows(runs, ablation)
    study = param_study(runs)
    titles = {"table1": "Table 1 in miniature", "table6": "Table 6 in miniature (ablations)"}
    md = [f"# Study: {len(runs)}/{len(points)} runs finished", ""]
    for key, rows in tables.items():
        md += [markdown_table(rows, titles[key]), ""]
    if study:
        md += ["**Figure 2 in miniature** (ConSPO, held-out accuracy %, mean ± 95% CI)", ""]
        md += [
            "| parameter | value | seeds | Final | Best | Final vs defaults (paired) | Best vs defaults (paired) |",
            "|---|---|---|---|---|---|---|",
        ]
        for param, entries in study.items():
            for e in entries:
                cells = [fmt_ci(e[c]) for c in COLUMNS] + [fmt_ci(e[f"diff_{c}"], signed=True) for c in COLUMNS]
                md.append(f"| {param} | {e['value']:g} | {e['final'].n} | {' | '.join(cells)} |")
        md.append("")
        plot_params(study, os.path.join(workdir, "params.png"))
        md += ["![Figure 2](params.png)", ""]
    if runs:
        groups = {"methods": [m for m in order if m not in ABLATIONS]}
        if len(ablation) > 1:
            groups["ablations"] = ablation
        plot_curves(runs, groups, os.path.join(workdir, "curves.png"))
        md += ["![curves](curves.png)", ""]
    finished = {r["name"] for r in runs}
    credit_runs = {
        m: [os.path.join(workdir, "runs", p.name) for p in points if p.method == m and p.name in finished]
        for m in ("grpo", "conspo")
    }
    if plot_credit_figure(credit_runs, os.path.join(workdir, "figure1.png")):
        md += ["**Figure 1 (left) in miniature**: per-rollout credit vs score gap, from training batches", ""]
        md += ["![Figure 1](figure1.png)", ""]
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(workdir, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["table", "method", "seeds", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "ci95"))]
            + [f"diff_{c}_{s}" for c in COLUMNS for s in ("mean", "ci95")]
        )
        for key, rows in tables.items():
            for r in rows:
                w.writerow([key, r["method"], r["n"], *_csv_cells(r)])
        for param, entries in study.items():
            for e in entries:
                w.writerow(["figure2", f"{param}={e['value']:g}", e["final"].n, *_csv_cells(e)])
    results = {
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in runs],
        "missing": [p.name for p in points if p.name not in {r["name"] for r in runs}],
        "tables": {
            key: [
                {
                    "method": r["method"],
                    "n": r["n"],
                    **{c: _ci_json(r[c]) for c in (*COLUMNS, "diff_final", "diff_best")},
                }
                for r in rows
            ]
            for key, rows in tables.items()
        },
        "figure2": {
            p: [{"value": e["value"], **{c: _ci_json(e[c]) for c in (*COLUMNS, "diff_final", "diff_best")}} for e in es]
            for p, es in study.items()
        },
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
