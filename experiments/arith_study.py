"""The study config: arith_tiny.py's task and model, sized so Table 1 + Table 6 (13 rows x 5 seeds) fit
90 minutes on the 2-core machine.

Same task as the demo (zero-padded 2-operand addition 0-49). What changes:
- The warm start stops at a pass rate, not a step count (sft.target_pass 0.2, at most 2000 steps): a
  fixed 400 steps landed seeds at 2%-88% held-out accuracy, because the tiny model learns the task in a
  sudden jump whose timing depends on the seed. Stopped at a probe pass rate of 0.2 (T = 1), seeds start
  RL at about 25% held-out accuracy (T = 0.6), mid-range, with room to move both ways (RESULTS.md).
- eval.num_problems 400 and eval.n 4: one run's held-out score has a standard error between
  sqrt(p(1-p)/1600) = 1.2 and sqrt(p(1-p)/400) = 2.4 points at p = 0.4 (measured: about 1.5).
- train.num_steps 240, eval.every 30: 9 evaluations (the "best" column chooses among 8 after RL), and
  one run takes about 2 minutes beside a second one (experiments/sweeps/README.md).
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
    c.sft.steps = 2000
    c.sft.target_pass = 0.2
    c.train.num_steps = 240
    c.eval.every = 30
    c.eval.num_problems = 400
    c.eval.n = 4
    return c
