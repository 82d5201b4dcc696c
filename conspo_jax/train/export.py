"""What a run leaves behind besides checkpoints and metrics: results.json (held-out accuracy before and
after RL), the reward curve, and the trained policy as a Hugging Face checkpoint (``train.export_hf``).

``RunOutputs`` keeps results.json in step with the run: loaded on resume (rebuilt from metrics.jsonl's
step-0 row when a crash left it unreadable), rewritten at each checkpoint, and completed by ``finish``.
Only process 0 writes files; every process joins the parameter gathers of the HF export.
"""

from __future__ import annotations

import json
import logging
import os

from conspo_jax.models import save_hf_policy
from conspo_jax.models.lora import base_policy, has_lora
from conspo_jax.models.peft_io import save_peft_adapter
from conspo_jax.train.metrics import atomic_write, plot_reward_curve, read_metrics

log = logging.getLogger(__name__)


def load_results(workdir: str) -> dict:
    """results.json of the run being resumed; if it is unreadable (a pre-atomic-write crash), the
    before-RL accuracy is recovered from metrics.jsonl's step-0 row."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        rows = [r for r in read_metrics(workdir) if r["step"] == 0 and "eval/accuracy" in r]
        log.info(f"{path} was unreadable; rebuilt it from metrics.jsonl")
        return {"eval/accuracy_before": rows[0]["eval/accuracy"]} if rows else {}


class RunOutputs:
    """results.json, the reward curve and the HF export of one run directory."""

    def __init__(self, workdir: str, *, primary: bool, resumed: bool):
        self.workdir, self.primary = workdir, primary
        self.results = load_results(workdir) if resumed else {}

    def write_results(self, indent=None) -> None:
        if self.primary:
            atomic_write(os.path.join(self.workdir, "results.json"), json.dumps(self.results, indent=indent))

    def finish(
        self, last_row: dict, *, policy=None, tokenizer=None, base_model: str | None = None, export_base=False
    ) -> None:
        """Results, the reward curve, the HF export (of ``policy``, when given) and the before/after line
        of a completed run. A LoRA policy is exported merged into ``hf/`` and as a PEFT adapter into
        ``adapter/`` (``base_model``: its adapter_config.json's base_model_name_or_path). ``export_base``:
        the run trained its base (a warm start), so the base goes to ``base/`` and the adapter names it."""
        if "eval/accuracy" in last_row:
            self.results["eval/accuracy_after"] = last_row["eval/accuracy"]
        self.write_results(indent=2)
        if self.primary:
            plot_reward_curve(self.workdir)
        if policy is not None:
            export = os.path.join(self.workdir, "hf")
            # Every process joins the parameter gathers; process 0 writes.
            save_hf_policy(policy, export)
            if self.primary:
                tokenizer.save_pretrained(export)
                log.info(f"exported the trained policy as a Hugging Face checkpoint: {export}")
            if has_lora(policy):
                if export_base:
                    base_model = save_hf_policy(base_policy(policy), os.path.join(self.workdir, "base"))
                    if self.primary:
                        tokenizer.save_pretrained(base_model)
                adapter = save_peft_adapter(
                    policy, os.path.join(self.workdir, "adapter"), base_model_name_or_path=base_model or None
                )
                if self.primary:
                    log.info(f"exported the LoRA adapters as a PEFT adapter: {adapter}")
        if "eval/accuracy_before" in self.results and "eval/accuracy_after" in self.results:
            b, a = self.results["eval/accuracy_before"], self.results["eval/accuracy_after"]
            log.info(
                f"held-out accuracy: before RL {100 * b:.1f}%  after RL {100 * a:.1f}%  ({100 * (a - b):+.1f} points)"
            )
