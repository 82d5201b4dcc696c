"""The programs ``conspo profile`` measures, each compiled, analysed and (unless compile-only) traced:

- train:   the RL update, one call = every micro-batch of one mini-batch (``Trainer.step_fn``);
- prefill: the embedded sampler's prompt prefill of all its rows (``DecodePrograms.prefill``);
- decode:  one decode chunk of ``rollout.decode_chunk`` steps mid-generation (``DecodePrograms.chunk``).

Inputs are synthetic, with the shapes the config fixes: random token ids, full attention masks, binary
rewards; the sampler's rows have no stop token, so every decode chunk runs all of its steps. A
compile-only run passes ``jax.ShapeDtypeStruct``s instead, so nothing is allocated.

Counts in the HLO are one device's (the program is SPMD-partitioned over the mesh); the summary rows
multiply FLOPs and the MFU peak by the devices. Model FLOPs per token: train 6 x (non-embedding params +
LM head) + attention (``model_flops_per_token``); prefill and decode are forward only, a third of that at
their attended key counts (prefill runs the LM head for the last prompt token only). Executed FLOPs are
the matmul FLOPs of the optimised HLO; the decode chunk's loop stops on a data-dependent condition, so its
body (one decode step) is counted once by ``hlo_facts`` and multiplied here by the chunk's steps. "KV
copies" of the decode row are per step, memory figures per device.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conspo_jax import profiling as P
from conspo_jax.models import init_kv_cache, kv_cache_sharding
from conspo_jax.rollout.decode import empty_rows, prepare_sampling_state, window_for
from conspo_jax.rollout.jax_engine import _MAX_STOP_IDS
from conspo_jax.train.step import micro_batch_shardings

log = logging.getLogger(__name__)


def _like(struct, placed):
    """``struct``'s shape and dtype in ``placed``'s sharding (abstract values lose theirs in eval_shape)."""
    return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=getattr(placed, "sharding", None))


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
        peak_flops=peak * n if peak else None,
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


def profile_train(trainer, model_config, steps, peak, peak_how, programs, *, compile_only: bool = False) -> dict:
    """The RL update of one mini-batch: compiled, analysed and (unless ``compile_only``) traced; its row."""
    workdir, vocab = trainer.workdir, model_config.vocab_size
    example = trainer.example
    shardings = micro_batch_shardings(example, trainer.mesh)
    if compile_only:
        batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), example, shardings)
    else:
        batch = jax.device_put(synthetic_batch(example, vocab=vocab, seed=trainer.config.seed), shardings)
    progress = jnp.float32(0.5)
    rest, ref = trainer.rest, trainer.ref_params
    report = P.compile_report(
        trainer.step_fn,
        trainer.state,
        batch,
        progress,
        rest,
        ref,
        name="train",
        out_dir=workdir,
        keep_compiled=not compile_only,
    )
    facts, program_facts = _facts(report, vocab)
    log.info(f"train step compiled in {report['compile_s']:.1f} s")
    trace_dir = os.path.join(workdir, "trace_train")
    seconds = measured = None
    if not compile_only:
        compiled = report.pop("compiled")

        def step(batch, progress):  # the state is donated: thread it through the calls
            trainer.state, metrics = compiled(trainer.state, batch, progress, rest, ref)
            return trainer.state, metrics

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


def profile_sampler(trainer, steps, peak, peak_how, programs, rows_out: list, on_row, *, compile_only=False) -> None:
    """The engine's prefill and decode-chunk programs, called as ``run_decode`` calls them; their summary
    rows are appended to rows_out as they finish, on_row() called after each. ``compile_only``: compiled
    and analysed over abstract weights and cache, never run."""
    c, engine, workdir = trainer.config, trainer.engine, trainer.workdir
    r = c.rollout
    if compile_only:  # the engine holds abstract weights: cast them as _sampling_state would, in shapes only
        policy = nnx.merge(engine.graphdef, engine.state)
        cast = jax.eval_shape(lambda s: prepare_sampling_state(s, policy.dtype), engine.state)
        state, mc = jax.tree.map(_like, cast, engine.state), policy.config
    else:
        state, mc = engine._sampling_state()
    progs = engine._fn(r.max_new_tokens)
    max_new, chunk = r.max_new_tokens, engine.decode_chunk
    pairs = r.prompts_per_step * r.n
    rows = min(pairs, engine.decode_rows or pairs)
    plen = -(-trainer.width // engine.bucket) * engine.bucket
    rng = np.random.default_rng(c.seed)
    make_cache = functools.partial(init_kv_cache, mc, rows, plen + max_new, dtype=engine.cache_dtype, mesh=engine.mesh)
    cache = jax.eval_shape(make_cache) if compile_only else make_cache()
    if compile_only and engine.mesh is not None:  # in the sharding init_kv_cache creates it in
        shard = kv_cache_sharding(mc, rows, plen + max_new, engine.mesh)
        cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), cache, shard)
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
        keep_compiled=not compile_only,
    )
    facts, program_facts = _facts(report, mc.vocab_size, kv_shapes)
    trace_dir, seconds = os.path.join(workdir, "trace_prefill"), None
    if not compile_only:
        prefill = report.pop("compiled")

        def prefill_step(*args):  # the cache and row state are donated: thread them
            live["cache"], live["rows"], tok, logp = prefill(state, live["cache"], live["rows"], *args)
            return tok, logp, live["cache"]

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
    # The rows after a prefill (only their shapes matter to a compile-only run, which ran none).
    host = empty_rows(rows, plen) if compile_only else jax.device_get(live["rows"])
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
        keep_compiled=not compile_only,
    )
    facts, program_facts = _facts(report, mc.vocab_size, kv_shapes)
    trace_dir, seconds = os.path.join(workdir, "trace_decode"), None
    if not compile_only:
        decode = report.pop("compiled")

        def decode_step(rows_state):
            live["cache"], _, ids, logp = decode(state, live["cache"], rows_state, key, samp, stop_ids)
            return ids, logp, live["cache"]

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
