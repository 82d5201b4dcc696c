"""The RLVR training loop: sample prompts, roll out G per prompt, verify, score, update, log, evaluate,
checkpoint. ``train(config, workdir)`` is what ``conspo train`` runs; re-running it resumes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conspo_jax.configs import UsageError, config_to_json
from conspo_jax.rollout import SamplingParams
from conspo_jax.train import setup
from conspo_jax.train.batching import build_rl_batch, split_micro_batches
from conspo_jax.train.checkpoint import Checkpointer
from conspo_jax.train.metrics import MetricsWriter, plot_reward_curve
from conspo_jax.train.step import init_train_state, make_logprob_fn, make_optimizer, make_train_step


def _say(msg):
    print(f"[conspo] {msg}", flush=True)


def _make_engine(config, policy, tokenizer, mesh, stop_ids, version):
    if config.rollout.backend == "sidecar":
        from conspo_jax.sidecar.client import SidecarClient

        # Pushing now makes the first rollouts come from these weights, not the sidecar's checkpoint.
        return SidecarClient.from_config(config, tokenizer=tokenizer, policy=policy, version=version)
    from conspo_jax.rollout.jax_engine import JaxEngine

    # The KV cache keeps the compute dtype, so engine and trainer log-probs agree (fp32 runs: <= 1e-4).
    return JaxEngine(
        policy,
        eos_token_ids=stop_ids,
        pad_id=tokenizer.pad_token_id,
        mesh=mesh,
        prompt_bucket=config.rollout.prompt_bucket,
        cache_dtype=setup.DTYPES[config.model.dtype],
        version=version,
    )


def _prompt_iterator(config, records, num_epochs):
    from conspo_jax.data.pipeline import make_prompt_dataset

    return make_prompt_dataset(
        records,
        batch_size=config.rollout.prompts_per_step,
        seed=config.seed,
        num_epochs=num_epochs,
        shuffle=config.data.shuffle,
    )


def evaluate_held_out(engine, task, config, seed, tokenizer):
    """Mean verified reward on the held-out split (the demo's 'held-out accuracy')."""
    if not task.eval_records:
        return None
    e = config.eval
    params = SamplingParams(
        n=e.n,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens or config.rollout.max_new_tokens,
        seed=seed,
    )
    prompts = [task.encode(r) for r in task.eval_records]
    out = engine.generate(prompts, params)
    texts = engine_texts(out, tokenizer)
    answers = [task.eval_records[g]["answer"] for g in out.group_ids_R]
    return float(np.mean(task.reward(texts, answers)))


def run_evaluation(engine, task, config, tokenizer, workdir, step, stop_ids) -> dict:
    """Scalars for metrics.jsonl: held-out accuracy (synthetic task) or the paper's benchmarks (math)."""
    if task.eval_records:
        return {"eval/accuracy": evaluate_held_out(engine, task, config, config.seed + 10_000, tokenizer)}
    e = config.eval
    names = [b for b in str(e.benchmarks).split(",") if b]
    if not names:
        return {}
    from conspo_jax.evals.runner import evaluate

    res = evaluate(
        engine,
        tokenizer,
        names,
        out_dir=os.path.join(workdir, "eval", f"step_{step}"),
        max_new_tokens=e.max_new_tokens or config.rollout.max_new_tokens,
        k_overrides=e.k or None,
        temperature=e.temperature,
        top_p=e.top_p,
        seed=config.seed,
        limit=e.limit or None,
        stop_token_ids=stop_ids,
        label=f"step {step}",
        progress=False,
    )
    out = {f"eval/{name}": float(b["score"]) for name, b in res["benchmarks"].items()}
    out["eval/accuracy"] = float(res["average"])
    return out


def engine_texts(rollouts, tokenizer):
    return [tokenizer.decode(c, skip_special_tokens=True) for c in rollouts.completions()]


def train(config, workdir: str) -> dict:
    """Trains as ``config`` says, writing everything to ``workdir``; returns the final metrics row."""
    setup.validate(config)
    setup.enable_compilation_cache(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_to_json(config))
    tokenizer = setup.build_tokenizer(config)
    task = setup.build_task(config, tokenizer)
    mesh = setup.build_mesh(config)
    policy = setup.build_policy(config, tokenizer, mesh, seed=config.seed)
    stop_ids = setup.stop_token_ids(tokenizer, policy.config)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

    from conspo_jax.objectives import get_objective

    name = config.objective.name
    kwargs = dict(config.objective[name]) if name in config.objective else {}
    objective_fn = get_objective(name)
    objective = lambda inputs, **kw: objective_fn(inputs, **kw, **kwargs)  # noqa: E731

    r = config.rollout
    prompts_per_epoch = len(task.train_records) // r.prompts_per_step
    if prompts_per_epoch == 0:
        raise UsageError(
            f"rollout.prompts_per_step={r.prompts_per_step} exceeds the {len(task.train_records)} training prompts"
        )
    total_steps = config.train.num_steps or prompts_per_epoch * config.data.num_epochs
    num_epochs = -(-total_steps // prompts_per_epoch)
    optimizer = make_optimizer(**config.optim)
    state = init_train_state(params, optimizer, jax.random.key(config.seed), mesh)
    data_iter = _prompt_iterator(config, task.train_records, num_epochs)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_ckpts)
    resume = ckpt.latest_step()
    width = config.data.max_prompt_len
    if resume is not None:
        state, data_state, meta = ckpt.restore(resume, state)
        data_iter.set_state(data_state)
        _say(f"resumed from step {resume} ({ckpt.directory})")
    elif config.sft.steps and task.sft_target is not None:
        _say(f"warm start: {config.sft.steps} supervised steps (demo only; see sft.py)")
        from conspo_jax.train.sft import warm_start

        t0 = time.time()
        new_params = warm_start(
            graphdef,
            state.params,
            rest,
            task.train_records,
            task.encode,
            task.sft_target,
            tokenizer,
            steps=config.sft.steps,
            lr=config.sft.lr,
            batch_size=config.sft.batch_size,
            warmup_steps=config.sft.warmup_steps,
            seed=config.seed,
            width=width + r.max_new_tokens,
            mesh=mesh,
            log=lambda s, loss: _say(f"  sft step {s}: loss {loss:.3f}"),
        )
        state = init_train_state(new_params, optimizer, jax.random.key(config.seed), mesh)
        _say(f"warm start done in {time.time() - t0:.0f}s")
    start = int(state.step)
    writer = MetricsWriter(workdir, resume_step=start if resume is not None else None)
    engine = _make_engine(config, nnx.merge(graphdef, state.params, rest), tokenizer, mesh, stop_ids, start)

    ref_params = jax.tree.map(jnp.copy, state.params) if objective_fn.requires_ref_logp(**kwargs) else None
    micro_groups = config.train.micro_batch_groups or r.prompts_per_step // config.train.mini_batches
    step_fn = None  # built on the first batch, whose shapes fix the input shardings
    needs_old = objective_fn.uses_old_logp and config.train.mini_batches > 1
    old_logp_fn = make_logprob_fn(graphdef, width) if needs_old else None

    def sync_engine(step):
        if hasattr(engine, "set_state"):
            engine.set_state(nnx.merge_state(state.params, rest), step)
        else:
            engine.update_weights(nnx.merge(graphdef, state.params, rest), step)

    results = {}
    if start == 0 and config.eval.at_start:
        ev = run_evaluation(engine, task, config, tokenizer, workdir, 0, stop_ids)
        if ev:
            results["eval/accuracy_before"] = ev["eval/accuracy"]
            writer.write(0, ev)
            _say(f"held-out accuracy before RL: {ev['eval/accuracy']:.3f}")
    elif resume is not None and os.path.exists(os.path.join(workdir, "results.json")):
        results.update(json.load(open(os.path.join(workdir, "results.json"))))

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps, initial=start, desc="train", disable=not config.train.progress_bar, dynamic_ncols=True
    )
    row, nonfinite_run = {}, 0
    for step in range(start, total_steps):
        t0 = time.time()
        records = next(data_iter)  # a list of {id, problem, answer} records
        prompts = [task.encode(rec) for rec in records]
        seed = int(jax.random.randint(jax.random.fold_in(jax.random.wrap_key_data(state.rng), step), (), 0, 2**31 - 1))
        sampling = SamplingParams(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=stop_ids,
            seed=seed,
        )
        if r.backend == "sidecar":  # the sidecar verifies in its worker processes
            rollouts = engine.generate(
                prompts,
                sampling,
                answers=[rec["answer"] for rec in records],
                prompt_ids=[str(rec.get("id", i)) for i, rec in enumerate(records)],
            )
        else:
            rollouts = engine.generate(prompts, sampling)
        t_gen = time.time() - t0
        answers = [records[g]["answer"] for g in rollouts.group_ids_R]
        rewards = getattr(rollouts, "rewards_R", None)
        if rewards is None:
            rewards = task.reward(engine_texts(rollouts, tokenizer), answers)
        batch = build_rl_batch(
            prompts, rollouts, rewards, prompt_len=width, completion_len=r.max_new_tokens, pad_id=tokenizer.pad_token_id
        )
        minis = split_micro_batches(
            batch, mini_batches=config.train.mini_batches, micro_batch_groups=config.train.micro_batch_groups
        )
        if old_logp_fn is not None:
            for mb in minis:
                shape = mb["input_ids"].shape
                flat = old_logp_fn(
                    state.params,
                    rest,
                    mb["input_ids"].reshape(-1, shape[-1]),
                    mb["attention_mask"].reshape(-1, shape[-1]),
                )
                mb["old_logp"] = np.asarray(flat).reshape(shape[0], shape[1], -1)
        progress = jnp.float32(step / max(total_steps, 1))
        step_metrics = []
        if step_fn is None:
            step_fn = make_train_step(
                state,
                minis[0],
                mesh,
                rest=rest,
                ref_params=ref_params,
                graphdef=graphdef,
                objective=objective,
                num_groups=micro_groups,
                prompt_len=width,
                optimizer=optimizer,
                tis_cap=float(r.sidecar.tis_cap),
            )
        for mb in minis:
            state, m = step_fn(state, mb, progress, rest, ref_params)
            step_metrics.append(m)
        m = jax.device_get(step_metrics)
        row = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
        nonfinite = int(sum(x["nonfinite"] for x in m))
        nonfinite_run = nonfinite_run + 1 if nonfinite else 0
        if nonfinite:
            _say(f"step {step + 1}: non-finite loss or gradient; update skipped")
            if nonfinite_run >= config.train.max_nonfinite:
                raise FloatingPointError(f"{nonfinite_run} consecutive non-finite steps; stopping")
        lens = rollouts.completion_lens_R
        row.update(
            {
                "reward/mean": float(np.mean(rewards)),
                "response_len/mean": float(np.mean(lens)),
                "rollout/truncated_frac": float(np.mean([f == "length" for f in rollouts.finish_reasons])),
                "margin": row.get("objective/margin", 0.0),
                "time/generate_s": t_gen,
                "time/step_s": time.time() - t0,
                "progress": float(progress),
            }
        )
        sync_engine(step + 1)
        done = step + 1
        if config.eval.every and (done % config.eval.every == 0 or done == total_steps):
            row.update(run_evaluation(engine, task, config, tokenizer, workdir, done, stop_ids))
        writer.write(done, row)
        bar.update(1)
        bar.set_postfix(
            reward=f"{row['reward/mean']:.3f}",
            **({"eval": f"{row['eval/accuracy']:.3f}"} if "eval/accuracy" in row else {}),
        )
        if done % config.train.ckpt_every == 0 or done == total_steps:
            ckpt.save(done, state, data_iter.get_state(), {"step": done, "weight_version": done})
            with open(os.path.join(workdir, "results.json"), "w") as f:
                json.dump(results, f)
        if config.train.stop_after and done >= config.train.stop_after and done < total_steps:
            _say(f"stopping after step {done} (train.stop_after)")
            break
    bar.close()
    writer.close()
    ckpt.close()
    if int(state.step) == total_steps:
        if "eval/accuracy" in row:
            results["eval/accuracy_after"] = row["eval/accuracy"]
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_reward_curve(workdir)
        if config.train.export_hf:
            from conspo_jax.models import save_hf_policy

            export = os.path.join(workdir, "hf")
            save_hf_policy(nnx.merge(graphdef, state.params, rest), export)
            tokenizer.save_pretrained(export)
            _say(f"exported the trained policy as a Hugging Face checkpoint: {export}")
        if "eval/accuracy_before" in results and "eval/accuracy_after" in results:
            b, a = results["eval/accuracy_before"], results["eval/accuracy_after"]
            _say(f"held-out accuracy: before RL {100 * b:.1f}%  after RL {100 * a:.1f}%  ({100 * (a - b):+.1f} points)")
    if hasattr(engine, "close"):
        engine.close()
    return row
