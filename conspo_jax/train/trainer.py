"""The RLVR training loop as stages: collect -> make_batches -> update -> after_step.

``Trainer`` owns what a run holds (the built objects from ``conspo_jax.run.build``, the train state, the
jitted step functions, the reference parameters); ``train(config, workdir)`` is what ``conspo train``
runs, and re-running it resumes. Each stage is one method with a typed result; the work behind them sits
in modules of one purpose each, so a new feature has one obvious place to go:

  collect.py     the collect stage (generation rounds, verification, dynamic sampling, shaping)
  producer.py    overlapped rollouts: the next step's collect on a thread, the staleness bound
  inflight.py    the batch in flight between two steps, saved beside each checkpoint
  programs.py    the jitted update and old-policy log-probs, built from the config's shapes
  evaluation.py  held-out or benchmark evaluation when due
  export.py      results.json, the reward curve and the HF export of a finished run
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from conspo_jax.base import distributed, logs
from conspo_jax.base.configs import UsageError, config_to_json
from conspo_jax.data.pipeline import make_prompt_dataset
from conspo_jax.models.lora import base_policy, count_lora_params, has_lora, trainable_filter
from conspo_jax.objectives import resolve_dapo_rollout
from conspo_jax.run import build
from conspo_jax.train import programs
from conspo_jax.train.batching import RLBatch, build_rl_batch, process_layout, split_micro_batches
from conspo_jax.train.checkpoint import Checkpointer, gather_data_states, local_data_state
from conspo_jax.train.collect import Collector, RolloutBatch, rollout_metrics
from conspo_jax.train.diagnostics import write_credit_dump
from conspo_jax.train.evaluation import Evaluator
from conspo_jax.train.export import RunOutputs
from conspo_jax.train.inflight import InflightStore
from conspo_jax.train.metrics import MetricsWriter, atomic_write
from conspo_jax.train.producer import Producer
from conspo_jax.train.resume import check_resume_config
from conspo_jax.train.sft import cached_warm_start
from conspo_jax.train.step import (
    init_train_state,
    make_logprob_fn,
    make_optimizer,
    micro_batch_shardings,
)

log = logging.getLogger(__name__)


class Trainer:
    """One training run: builds everything from ``config`` and owns the state between stages."""

    def __init__(self, config, workdir: str, *, allow_config_change: bool = False, warm_start: bool = True):
        # warm_start=False skips the supervised warm start (conspo profile: same programs, any weights).
        self.warm_start = warm_start
        build.validate(config)
        check_resume_config(config, workdir, allow_config_change=allow_config_change)
        build.enable_compilation_cache(config)
        self.config, self.workdir = config, workdir
        self.primary = distributed.is_primary()  # process 0 writes the run's files
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:  # a path under a file, no permission, ...
            raise UsageError(f"--workdir {workdir!r}: {e.strerror or e}") from None
        m = config.model
        # The first line comes before anything slow (loading a real model, compiling), so a run never sits silent.
        log.info(f"{config.objective.name} on {m.path or m.arch} ({config.task} task) in {workdir}")
        self.tokenizer = build.build_tokenizer(config)
        self.task = build.build_task(config, self.tokenizer)
        self.mesh = build.build_mesh(config)
        t0 = time.time()
        policy = build.build_policy(config, self.tokenizer, self.mesh, seed=config.seed)
        log.info(
            f"policy: {policy.config.num_params() / 1e6:.1f}M parameters, {m.dtype} compute, built in "
            f"{time.time() - t0:.1f}s; {len(self.task.train_records)} training prompts, "
            f"{len(self.task.eval_records)} held out"
        )
        self.stop_ids = build.stop_token_ids(self.tokenizer, policy.config)
        # What the optimizer updates: every Param, or only the adapters of a LoRA run (model.lora.rank > 0),
        # whose frozen base then rides in `rest` like any constant: no gradient, no optimizer state.
        self.graphdef, params, self.rest = nnx.split(policy, trainable_filter(policy), ...)
        self.lora = has_lora(policy)
        if self.lora:
            log.info(
                f"LoRA rank {policy.lora.rank} on {','.join(policy.lora.targets)}: "
                f"{count_lora_params(policy.config, policy.lora) / 1e6:.2f}M trainable parameters"
            )

        r, name = config.rollout, config.objective.name
        self.objective_fn, self.objective_kwargs = programs.objective_of(config)
        self.total_steps, num_epochs = self._schedule()
        # DAPO's dynamic sampling and overlong shaping (conspo_jax/train/collect.py); 'auto' = on for dapo only.
        self.dynamic_sampling, self.overlong_buffer = resolve_dapo_rollout(
            name,
            dynamic_sampling=r.dynamic_sampling,
            overlong_buffer=r.overlong_buffer,
            max_new_tokens=r.max_new_tokens,
        )
        self.batches_per_round = r.oversample if self.dynamic_sampling else 1
        if self.dynamic_sampling:  # the worst case: every step runs every round; the stream never runs dry
            num_epochs *= r.max_sampling_rounds * self.batches_per_round
        self.layout = process_layout(r, config.train, dynamic_sampling=self.dynamic_sampling)
        self.optimizer = make_optimizer(**config.optim)
        self.state = init_train_state(params, self.optimizer, jax.random.key(config.seed), self.mesh)
        self.data_iter = make_prompt_dataset(
            self.task.train_records,
            batch_size=r.prompts_per_step,
            seed=config.seed,
            num_epochs=num_epochs,
            shuffle=config.data.shuffle,
            num_chunks=self.layout[0],
        )
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_ckpts)
        needs_ref = self.objective_fn.requires_ref_logp(**self.objective_kwargs)
        # RL steps done; the optimizer's state.step counts updates (train.mini_batches per RL step).
        self.trained_base = False  # set by a warm start under LoRA
        self.start, self.ref_params = self._restore_or_warm_start(needs_ref)
        self.resumed = self.ckpt.latest_step() is not None
        # The rollout seed key is constant; a host copy lets a producer thread read it while the step
        # function donates (and so deletes) the device train state.
        self.rng_host = np.asarray(jax.device_get(self.state.rng))
        self.async_steps = int(config.rollout.async_steps)
        # Overlapped runs: step t+1's batch (made by the producer's thread while step t trains) and the thread.
        self.inflight = InflightStore(os.path.join(workdir, "inflight"), RolloutBatch)
        if self.resumed:
            self.inflight.restore(self.start)
        self.producer = Producer(self.async_steps, max_staleness=config.rollout.sidecar.max_staleness)
        self.writer = (
            MetricsWriter(workdir, resume_step=self.start if self.resumed else None) if self.primary else _NoWriter()
        )
        self.engine = build.make_engine(
            config,
            nnx.merge(self.graphdef, self.producer.engine_weights(self.state.params), self.rest),
            self.tokenizer,
            self.mesh,
            version=self.start,
        )
        self.collector = Collector(
            r,
            task=self.task,
            tokenizer=self.tokenizer,
            data_iter=self.data_iter,
            rng_host=self.rng_host,
            stop_ids=self.stop_ids,
            dynamic_sampling=self.dynamic_sampling,
            overlong_buffer=self.overlong_buffer,
            batches_per_round=self.batches_per_round,
        )
        self.evaluator = Evaluator(
            config, task=self.task, tokenizer=self.tokenizer, stop_ids=self.stop_ids, workdir=workdir
        )
        self.width = config.data.max_prompt_len
        self.needs_old_logp = programs.uses_old_logp(config)
        # The programs (conspo_jax/train/programs.py), compiled for the config's shapes before any rollout.
        self.example = programs.example_batch(config, needs_old_logp=self.needs_old_logp)
        self.batch_shardings = micro_batch_shardings(self.example, self.mesh)
        self.old_logp_fn = None
        if self.needs_old_logp:
            self.old_logp_fn = programs.build_old_logp_fn(self.graphdef, self.width, self.batch_shardings.old_logp)
        self.step_fn = programs.build_step_fn(
            config, self.state, self.example, self.mesh, self.graphdef, self.rest, self.ref_params, self.optimizer
        )
        self._diag_logp_fn = None  # built on the first train.diagnostics_every step
        self.outputs = RunOutputs(workdir, primary=self.primary, resumed=self.resumed)
        self._nonfinite_run = 0
        # Written last: a run whose config fails to build leaves an existing run directory untouched.
        if self.primary:
            atomic_write(os.path.join(workdir, "config.json"), config_to_json(config))

    # ---- construction --------------------------------------------------------------------------

    def _schedule(self) -> tuple[int, int]:
        per_step = self.config.rollout.prompts_per_step
        steps_per_epoch = len(self.task.train_records) // per_step
        if steps_per_epoch == 0:
            raise UsageError(
                f"rollout.prompts_per_step={per_step} exceeds the {len(self.task.train_records)} training prompts"
            )
        total = self.config.train.num_steps or steps_per_epoch * self.config.data.num_epochs
        return total, -(-total // steps_per_epoch)

    def _save_checkpoint(self, done: int) -> None:
        # Every process joins the (one) Orbax checkpoint; the data positions of all are gathered into it.
        data = gather_data_states(self.data_iter.get_state())
        self.ckpt.save(done, self.state, data, {"step": done, "weight_version": done}, self.ref_params)

    def _restore_or_warm_start(self, needs_ref: bool):
        """(RL steps already done, reference params). The reference policy (KL terms) is the policy RL started from:
        a copy taken after the warm start, saved in every checkpoint and restored from it, never
        re-copied from the resumed parameters."""
        resume = self.ckpt.latest_step()
        c = self.config
        # A LoRA run's frozen base is the warm start, and checkpoints hold the adapters only: a resume
        # makes that base again (from sft.cache_dir when set; the warm start is deterministic otherwise).
        if self.warm_start and c.sft.steps and self.task.sft_target is not None and (resume is None or self.lora):
            self._warm_start()
        if resume is not None:
            self.state, data_state, meta, ref = self.ckpt.restore(
                resume, self.state, self.state.params if needs_ref else None
            )
            self.data_iter.set_state(local_data_state(data_state))
            log.info(f"resumed from step {resume} ({self.ckpt.directory})")
            return int(meta["step"]), ref
        return 0, jax.tree.map(jnp.copy, self.state.params) if needs_ref else None

    def _warm_start(self) -> None:
        """The supervised warm start (conspo_jax/train/sft.py) of every weight. Under LoRA it fine-tunes the
        base before RL trains the adapters on top, so LoRA and full runs of a seed start from one policy."""
        c = self.config
        if not self.lora:
            params = cached_warm_start(
                self.graphdef, self.state.params, self.rest, self.task, self.tokenizer, config=c, mesh=self.mesh
            )
            self.state = init_train_state(params, self.optimizer, jax.random.key(c.seed), self.mesh)
            return
        plain = base_policy(nnx.merge(self.graphdef, self.state.params, self.rest))
        graphdef, params, rest = nnx.split(plain, nnx.Param, ...)
        params = cached_warm_start(graphdef, params, rest, self.task, self.tokenizer, config=c, mesh=self.mesh)
        self.rest = nnx.merge_state(self.rest, params)  # the warm-started weights become the frozen base
        self.trained_base = True  # model.path is no longer the adapters' base: the run exports its own

    # ---- stages --------------------------------------------------------------------------------

    def collect(self, step: int) -> RolloutBatch:
        """The step's rollouts, verified and shaped (conspo_jax/train/collect.py); on the producer's thread
        when overlapped."""
        return self.collector.collect(self.engine, step)

    def make_batches(self, rb: RolloutBatch) -> list[RLBatch]:
        """One ``RLBatch`` of stacked micro-batches per optimizer update, old-policy log-probs included."""
        r, t = self.config.rollout, self.config.train
        batch = build_rl_batch(
            rb.prompts,
            rb.rollouts,
            rb.rewards_R,
            prompt_len=self.width,
            completion_len=r.max_new_tokens,
            pad_id=self.tokenizer.pad_token_id,
            group_size=r.n,
        )
        if rb.rollout_mask_R is not None:
            batch = batch.replace(rollout_mask=np.asarray(rb.rollout_mask_R, np.float32))
        if t.diagnostics_every and rb.step >= 0 and (rb.step + 1) % t.diagnostics_every == 0:
            self._write_diagnostics(rb.step, batch)
        g_local = self.layout[1]
        minis = split_micro_batches(batch, mini_batches=t.mini_batches, micro_batch_groups=g_local)
        # Group ids unique in the global micro-batch: this process's groups follow those of lower ranks.
        offset = jax.process_index() * g_local
        minis = [
            distributed.to_global(mb.replace(group_ids=mb.group_ids + offset), self.batch_shardings) for mb in minis
        ]
        if self.old_logp_fn is None:
            return minis
        return [mb.replace(old_logp=self._old_logp(mb)) for mb in minis]

    def _write_diagnostics(self, step: int, batch: RLBatch) -> None:
        """Figure 1 (left) from this batch: per-rollout credit vs score gap (conspo_jax/train/diagnostics.py)."""
        if self._diag_logp_fn is None:
            self._diag_logp_fn = make_logprob_fn(self.graphdef, self.width)
        logp_RxC = np.asarray(self._diag_logp_fn(self.state.params, self.rest, batch.input_ids, batch.attention_mask))
        c = self.config
        write_credit_dump(
            os.path.join(self.workdir, "diagnostics", f"step_{step + 1}.npz"),
            batch,
            logp_RxC,
            objective=c.objective.name,
            conspo_hparams=dict(c.objective.conspo),
            progress=step / max(self.total_steps, 1),
            step=step + 1,
        )

    def _old_logp(self, mb: RLBatch) -> jax.Array:
        """Old-policy log-probs of a global micro-batch stack, left on the devices it is sharded over."""
        return self.old_logp_fn(self.state.params, self.rest, mb.input_ids, mb.attention_mask)

    def update(self, minis: list[RLBatch], step: int) -> dict:
        """One optimizer update per mini-batch; returns the step's mean metrics."""
        progress = jnp.float32(step / max(self.total_steps, 1))
        metrics = []
        for mb in minis:
            self.state, m = self.step_fn(self.state, mb, progress, self.rest, self.ref_params)
            metrics.append(m)
        metrics = jax.device_get(metrics)
        row = {k: float(np.mean([x[k] for x in metrics])) for k in metrics[0]}
        nonfinite = int(sum(x["nonfinite"] for x in metrics))
        self._nonfinite_run = self._nonfinite_run + 1 if nonfinite else 0
        if nonfinite:
            log.info(f"step {step + 1}: non-finite loss or gradient; update skipped")
            if self._nonfinite_run >= self.config.train.max_nonfinite:
                raise FloatingPointError(f"{self._nonfinite_run} consecutive non-finite steps; stopping")
        row["progress"] = float(progress)
        return row

    def after_step(self, done: int, row: dict) -> None:
        """Syncs the engine, evaluates when due, logs and checkpoints ``done`` finished steps.

        The engine is idle here in both modes (an overlapped run has collected step ``done``'s batch).
        """
        c = self.config
        t0 = time.time()
        self.engine.sync(nnx.merge_state(self.producer.engine_weights(self.state.params), self.rest), done)
        row["time/sync_s"] = time.time() - t0
        if getattr(self.engine, "last_sync_bytes", None):  # a sidecar's: the bytes its weight sync exported
            row["sync/bytes"] = float(self.engine.last_sync_bytes)
        if self.evaluator.due(done, self.total_steps):
            row.update(self.evaluate(done))
        self.writer.write(done, row)
        if done % c.train.ckpt_every == 0 or done == self.total_steps:
            self.inflight.save(done)  # first: a checkpoint never lacks the batch it expects
            self._save_checkpoint(done)
            self.inflight.prune(self.ckpt.all_steps())
            self.outputs.write_results()

    def check_staleness(self, rb: RolloutBatch, step: int) -> RolloutBatch:
        """``rb`` if it was collected for ``step`` from recent enough weights (conspo_jax/train/producer.py)."""
        return self.producer.check_staleness(rb, step)

    # ---- evaluation and outputs ------------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """Held-out or benchmark scalars for metrics.jsonl, through the run's engine (conspo_jax/train/evaluation.py)."""
        return self.evaluator.evaluate(self.engine, step)

    def evaluate_at_start(self) -> None:
        if self.start == 0 and self.config.eval.at_start:
            ev = self.evaluate(0)
            if ev:
                self.outputs.results["eval/accuracy_before"] = ev["eval/accuracy"]
                self.writer.write(0, ev)
                log.info(f"held-out accuracy before RL: {ev['eval/accuracy']:.3f}")

    def finish(self, last_row: dict) -> None:
        """results.json, the reward curve and the HF export of a completed run (conspo_jax/train/export.py)."""
        policy = nnx.merge(self.graphdef, self.state.params, self.rest) if self.config.train.export_hf else None
        self.outputs.finish(
            last_row,
            policy=policy,
            tokenizer=self.tokenizer,
            base_model=self.config.model.path,
            export_base=self.trained_base,
        )

    def close(self) -> None:
        self.producer.close()
        self.writer.close()
        self.ckpt.close()
        self.engine.close()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains from the current step to ``total_steps`` (or ``train.stop_after``); returns the last row."""
        t = self.config.train
        self.evaluate_at_start()
        bar = tqdm(
            total=self.total_steps, initial=self.start, desc="train", disable=not t.progress_bar, dynamic_ncols=True
        )
        row, done = {}, self.start
        for step in range(self.start, self.total_steps):
            t0 = time.time()
            rb = self.inflight.take() or self.collect(step)
            future = self.producer.submit(self.collect, step + 1, self.total_steps)  # overlaps this update
            t_batch = time.time()
            minis = self.make_batches(self.check_staleness(rb, step))
            t_update = time.time()
            row = self.update(minis, step)  # its device_get of the metrics waits for the update to finish
            t_wait = time.time()
            self.inflight.put(self.producer.wait(future))
            row.update(
                rollout_metrics(rb, row, t0),
                **{
                    # make_batches dispatches the old-policy log-probs asynchronously: most of their time
                    # lands in update_s, which therefore times old log-probs + the optimizer update.
                    "time/batch_s": t_update - t_batch,
                    "time/update_s": t_wait - t_update,
                    "time/wait_rollouts_s": time.time() - t_wait,
                },
            )
            done = step + 1
            self.after_step(done, row)
            bar.update(1)
            bar.set_postfix(
                reward=f"{row['reward/mean']:.3f}",
                **({"eval": f"{row['eval/accuracy']:.3f}"} if "eval/accuracy" in row else {}),
            )
            if t.stop_after and t.stop_after <= done < self.total_steps:
                log.info(f"stopping after step {done} (train.stop_after)")
                break
        bar.close()
        if done == self.total_steps:
            self.finish(row)
        return row


class _NoWriter:
    """The metrics writer of processes other than 0 (process 0 writes metrics.jsonl and TensorBoard)."""

    def write(self, step: int, scalars: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains as ``config`` says, writing everything to ``workdir``; returns the final metrics row.

    Re-running it on the same ``workdir`` resumes; a config that differs from the run's (beyond
    ``RESUME_MAY_CHANGE``) is refused unless ``allow_config_change``.
    """
    logs.console_unless_configured()
    trainer = Trainer(config, workdir, allow_config_change=allow_config_change)
    try:
        return trainer.run()
    finally:
        trainer.close()
