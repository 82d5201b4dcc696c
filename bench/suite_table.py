"""The one table that bench/gpu_suite.sh prints last, from the logs of its parts in one directory.

Reads LOGDIR/logprob.log (the JSON row lines bench/logprob_step.py prints as it goes, so a part cut
by its time limit still contributes the rows it finished), LOGDIR/profile/summary.json
(bench/profile_model.py) and the last block of LOGDIR/sampler.log (bench/sampler.py's own table),
plus LOGDIR/status.tsv (part, exit code, seconds) written by the suite.

  python bench/suite_table.py LOGDIR
"""

from __future__ import annotations

import json
import os
import sys


def logprob_rows(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{") and '"framework"' in line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def last_block(path: str, max_lines: int = 20) -> list[str]:
    """The last paragraph (lines after the last blank line) of a log: a script's final table."""
    if not os.path.exists(path):
        return []
    lines = [ln.rstrip() for ln in open(path)]
    while lines and not lines[-1]:
        lines.pop()
    start = max((i for i, ln in enumerate(lines) if not ln.strip()), default=-1) + 1
    return lines[start:][-max_lines:]


def fmt_row(part, shape, variant, tok_s, peak_gib, note) -> str:
    tok = "-" if tok_s is None else f"{tok_s:,.0f}"
    mem = "-" if peak_gib is None else f"{peak_gib:.2f}"
    return f"{part:<8} {shape:>9} {variant:<40.40} {tok:>10} {mem:>9}  {note}"


def main(logdir: str) -> None:
    out = [f"{'part':<8} {'shape':>9} {'variant':<40} {'tok/s':>10} {'peak GiB':>9}  notes"]
    out.append("-" * 110)
    rows = logprob_rows(os.path.join(logdir, "logprob.log"))
    for shape in dict.fromkeys(r.get("shape", "?") for r in rows):
        group = [r for r in rows if r.get("shape") == shape]
        ok = [r for r in group if "error" not in r]
        torch = [r for r in ok if r["framework"] == "torch"]
        best = max(torch, key=lambda r: r["tokens"] / r["seconds"], default=None)
        for r in group:
            if "error" in r:
                out.append(fmt_row("logprob", shape, r.get("framework", "?"), None, None, "ERROR " + r["error"][:60]))
                continue
            tok_s, gib = r["tokens"] / r["seconds"], r["peak_bytes"] / 2**30
            note = f"compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
            if r["framework"] == "jax" and best:
                best_tok = best["tokens"] / best["seconds"]
                note += (
                    f"; {tok_s / best_tok:.2f}x best peer tok/s at {gib / (best['peak_bytes'] / 2**30):.2f}x its mem"
                )
            out.append(fmt_row("logprob", shape, f"{r['framework']} {r.get('variant', '')}", tok_s, gib, note))
    summary = os.path.join(logdir, "profile", "summary.json")
    if os.path.exists(summary):
        for r in json.load(open(summary))["rows"]:
            peak = r.get("measured_peak_bytes") or r.get("compiled_peak_bytes")
            mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            ratio = "-" if r.get("executed_over_model") is None else f"{r['executed_over_model']:.3f}"
            note = (
                f"exec/model {ratio}, MFU {mfu}, f32 TxV dots (HLO/StableHLO) {r.get('num_f32_vocab_dots')}/"
                f"{r.get('program_num_f32_vocab_dots')}, "
                f"cuDNN {r.get('cudnn_attention')}, KV copies {r.get('kv_cache_copies')}"
            )
            name = r["name"].split()
            out.append(
                fmt_row(
                    "profile",
                    name[1] if len(name) > 1 else "",
                    r["name"],
                    r.get("tokens_per_s"),
                    peak and peak / 2**30,
                    note,
                )
            )
    sampler = last_block(os.path.join(logdir, "sampler.log"))
    if sampler:
        out.append("sampler (bench/sampler.py's table):")
        out.extend("  " + ln for ln in sampler)
    real = last_block(os.path.join(logdir, "real.log"))
    if real:
        out.append("real sizes (bench/real_model.py's table):")
        out.extend("  " + ln for ln in real)
    status = os.path.join(logdir, "status.tsv")
    if os.path.exists(status):
        parts = [ln.split("\t") for ln in open(status).read().splitlines() if ln]
        out.append("parts: " + ", ".join(f"{p} rc={rc} {float(s):.0f}s" for p, rc, s in parts))
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/suite_table.py LOGDIR")
    main(sys.argv[1])
