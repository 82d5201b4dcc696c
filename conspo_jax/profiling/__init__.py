"""XLA profiling: the analyses, the facts read from HLO text, and the ``conspo profile`` command.

  analyses  compile_report, trace_steps, trace_files, model_flops_per_token, measure_matmul_peak,
            summary_row, summary_table, save_json, read_perfetto_events
  hlo       hlo_facts: cuDNN attention, f32 (and [tokens x vocab] f32) matmuls, KV-cache copies,
            matmul FLOPs counted through loop trip counts
  command   profile(config, workdir, ...): the programs ``conspo train`` builds, compiled, analysed
            and (unless compile_only) traced

The analyses and the HLO facts stand alone (JAX only) and are exported here; ``command`` builds a
``Trainer``, so it sits above the trainer and is imported by its own path (the CLI imports it lazily).
"""

from conspo_jax.profiling.analyses import (
    compile_report,
    measure_matmul_peak,
    model_flops_per_token,
    read_perfetto_events,
    save_json,
    summary_row,
    summary_table,
    trace_files,
    trace_steps,
)
from conspo_jax.profiling.hlo import hlo_facts

__all__ = [
    "compile_report",
    "hlo_facts",
    "measure_matmul_peak",
    "model_flops_per_token",
    "read_perfetto_events",
    "save_json",
    "summary_row",
    "summary_table",
    "trace_files",
    "trace_steps",
]
