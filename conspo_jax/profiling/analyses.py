"""The analyses of a profiling run, independent of what is profiled (train step, sampler prefill or decode).

- `compile_report(jitted, *args, name=, out_dir=)`: lowers and compiles (args may be
  `jax.ShapeDtypeStruct`, so a GPU-sized program can be analysed on a CPU without running it),
  records compile seconds, XLA's cost and memory analyses, and writes `<name>.stablehlo.txt` and
  `<name>.hlo.txt` (optimised HLO).
- `trace_steps(step_fn, n, out_dir, make_args=)`: n warm steps under `jax.profiler.trace`, each step
  annotated and blocked; writes an XPlane trace (TensorBoard profile plugin / XProf), a Perfetto trace
  and a device memory profile. `trace_files(out_dir)` finds them.
- `model_flops_per_token`, `measure_matmul_peak`, `summary_row`, `summary_table`: the final table.

XLA's own `cost_analysis()` counts the body of a while loop once (seen with jax 0.10 on CPU), so a model
whose layers run under `lax.scan` reports about one layer's FLOPs. The summary's executed FLOPs are
therefore the matmul FLOPs that `hlo_facts` (conspo_jax/profiling/hlo.py) counts from the optimised HLO,
each loop body multiplied by its known trip count; XLA's figure is kept beside it.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------- compile analyses
def _cost_dict(cost) -> dict[str, float]:
    """cost_analysis() is a dict (jax >= 0.4.30), a list of per-program dicts (older), or None."""
    if cost is None:
        return {}
    if isinstance(cost, dict):
        return {k: float(v) for k, v in cost.items() if isinstance(v, int | float)}
    out: dict[str, float] = {}
    for part in cost:
        for k, v in (part or {}).items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0.0) + float(v)
    return out


_MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")


def _memory_dict(mem) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for field in _MEMORY_FIELDS:
        value = getattr(mem, f"{field}_size_in_bytes", None) if mem is not None else None
        out[f"{field}_bytes"] = None if value is None else int(value)
    if all(out[f"{f}_bytes"] is not None for f in ("argument", "output", "temp", "alias")):
        # Donated (aliased) inputs are counted once, as arguments, not again as outputs.
        out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    else:
        out["peak_bytes"] = None
    xla_peak = getattr(mem, "peak_memory_in_bytes", None) if mem is not None else None
    out["xla_peak_memory_bytes"] = int(xla_peak) if xla_peak else None  # 0 on backends that do not fill it
    return out


def compile_report(
    jitted_fn, *args, name: str, out_dir: str | os.PathLike, keep_compiled: bool = False, **kwargs
) -> dict[str, Any]:
    """Lowers and compiles `jitted_fn(*args, **kwargs)` and reports what XLA says about the program.

    Returns a JSON-ready dict: name, lower_s, compile_s, flops / bytes_accessed / transcendentals (XLA's
    cost analysis, None where the backend gives none), the memory analysis in bytes (argument, output,
    temp, alias, and peak = argument + output + temp - alias), and the paths of the two text files
    written to out_dir. With keep_compiled=True the dict also holds the executable under "compiled"
    (not JSON-serialisable; `save_json` drops it), so the caller can run it without compiling twice.
    """
    if not hasattr(jitted_fn, "lower"):
        raise TypeError(f"compile_report jitted_fn must be a jax.jit-wrapped function, got {type(jitted_fn).__name__}")
    if not name or os.sep in name:
        raise ValueError(f"compile_report name={name!r} must be a non-empty file stem")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    lowered = jitted_fn.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    try:
        cost = _cost_dict(compiled.cost_analysis())
    except Exception:  # some backends raise instead of returning None
        cost = {}
    try:
        mem = compiled.memory_analysis()
    except Exception:
        mem = None
    paths = {}
    for kind, text in (("stablehlo", lowered.as_text()), ("hlo", compiled.as_text())):
        paths[f"{kind}_path"] = os.path.join(os.fspath(out_dir), f"{name}.{kind}.txt")
        with open(paths[f"{kind}_path"], "w") as f:
            f.write(text)
    report: dict[str, Any] = dict(
        name=name,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"),
        transcendentals=cost.get("transcendentals"),
        **_memory_dict(mem),
        **paths,
    )
    if keep_compiled:
        report["compiled"] = compiled
    return report


# ----------------------------------------------------------------------------------------- traces
def trace_files(out_dir: str | os.PathLike) -> dict[str, str | None]:
    """Newest trace files under out_dir: {'xplane': .../plugins/profile/<run>/<host>.xplane.pb,
    'perfetto': .../perfetto_trace.json.gz, 'memory_profile': out_dir/memory.prof} (None if absent)."""
    root = os.path.join(os.fspath(out_dir), "plugins", "profile")
    runs = sorted(os.listdir(root)) if os.path.isdir(root) else []
    found: dict[str, str | None] = dict(xplane=None, perfetto=None)
    if runs:
        run = os.path.join(root, runs[-1])
        for f in sorted(os.listdir(run)):
            if f.endswith(".xplane.pb"):
                found["xplane"] = os.path.join(run, f)
            elif f == "perfetto_trace.json.gz":
                found["perfetto"] = os.path.join(run, f)
    mem = os.path.join(os.fspath(out_dir), "memory.prof")
    found["memory_profile"] = mem if os.path.exists(mem) else None
    return found


def trace_steps(
    step_fn: Callable,
    n: int,
    out_dir: str | os.PathLike,
    *,
    make_args: Callable[[int], tuple],
    warmup: int = 1,
    annotation: str = "train",
) -> list[float]:
    """Runs `warmup` untraced steps, then n traced steps; returns each traced step's seconds.

    Step i calls step_fn(*make_args(i)) inside StepTraceAnnotation(annotation, step_num=i) and blocks on
    its outputs. The previous step's outputs are dropped before the next step's arguments are made, so
    the device never holds two steps' outputs at once. Writes (see `trace_files`):
    out_dir/plugins/profile/<run>/<host>.xplane.pb (TensorBoard profile plugin / XProf),
    .../perfetto_trace.json.gz (ui.perfetto.dev), and out_dir/memory.prof (pprof device memory profile,
    taken after the last step while its outputs are live).
    """
    if int(n) < 1:
        raise ValueError(f"trace_steps n={n!r} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    for i in range(warmup):
        jax.block_until_ready(step_fn(*make_args(-1 - i)))
    seconds = []
    out = None
    with jax.profiler.trace(os.fspath(out_dir), create_perfetto_trace=True):
        for i in range(int(n)):
            out = None  # free the previous step's outputs first
            args = make_args(i)
            t0 = time.perf_counter()
            with jax.profiler.StepTraceAnnotation(annotation, step_num=i):
                out = jax.block_until_ready(step_fn(*args))
            seconds.append(time.perf_counter() - t0)
            del args
    jax.profiler.save_device_memory_profile(os.path.join(os.fspath(out_dir), "memory.prof"))
    del out
    return seconds


def read_perfetto_events(path: str | os.PathLike) -> list[dict]:
    """The traceEvents of a perfetto_trace.json.gz (Chrome JSON trace format)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


# ------------------------------------------------------------------------------------ FLOPs, peak
def model_flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token of one forward + backward: 6 x (non-embedding params + LM head) +
    6 x layers x d_model x seq_len (causal attention scores and values). The input embedding is a
    gather, not a matmul, so it is excluded; the LM head matmul is counted even when tied."""
    c = model_config
    params = c.num_params(embeddings=False) + c.vocab_size * c.hidden_size
    return 6.0 * params + 6.0 * c.num_layers * c.hidden_size * int(seq_len)


def measure_matmul_peak(dtype=jnp.bfloat16, n: int = 4096, *, repeats: int = 5, rounds: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on the default device, in this process: the best of
    `rounds` rounds of `repeats` back-to-back calls (a ceiling to compare MFU against)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [mm(a, b) for _ in range(repeats)]
        jax.block_until_ready(outs)
        best = max(best, 2.0 * n**3 * repeats / (time.perf_counter() - t0))
        del outs
    return best


# ------------------------------------------------------------------------------------------ table
def summary_row(
    name: str,
    *,
    report: dict,
    tokens_per_step: int,
    model_flops_per_token: float,
    step_seconds: Sequence[float] | None = None,
    facts: dict | None = None,
    program_facts: dict | None = None,
    peak_flops: float | None = None,
    peak_flops_how: str = "",
    measured_peak_bytes: int | None = None,
) -> dict[str, Any]:
    """One JSON-ready row of the summary: times (median step), rates, FLOPs, MFU, memory, HLO facts.

    facts: `hlo_facts` of the optimised HLO (FLOPs, copies, cuDNN, f32 dots as compiled). program_facts:
    `hlo_facts` of the StableHLO, i.e. the dtypes as the program was written. They differ on XLA:CPU,
    which upcasts bf16 matmuls to f32, so a CPU proof about f32 dots reads program_facts."""
    step_s = statistics.median(step_seconds) if step_seconds else None
    tok_s = tokens_per_step / step_s if step_s else None
    executed = (facts or {}).get("executed_flops") or None
    exec_per_tok = executed / tokens_per_step if executed else None
    mfu = tok_s * model_flops_per_token / peak_flops if tok_s and peak_flops else None
    row = dict(
        name=name,
        step_s=step_s,
        tokens_per_step=int(tokens_per_step),
        tokens_per_s=tok_s,
        model_flops_per_token=float(model_flops_per_token),
        executed_flops_per_token=exec_per_tok,
        executed_over_model=exec_per_tok / model_flops_per_token if exec_per_tok else None,
        xla_cost_flops_per_token=report["flops"] / tokens_per_step if report.get("flops") else None,
        mfu=mfu,
        peak_flops=peak_flops,
        peak_flops_how=peak_flops_how,
        compile_s=report.get("compile_s"),
        compiled_peak_bytes=report.get("peak_bytes"),
        measured_peak_bytes=measured_peak_bytes,
    )
    if facts:
        for key in ("cudnn_attention", "num_f32_dots", "num_f32_vocab_dots", "kv_cache_copies", "f32_dot_shapes"):
            row[key] = facts.get(key)
    if program_facts:
        for key in ("num_f32_dots", "num_f32_vocab_dots", "f32_dot_shapes"):
            row[f"program_{key}"] = program_facts.get(key)
    return row


def _num(x, fmt: str, scale: float = 1.0) -> str:
    if x is None:
        return "-"
    return format(x, fmt) if scale == 1.0 else format(x / scale, fmt)


def _pair(r: dict, key: str) -> str:
    """'compiled/program' counts when both are known, else the compiled one."""
    compiled = _num(r.get(key), "d")
    return compiled if r.get(f"program_{key}") is None else f"{compiled}/{r[f'program_{key}']}"


def summary_table(rows: Sequence[dict]) -> str:
    """The summary rows (from `summary_row`) as a fixed-width text table, one line per row."""
    cols = [
        ("program", 34, lambda r: str(r["name"])[:34]),
        ("step s", 9, lambda r: _num(r.get("step_s"), ".4f")),
        ("tok/s", 10, lambda r: _num(r.get("tokens_per_s"), ",.0f")),
        ("model GF/tok", 12, lambda r: _num(r.get("model_flops_per_token"), ".3f", 1e9)),
        ("exec GF/tok", 11, lambda r: _num(r.get("executed_flops_per_token"), ".3f", 1e9)),
        ("exec/model", 10, lambda r: _num(r.get("executed_over_model"), ".3f")),
        ("MFU", 6, lambda r: _num(r.get("mfu"), ".1%")),
        ("peak GiB", 9, lambda r: _num(r.get("compiled_peak_bytes"), ".2f", 2**30)),
        ("meas GiB", 9, lambda r: _num(r.get("measured_peak_bytes"), ".2f", 2**30)),
        ("compile s", 9, lambda r: _num(r.get("compile_s"), ".1f")),
        ("cuDNN", 5, lambda r: "-" if r.get("cudnn_attention") is None else ("yes" if r["cudnn_attention"] else "no")),
        ("f32 dots", 8, lambda r: _pair(r, "num_f32_dots")),
        ("f32 TxV", 7, lambda r: _pair(r, "num_f32_vocab_dots")),
        ("KV copies", 9, lambda r: _num(r.get("kv_cache_copies"), "d")),
    ]
    header = " ".join(f"{title:>{w}}" if i else f"{title:<{w}}" for i, (title, w, _) in enumerate(cols))
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(" ".join(f"{f(r):>{w}}" if i else f"{f(r):<{w}}" for i, (_, w, f) in enumerate(cols)))
    peaks = sorted(
        {f"{r['peak_flops'] / 1e12:.2f} TFLOP/s ({r['peak_flops_how']})" for r in rows if r.get("peak_flops")}
    )
    lines.append("MFU peak: " + ("; ".join(peaks) if peaks else "none given"))
    lines.append(
        "exec = matmul FLOPs counted in the optimised HLO (loop trip counts applied; cuDNN attention "
        "estimated); peak GiB = compiled "
        "args + outputs + temps - aliases; meas GiB = device peak_bytes_in_use; f32 dots, f32 TxV = "
        "compiled HLO/StableHLO counts (XLA:CPU upcasts bf16 matmuls, so on CPU the StableHLO count is the one "
        "that carries over to GPU)"
    )
    return "\n".join(lines)


def save_json(obj, path: str | os.PathLike) -> None:
    """Writes obj as JSON, dropping values JSON cannot hold (e.g. a report's "compiled")."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if _jsonable(v)}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x if _jsonable(v)]
        if isinstance(x, np.generic):
            return x.item()
        return x

    with open(path, "w") as f:
        json.dump(clean(obj), f, indent=1)


def _jsonable(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool | dict | list | tuple | np.generic)
