"""Result tables laid out like the paper's Tables 1-5, and the files an evaluation leaves behind."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

# The paper's column order (Tables 1-3, 5).
PAPER_COLUMNS = ("AIME24", "AIME25", "AIME26", "HMMT25", "MATH500", "AMC", "O-Bench")
AVG = "Avg."


def format_table(rows: Sequence[tuple[str, Mapping[str, float]]], *, digits: int = 1) -> str:
    """A markdown table: one row per (label, {column: score in %}), the paper's columns first, any
    other benchmark after them, then the average of the row's filled cells. Unrun cells show "-"."""
    extra: list[str] = []
    for _, scores in rows:
        extra += [c for c in scores if c not in PAPER_COLUMNS and c not in extra]
    used_paper = [c for c in PAPER_COLUMNS if any(c in s for _, s in rows)]
    # All paper columns stay when at least one is used, so tables from different runs line up.
    columns = (list(PAPER_COLUMNS) if used_paper else []) + extra
    lines = ["| Method | " + " | ".join(columns + [AVG]) + " |", "|---|" + "---:|" * (len(columns) + 1)]
    for label, scores in rows:
        cells = [f"{scores[c]:.{digits}f}" if c in scores else "-" for c in columns]
        filled = [scores[c] for c in columns if c in scores]
        avg = f"{sum(filled) / len(filled):.{digits}f}" if filled else "-"
        lines.append(f"| {label} | " + " | ".join(cells + [avg]) + " |")
    return "\n".join(lines) + "\n"


def table_from_results(results: Mapping, label: str | None = None) -> str:
    """The one-row table of an ``evaluate`` result (or a loaded ``results.json``)."""
    scores = {b["column"]: b["score"] for b in results["benchmarks"].values()}
    return format_table([(label or results.get("label", "model"), scores)])


def _finite(x):
    return x if not (isinstance(x, float) and not math.isfinite(x)) else None


def write_results(out_dir: str, results: Mapping) -> str:
    """Writes ``results.json`` and ``table.md``; returns the results path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=False, default=_finite)
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated results.json
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(results["table"])
    return path


def load_results(path: str) -> dict:
    """A ``results.json`` (or the directory holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
