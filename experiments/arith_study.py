"""The study config: arith_tiny.py's task and model, sized so Table 1 (12 methods x 5 seeds) fits the budget.

Same task as the demo (zero-padded 2-operand addition 0-49), so its accuracies stay mid-range (demo:
12.5% before RL, 29-48% after), far from 0% and 100%. What changes is the measurement:
- eval.num_problems 400 (the task has room for ~450 held-out problems) and eval.n 4: one run's held-out
  score has a standard error of at most sqrt(p(1-p)/400) = 2.4 points at p = 0.4 (per-problem outcomes
  deterministic) and at least sqrt(p(1-p)/1600) = 1.2 points (independent samples), against 3.1 points
  for the demo's 256 problems x 1 sample.
- eval.every 25, so the "best" column has 6 checkpoints to choose from.
- train.num_steps stays the demo's 300: one run takes about 1m40s alone (experiments/sweeps/README.md).
Arguments: '' or 'smoke' (as arith_tiny.py).

    conspo sweep --config experiments/arith_study.py --sweep experiments/sweeps/table1.py --workdir runs/table1
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("arith_tiny", os.path.join(os.path.dirname(__file__), "arith_tiny.py"))
_arith_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_arith_tiny)


def get_config(arg=None):
    c = _arith_tiny.get_config(arg)
    if arg == "smoke":
        return c
    c.eval.every = 25
    c.eval.num_problems = 400
    c.eval.n = 4
    return c
