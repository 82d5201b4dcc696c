"""`conspo profile`: an XLA profiling run of exactly the programs `conspo train` runs.

A ``Trainer`` is built from the config (the build layer, the train state, the jitted update of
``conspo_jax.train.programs``, the rollout engine) without its supervised warm start: programs and shapes
are training's, the weights random (or a run's last checkpoint when the workdir holds one). What is
measured of each program, and how, is ``conspo_jax.profiling.programs``.

For each program the workdir gets ``<name>.stablehlo.txt`` and ``<name>.hlo.txt`` (lowered and optimised),
``trace_<name>/`` (N warm steps, each under ``StepTraceAnnotation(name)`` and blocked: an XPlane for
TensorBoard / XProf under ``plugins/profile/``, ``perfetto_trace.json.gz`` for ui.perfetto.dev, and a
device memory profile ``memory.prof``), and ``summary.json`` holds the compile reports (XLA cost and
memory analyses, compile seconds), the HLO facts and the summary rows (``conspo_jax.profiling``).

``compile_only``: no Trainer and no weights. The same programs are built from the same functions over
abstract state (``jax.ShapeDtypeStruct`` leaves with the trainer's shardings), compiled and analysed, and
nothing runs: no traces, no step times, no MFU. A GPU-sized run's HLO facts, FLOPs and compiled memory
can be read this way on a CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from conspo_jax import profiling as P
from conspo_jax.base import logs
from conspo_jax.base.configs import UsageError
from conspo_jax.models.sharding import state_shardings
from conspo_jax.profiling.programs import profile_sampler, profile_train
from conspo_jax.rollout.jax_engine import JaxEngine
from conspo_jax.run import build
from conspo_jax.train import programs as train_programs
from conspo_jax.train.step import TrainState, make_optimizer
from conspo_jax.train.step import state_shardings as train_state_shardings
from conspo_jax.train.trainer import Trainer

log = logging.getLogger(__name__)

WHAT = ("train", "sample", "both")


def profile(
    config,
    workdir: str,
    *,
    steps: int = 3,
    what: str = "both",
    peak_tflops: float | None = None,
    compile_only: bool = False,
) -> dict:
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
    run = AbstractRun(config, workdir) if compile_only else Trainer(config, workdir, warm_start=False)
    try:
        return _profile(run, steps=steps, what=what, peak_tflops=peak_tflops, compile_only=compile_only)
    finally:
        run.close()


class AbstractRun:
    """What profiling reads of a ``Trainer`` (programs, state, engine), with nothing allocated.

    Built through the same functions as the trainer's (``conspo_jax.run.build``,
    ``conspo_jax.train.programs``), so the programs compiled are the ones a run would compile; the train
    state is laid out as ``init_train_state`` lays it out (parameters in their shardings, the rest
    replicated). Nothing is written to ``workdir`` but what profiling writes.
    """

    start = 0

    def __init__(self, config, workdir: str):
        build.validate(config)
        os.makedirs(workdir, exist_ok=True)
        self.config, self.workdir = config, workdir
        tokenizer = build.build_tokenizer(config)
        self.mesh = build.build_mesh(config)
        policy = _with_shardings(build.build_policy(config, tokenizer, self.mesh, seed=config.seed, abstract=True))
        self.graphdef, params, self.rest = nnx.split(policy, nnx.Param, ...)
        objective_fn, objective_kwargs = train_programs.objective_of(config)
        optimizer = make_optimizer(**config.optim)
        state = jax.eval_shape(
            lambda p: TrainState(
                step=jnp.int32(0), params=p, opt_state=optimizer.init(p), rng=jax.random.key_data(jax.random.key(0))
            ),
            params,
        )
        state = state.replace(params=params)
        self.state = jax.tree.map(_struct, state, train_state_shardings(state, self.mesh))
        self.ref_params = params if objective_fn.requires_ref_logp(**objective_kwargs) else None
        self.width = config.data.max_prompt_len
        self.example = train_programs.example_batch(config, needs_old_logp=train_programs.uses_old_logp(config))
        self.step_fn = train_programs.build_step_fn(
            config, self.state, self.example, self.mesh, self.graphdef, self.rest, self.ref_params, optimizer
        )
        # The embedded engine only splits the policy it is given: abstract weights are no problem until
        # it samples, which a compile-only run never does. Other backends are not built (another process).
        self.engine = (
            build.make_engine(config, policy, tokenizer, self.mesh) if config.rollout.backend == "jax" else None
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _struct(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _with_shardings(policy):
    """An abstract policy whose leaves carry the shardings ``init_policy`` would create them in."""
    graphdef, state = nnx.split(policy)
    if policy.mesh is None:
        return policy
    return nnx.merge(graphdef, jax.tree.map(_struct, state, state_shardings(state, policy.mesh)))


def _profile(run, *, steps: int, what: str, peak_tflops: float | None, compile_only: bool) -> dict:
    c, workdir = run.config, run.workdir
    device = jax.devices()[0]
    model_config = nnx.merge(run.graphdef, run.state.params, run.rest).config
    if peak_tflops:
        peak, peak_how = float(peak_tflops) * 1e12, "given (--peak_tflops)"
    elif compile_only:  # nothing runs, so there is no MFU to divide by a peak
        peak, peak_how = None, "none: compile only"
    else:
        on_gpu = jax.default_backend() == "gpu"
        dtype, n = (jnp.bfloat16, 8192) if on_gpu else (jnp.dtype(c.model.dtype), 1024)
        peak = P.measure_matmul_peak(dtype, n)
        peak_how = f"measured {jnp.dtype(dtype).name} {n}^3 matmul, this run"
    rows, programs, notes = [], {}, []
    if compile_only:
        notes.append("compile only: programs compiled and analysed over abstract state, nothing run or traced")
    cache_dir = jax.config.jax_compilation_cache_dir or None
    if cache_dir:
        notes.append(f"compile s may be persistent-cache hits: the compilation cache {cache_dir} is on")
    head = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=f"{platform.node()}, {os.cpu_count()} CPUs, {device.device_kind} ({jax.default_backend()})",
        jax=jax.__version__,
        what=what,
        steps=steps,
        compile_only=compile_only,
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
        rows.append(profile_train(run, model_config, steps, peak, peak_how, programs, compile_only=compile_only))
        save()
    if what in ("sample", "both"):
        if isinstance(run.engine, JaxEngine):
            profile_sampler(run, steps, peak, peak_how, programs, rows, on_row=save, compile_only=compile_only)
        else:
            notes.append(f"sampler not profiled: rollout.backend={c.rollout.backend!r} runs outside this process")
            log.info(notes[-1])
    return save()
