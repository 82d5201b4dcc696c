"""`conspo profile`: an XLA profiling run of exactly the programs `conspo train` runs.

A ``Trainer`` is built from the config (the build layer, the train state, the jitted update of
``conspo_jax.train.programs``, the rollout engine) without its supervised warm start: programs and shapes
are training's, the weights random (or a run's last checkpoint when the workdir holds one). Profiled:

- train:   the RL update, one call = every micro-batch of one mini-batch (``Trainer.step_fn``);
- prefill: the embedded sampler's prompt prefill of all its rows (``DecodePrograms.prefill``);
- decode:  one decode chunk of ``rollout.decode_chunk`` steps mid-generation (``DecodePrograms.chunk``).

Inputs are synthetic, with the shapes the config fixes: random token ids, full attention masks, binary
rewards; the sampler's rows have no stop token, so every decode chunk runs all of its steps. For each
program the workdir gets ``<name>.stablehlo.txt`` and ``<name>.hlo.txt`` (lowered and optimised),
``trace_<name>/`` (N warm steps, each under ``StepTraceAnnotation(name)`` and blocked: an XPlane for
TensorBoard / XProf under ``plugins/profile/``, ``perfetto_trace.json.gz`` for ui.perfetto.dev, and a
device memory profile ``memory.prof``), and ``summary.json`` holds the compile reports (XLA cost and
memory analyses, compile seconds), the HLO facts and the summary rows (``conspo_jax.profiling``).

Counts in the HLO are one device's (the program is SPMD-partitioned over the mesh); the summary rows
multiply FLOPs and the MFU peak by the devices. Model FLOPs per token: train 6 x (non-embedding params + LM head) + attention (``model_flops_per_token``);
prefill and decode are forward only, a third of that at their attended key counts (prefill runs the LM
head for the last prompt token only). Executed FLOPs are the matmul FLOPs of the optimised HLO; the
decode chunk's loop stops on a data-dependent condition, so its body (one decode step) is counted once
by ``hlo_facts`` and multiplied here by the chunk's steps. "KV copies" of the decode row are per step,
memory figures per device.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conspo_jax import profiling as P
from conspo_jax.base import logs
from conspo_jax.base.configs import UsageError
from conspo_jax.models import init_kv_cache
from conspo_jax.rollout.decode import empty_rows, window_for
from conspo_jax.rollout.jax_engine import _MAX_STOP_IDS, JaxEngine
from conspo_jax.train.step import micro_batch_shardings
from conspo_jax.train.trainer import Trainer

log = logging.getLogger(__name__)

WHAT = ("train", "sample", "both")


def profile(config, workdir: str, *, steps: int = 3, what: str = "both", peak_tflops: float | None = None) -> dict:
    """Profiles the train step and / or the sampler's programs of ``config``; writes into ``workdir``
    and returns the summary (also ``workdir/summary.json``); its "table" is the text table."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--steps must be an integer >= 1, got {steps!r}")
    if what not in WHAT:
        raise UsageError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise UsageError(f"--peak_tflops must be > 0, got {peak_tflops!r}")
    logs.console_unless_configured()
    config = config.copy_and_resolve_references()
    # A persistent-cache hit would report a near-zero compile time.
    config.xla_cache_dir = ""
    trainer = Trainer(config, workdir, warm_start=False)
    try:
        return _profile(trainer, steps=steps, what=what, peak_tflops=peak_tflops)
    finally:
        trainer.close()


def _profile(trainer: Trainer, *, steps: int, what: str, peak_tflops: float | None) -> dict:
    c, workdir = trainer.config, trainer.workdir
    device = jax.devices()[0]
    model_config = nnx.merge(trainer.graphdef, trainer.state.params, trainer.rest).config
    if peak_tflops:
        peak, peak_how = float(peak_tflops) * 1e12, "given (--peak_tflops)"
    else:
        on_gpu = jax.default_backend() == "gpu"
        dtype, n = (jnp.bfloat16, 8192) if on_gpu else (jnp.dtype(c.model.dtype), 1024)
        peak = P.measure_matmul_peak(dtype, n)
        peak_how = f"measured {jnp.dtype(dtype).name} {n}^3 matmul, this run"
    rows, programs, notes = [], {}, []
    cache_dir = jax.config.jax_compilation_cache_dir or None
    if cache_dir:
        notes.append(f"compile s may be persistent-cache hits: the compilation cache {cache_dir} is on")
    head = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=f"{platform.node()}, {os.cpu_count()} CPUs, {device.device_kind} ({jax.default_backend()})",
        jax=jax.__version__,
        what=what,
        steps=steps,
        model=dict(
            arch=c.model.arch or c.model.path,
            params=model_config.num_params(),
            non_embedding_params=model_config.num_params(embeddings=False),
            vocab_size=model_config.vocab_size,
            remat=c.model.remat,
            dtype=c.model.dtype,
        ),
        compilation_cache=cache_dir,
        peak_flops=peak,
        peak_flops_how=peak_how,
    )

    def save() -> dict:  # after each program, so a run cut by a time limit keeps what it finished
        table = P.summary_table(rows) + "".join(f"\n{n}" for n in notes)
        summary = dict(head, notes=notes, rows=rows, programs=programs, table=table)
        P.save_json(summary, os.path.join(workdir, "summary.json"))
        return summary

    if what in ("train", "both"):
        rows.append(_train(trainer, model_config, steps, peak, peak_how, programs))
        save()
    if what in ("sample", "both"):
        if isinstance(trainer.engine, JaxEngine):
            _sample(trainer, steps, peak, peak_how, programs, rows, on_row=save)
        else:
            notes.append(f"sampler not profiled: rollout.backend={c.rollout.backend!r} runs outside this process")
            log.info(notes[-1])
    return save()


def _record(programs, name, report, facts, program_facts, seconds, trace_dir, **extra) -> None:
    report = {k: v for k, v in report.items() if k != "compiled"}
    programs[name] = dict(
        report=report,
        facts=facts,
        program_facts=program_facts,
        step_seconds=seconds,
        trace=P.trace_files(trace_dir),
        **extra,
    )


def _row(name, report, facts, program_facts, *, tokens, model_fpt, seconds, peak, peak_how, loop_steps=1, **kw):
    """A summary row for the whole mesh: the compiled program (and so its HLO counts and XLA's cost
    analysis) is one device's, so FLOPs and the MFU peak are multiplied by the devices it runs on;
    loop_steps multiplies a program whose step loop has a data-dependent trip count (counted once)."""
    n = facts["num_partitions"]
    scale = n * (loop_steps if facts["unknown_trip_counts"] else 1)
    facts = dict(facts, executed_flops=facts["executed_flops"] * scale)
    report = dict(report, flops=report["flops"] * scale if report.get("flops") else None)
    row = P.summary_row(
        name,
        report=report,
        tokens_per_step=tokens,
        model_flops_per_token=model_fpt,
        step_seconds=seconds,
        facts=facts,
        program_facts=program_facts,
        peak_flops=peak * n,
        peak_flops_how=peak_how + (f" x {n} devices" if n > 1 else ""),
        **kw,
    )
    return dict(row, devices=n, flops_scaled_by=scale)


def _facts(report, vocab, kv_shapes=()):
    facts = P.hlo_facts(open(report["hlo_path"]).read(), vocab_size=vocab, kv_cache_shapes=kv_shapes)
    return facts, P.hlo_facts(open(report["stablehlo_path"]).read(), vocab_size=vocab)


def synthetic_batch(example, *, vocab: int, seed: int = 0):
    """An ``RLBatch`` of numpy arrays with ``example``'s shapes: random tokens, every position real,
    binary rewards (so groups have a spread), engine log-probs of -1."""
    rng = np.random.default_rng(seed)
    m, rows, width = example.input_ids.shape
    comp = example.completion_mask.shape[-1]
    f32 = np.float32
    logp = np.full((m, rows, comp), -1.0, f32)
    return example.replace(
        input_ids=rng.integers(0, vocab, (m, rows, width)).astype(np.int32),
        attention_mask=np.ones((m, rows, width), np.int32),
        completion_mask=np.ones((m, rows, comp), f32),
        engine_logp=logp,
        rewards=rng.integers(0, 2, (m, rows)).astype(f32),
        group_ids=np.broadcast_to(np.arange(rows, dtype=np.int32) // example.group_size, (m, rows)).copy(),
        rollout_mask=np.ones((m, rows), f32),
        old_logp=None if example.old_logp is None else logp.copy(),
    )


def _train(trainer: Trainer, model_config, steps, peak, peak_how, programs) -> dict:
    workdir, vocab = trainer.workdir, model_config.vocab_size
    example = trainer.example
    batch = synthetic_batch(example, vocab=vocab, seed=trainer.config.seed)
    batch = jax.device_put(batch, micro_batch_shardings(batch, trainer.mesh))
    progress = jnp.float32(0.5)
    rest, ref = trainer.rest, trainer.ref_params
    report = P.compile_report(
        trainer.step_fn, trainer.state, batch, progress, rest, ref, name="train", out_dir=workdir, keep_compiled=True
    )
    compiled = report.pop("compiled")
    facts, program_facts = _facts(report, vocab)
    log.info(f"train step compiled in {report['compile_s']:.1f} s")

    def step(batch, progress):  # the state is donated: thread it through the calls
        trainer.state, metrics = compiled(trainer.state, batch, progress, rest, ref)
        return trainer.state, metrics

    trace_dir = os.path.join(workdir, "trace_train")
    seconds = P.trace_steps(step, steps, trace_dir, make_args=lambda i: (batch, progress), annotation="train")
    # The device's peak is per process, and the train step (run first) is the largest program.
    measured = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    # The engine shared the donated parameters: give it the current ones, as after_step does.
    trainer.engine.sync(nnx.merge_state(trainer.state.params, trainer.rest), trainer.start)
    m, r, width = example.input_ids.shape
    tokens = m * r * width
    name = f"train {m * r}x{width} remat={trainer.config.model.remat}" + (f" M={m}" if m > 1 else "")
    _record(
        programs,
        "train",
        report,
        facts,
        program_facts,
        seconds,
        trace_dir,
        micro_batches=m,
        rows=r,
        width=width,
        reference_forward=ref is not None,
    )
    model_fpt = P.model_flops_per_token(model_config, width)
    return _row(
        name,
        report,
        facts,
        program_facts,
        tokens=tokens,
        model_fpt=model_fpt,
        seconds=seconds,
        peak=peak,
        peak_how=peak_how,
        measured_peak_bytes=measured,
    )


def _sample(trainer: Trainer, steps, peak, peak_how, programs, rows_out: list, on_row) -> None:
    """The engine's prefill and decode-chunk programs, called as ``run_decode`` calls them; their summary
    rows are appended to rows_out as they finish, on_row() called after each."""
    c, engine, workdir = trainer.config, trainer.engine, trainer.workdir
    r = c.rollout
    state, mc = engine._sampling_state()
    progs = engine._fn(r.max_new_tokens)
    max_new, chunk = r.max_new_tokens, engine.decode_chunk
    pairs = r.prompts_per_step * r.n
    rows = min(pairs, engine.decode_rows or pairs)
    plen = -(-trainer.width // engine.bucket) * engine.bucket
    rng = np.random.default_rng(c.seed)
    cache = init_kv_cache(mc, rows, plen + max_new, dtype=engine.cache_dtype, mesh=engine.mesh)
    kv_shapes = [tuple(x.shape) for x in jax.tree.leaves(cache)]
    live = {"cache": cache, "rows": jax.tree.map(engine._place, empty_rows(rows, plen))}
    idx_N = jnp.arange(rows, dtype=jnp.int32)
    prompt_NxQ = jnp.asarray(rng.integers(0, mc.vocab_size, (rows, plen)), jnp.int32)
    mask_NxQ = jnp.ones((rows, plen), jnp.int32)
    key = jax.random.key(c.seed)
    samp = (jnp.float32(r.temperature), jnp.float32(r.top_p), jnp.int32(r.top_k))
    stop_ids = jnp.full((_MAX_STOP_IDS,), -1, jnp.int32)  # no stop token: every row decodes to the end
    head6 = 6.0 * mc.vocab_size * mc.hidden_size

    # ---- prefill: every row's prompt at once (what the first refill of a step does)
    pre_args = (idx_N, prompt_NxQ, mask_NxQ, key, samp, stop_ids)
    report = P.compile_report(
        progs.prefill,
        state,
        live["cache"],
        live["rows"],
        *pre_args,
        name="prefill",
        out_dir=workdir,
        keep_compiled=True,
    )
    prefill = report.pop("compiled")
    facts, program_facts = _facts(report, mc.vocab_size, kv_shapes)

    def prefill_step(*args):  # the cache and row state are donated: thread them
        live["cache"], live["rows"], tok, logp = prefill(state, live["cache"], live["rows"], *args)
        return tok, logp, live["cache"]

    trace_dir = os.path.join(workdir, "trace_prefill")
    seconds = P.trace_steps(prefill_step, steps, trace_dir, make_args=lambda i: pre_args, annotation="prefill")
    _record(programs, "prefill", report, facts, program_facts, seconds, trace_dir, rows=rows, prompt_len=plen)
    rows_out.append(
        _row(
            f"prefill {rows}x{plen}",
            report,
            facts,
            program_facts,
            tokens=rows * plen,
            # Forward at mean causal context plen / 2, the LM head for the last prompt token only.
            model_fpt=(P.model_flops_per_token(mc, plen) - head6 * (1 - 1 / plen)) / 3,
            seconds=seconds,
            peak=peak,
            peak_how=peak_how,
        )
    )
    on_row()

    # ---- decode: one chunk from the middle of generation, every row live
    count0 = max(1, min(max_new // 2, max_new - chunk))
    run_steps = min(chunk, max_new - count0)  # the chunk stops early once every row hit max_new
    host = jax.device_get(live["rows"])
    mid = host.replace(count_B=np.full((rows,), count0, np.int32), pos_B=host.pos_B + count0 - 1)
    window = window_for(plen, count0, chunk, max_new)
    report = P.compile_report(
        progs.chunk,
        state,
        live["cache"],
        jax.tree.map(engine._place, mid),
        key,
        samp,
        stop_ids,
        steps=chunk,
        window=window,
        name="decode",
        out_dir=workdir,
        keep_compiled=True,
    )
    decode = report.pop("compiled")
    facts, program_facts = _facts(report, mc.vocab_size, kv_shapes)

    def decode_step(rows_state):
        live["cache"], _, ids, logp = decode(state, live["cache"], rows_state, key, samp, stop_ids)
        return ids, logp, live["cache"]

    trace_dir = os.path.join(workdir, "trace_decode")
    seconds = P.trace_steps(
        decode_step, steps, trace_dir, make_args=lambda i: (jax.tree.map(engine._place, mid),), annotation="decode"
    )
    _record(
        programs,
        "decode",
        report,
        facts,
        program_facts,
        seconds,
        trace_dir,
        rows=rows,
        steps=run_steps,
        window=window,
        start_count=count0,
        kv_cache_shapes=kv_shapes,
    )
    keys = plen + count0 + (run_steps - 1) / 2  # mean attended cache slots over the chunk
    rows_out.append(
        _row(
            f"decode {rows}x{run_steps} window={window}",
            report,
            facts,
            program_facts,
            tokens=rows * run_steps,
            model_fpt=P.model_flops_per_token(mc, 2 * keys) / 3,
            seconds=seconds,
            peak=peak,
            peak_how=peak_how,
            loop_steps=run_steps,  # the step loop's body (one decode step) was counted once
        )
    )
    on_row()
