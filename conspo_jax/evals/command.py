"""``conspo eval``: load a policy (an HF directory or a trainer checkpoint) and run the benchmarks.

Everything is built through ``conspo_jax.run.build``, as in training: the same engine factory, so the
sampler here is the one in-training evaluation uses (same KV-cache dtype, same prompt buckets).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

from conspo_jax.base.configs import UsageError
from conspo_jax.data import math_data
from conspo_jax.evals.runner import evaluate
from conspo_jax.run import build


def run_eval_command(
    config,
    *,
    checkpoint: str | None = None,
    hf: str | None = None,
    benchmarks: Sequence[str] | None = None,
    workdir: str,
) -> dict:
    """Loads the policy, builds its engine and runs ``evaluate`` with the config's ``eval`` section."""
    if bool(checkpoint) == bool(hf):
        raise UsageError("eval needs exactly one of --checkpoint DIR or --hf PATH")
    e = config.eval
    names = list(benchmarks or [b for b in str(e.benchmarks).split(",") if b])
    for b in names:
        if not os.path.isfile(b) and not b.startswith("hf:"):
            try:
                math_data.benchmark_spec(b)
            except ValueError as err:
                raise UsageError(f"--benchmarks: {err}") from None
    mesh = build.build_mesh(config)
    if hf:
        if not os.path.isdir(hf):
            raise UsageError(f"--hf: no such checkpoint directory {hf!r}")
        config = copy.deepcopy(config)  # the run's own model settings (dtype, remat), these weights
        config.model.path, config.model.random_init = hf, False
        tokenizer = build.build_tokenizer(config)  # config.tokenizer if set, else the one in --hf
        policy = build.build_policy(config, tokenizer, mesh, seed=config.seed)
    else:
        tokenizer = build.build_tokenizer(config)
        policy = build.load_policy_from_checkpoint(config, checkpoint, tokenizer=tokenizer, mesh=mesh)
    engine = build.make_engine(config, policy, tokenizer, mesh)
    try:
        results = evaluate(
            engine,
            tokenizer,
            names,
            out_dir=workdir,
            max_new_tokens=e.max_new_tokens or config.rollout.max_new_tokens,
            k_overrides=e.k or None,  # 0: the paper's protocol (32 samples on AIME / HMMT / AMC, else 1)
            temperature=e.temperature,
            top_p=e.top_p,
            seed=config.seed,
            limit=e.limit or None,
            stop_token_ids=build.stop_token_ids(tokenizer, policy.config),
            label=os.path.basename(os.path.normpath(hf or checkpoint)),
            # A math config's grading rule (data.answer_format) holds for its benchmarks too: a model trained
            # and reported on last-number answers is scored the same way here.
            verify=build.benchmark_verifier(config),
        )
    finally:
        engine.close()
    # The table is the command's output (stdout), not a log line.
    print(
        f"\n{results['table']}\nresults.json, table.md and samples.jsonl are in {os.path.abspath(workdir)}", flush=True
    )
    return results
