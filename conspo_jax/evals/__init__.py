"""Benchmark evaluation in the paper's protocol (avg@32 on AIME / HMMT / AMC, pass@1 elsewhere).

Public API:
  evaluate(engine, tokenizer, benchmarks, *, out_dir, max_new_tokens, ...) -> dict   (runner.py)
  run_eval_command(config, *, checkpoint | hf, benchmarks, workdir)                 (`conspo eval`, command.py)
  pass_at_k(n, c, k), mean_pass_at_k(correct_PxN, k), avg_at_k(correct_PxN)         (metrics.py)
  format_table(rows), table_from_results(results), load_results(path)              (report.py)
"""

from conspo_jax.evals.command import run_eval_command
from conspo_jax.evals.metrics import avg_at_k, mean_pass_at_k, pass_at_k
from conspo_jax.evals.report import PAPER_COLUMNS, format_table, load_results, table_from_results
from conspo_jax.evals.runner import DEFAULT_BENCHMARKS, evaluate

__all__ = [
    "DEFAULT_BENCHMARKS",
    "PAPER_COLUMNS",
    "avg_at_k",
    "evaluate",
    "format_table",
    "load_results",
    "mean_pass_at_k",
    "pass_at_k",
    "run_eval_command",
    "table_from_results",
]
