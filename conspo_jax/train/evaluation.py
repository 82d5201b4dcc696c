"""The trainer's evaluation stage: held-out accuracy (synthetic task, or a math task's ``data.eval``) or the
paper's benchmarks, at the start of a run, every ``eval.every`` steps and at the end.

Both kinds go through ``conspo_jax.evals.evaluate`` with the task's prompt encoding and verifier, on the
trainer's own rollout engine (synced to the step's weights), and write results.json / samples.jsonl
under ``<workdir>/eval/step_<step>``. The scalars returned go into metrics.jsonl.
"""

from __future__ import annotations

import os

from conspo_jax.evals.runner import evaluate

HELD_OUT = "heldout"  # the synthetic task's held-out split, as the evaluator names it
_EVAL_SEED_OFFSET = 10_000  # held-out sampling seed = config.seed + this (kept from the first demo runs)


class Evaluator:
    """Evaluates a run's policy through its engine; holds what every evaluation of the run shares."""

    def __init__(self, config, *, task, tokenizer, stop_ids, workdir: str):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.stop_ids, self.workdir = stop_ids, workdir

    def due(self, done: int, total_steps: int) -> bool:
        """Whether ``done`` finished steps call for an evaluation (every ``eval.every``, and the last)."""
        every = self.config.eval.every
        return bool(every) and (done % every == 0 or done == total_steps)

    def evaluate(self, engine, step: int) -> dict:
        """Scalars for metrics.jsonl: held-out accuracy and boxed rate, or one score per benchmark and
        their average as ``eval/accuracy``; {} when the config asks for neither."""
        c, e = self.config, self.config.eval
        opts = dict(
            out_dir=os.path.join(self.workdir, "eval", f"step_{step}"),
            max_new_tokens=e.max_new_tokens or c.rollout.max_new_tokens,
            temperature=e.temperature,
            top_p=e.top_p,
            stop_token_ids=self.stop_ids,
            label=f"step {step}",
            progress=c.train.progress_bar,
            encode=self.task.encode,
            verify=self.task.verify,
        )
        if self.task.eval_records:
            seed = c.seed + _EVAL_SEED_OFFSET
            res = evaluate(
                engine,
                self.tokenizer,
                {HELD_OUT: self.task.eval_records},
                k_overrides=e.n,
                seed=seed,
                chunk_seed=lambda name, start: seed + start,
                rows_per_call=max(256, len(self.task.eval_records) * e.n),
                **opts,
            )
            held_out = res["benchmarks"][HELD_OUT]
            # The boxed rate beside the accuracy tells format learning from getting answers right.
            return {"eval/accuracy": held_out["score"] / 100.0, "eval/boxed_rate": 1.0 - held_out["no_box_frac"]}
        names = [b for b in str(e.benchmarks).split(",") if b]
        if not names:
            return {}
        res = evaluate(
            engine, self.tokenizer, names, k_overrides=e.k or None, seed=c.seed, limit=e.limit or None, **opts
        )
        out = {f"eval/{name}": float(b["score"]) for name, b in res["benchmarks"].items()}
        out["eval/accuracy"] = float(res["average"])
        return out
