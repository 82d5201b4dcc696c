"""The ``conspo`` command line: ``conspo {train,eval,sidecar,sweep,profile} --config path.py[:arg] [--config.a.b=v ...]``.
``conspo import-gguf FILE.gguf OUT_DIR`` takes no config: it converts a llama.cpp file to a HF directory.

Bad input (an unknown config key, a wrong type, a missing path, an unknown objective) ends with one line
on stderr naming the key or value, exit code 2, and no traceback.
"""

from __future__ import annotations

import sys

from absl import flags

from conspo_jax.base import logs
from conspo_jax.base.configs import UsageError, parse_command_line, stderr_line

USAGE = """usage: conspo COMMAND --config path/to/experiment.py[:arg] [--config.key=value ...] [options]
       conspo import-gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16|float16] [--overwrite]

commands:
  train    --workdir DIR [--distributed]         train (resumes from DIR's last checkpoint)
  eval     (--checkpoint DIR | --hf PATH) [--benchmarks a,b] [--workdir DIR] [--distributed]
                                                 evaluate on math benchmarks (paper protocol)
  sidecar  [--engine jax|sglang] [--port N]      serve rollouts over gRPC
  sweep    --sweep S.py[:arg] --workdir DIR [--workers N]
                                                 a study: a grid of train runs, tables and figures
  profile  --workdir DIR [--steps N] [--what train|sample|both] [--peak_tflops F] [--compile_only]
                                                 XLA profile of train's programs: HLO, traces, summary
  import-gguf FILE.gguf OUT_DIR                  a llama.cpp GGUF (Llama) as a HF checkpoint directory
"""


def _distributed_flag(fv):
    flags.DEFINE_bool(
        "distributed",
        False,
        "Start jax.distributed (one process per host); the coordinator and process ids come from "
        "--config.distributed.*, JAX_COORDINATOR_ADDRESS-style variables or the cluster (SLURM, Cloud TPU).",
        flag_values=fv,
    )


def _train_flags(fv):
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, TensorBoard).", flag_values=fv)
    flags.DEFINE_bool(
        "allow_config_change", False, "Resume a run even if its config differs from the run's.", flag_values=fv
    )


def _eval_flags(fv):
    flags.DEFINE_string("checkpoint", None, "Trainer workdir or checkpoint dir to evaluate.", flag_values=fv)
    flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory to evaluate.", flag_values=fv)
    flags.DEFINE_list("benchmarks", None, "Benchmarks to run (default: the config's eval.benchmarks).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Where results.json and samples go.", flag_values=fv)


def _sidecar_flags(fv):
    flags.DEFINE_enum("engine", "jax", ["jax", "sglang"], "Rollout engine behind the sidecar.", flag_values=fv)
    flags.DEFINE_integer("port", None, "Port (default: the config's rollout.sidecar.port).", flag_values=fv)
    flags.DEFINE_string("host", None, "Bind address (default 127.0.0.1).", flag_values=fv)
    flags.DEFINE_bool(
        "allow_insecure_public", False, "Serve a non-loopback --host without a token (unsafe).", flag_values=fv
    )


# Each command imports its own stack inside its runner: `conspo --help` and a bad flag answer without
# loading JAX, and the sidecar never imports the trainer.


# Commands that run on every host of a multi-process job: main() gives them --distributed and starts
# jax.distributed (conspo_jax/base/distributed.py) after parsing and before the command touches a device.
MULTI_PROCESS_COMMANDS = ("train", "eval", "profile")


def _with_distributed_flag(define):
    def both(fv):
        define(fv)
        _distributed_flag(fv)

    return both


def start_processes(fv) -> None:
    """Multi-process start-up from --distributed / distributed.* / JAX_COORDINATOR_ADDRESS (a no-op
    for one process); main() calls it for every command in MULTI_PROCESS_COMMANDS."""
    from conspo_jax.base import distributed

    distributed.initialize(fv.config, enabled=fv.distributed)


def _run_train(fv):
    from conspo_jax.train.trainer import train

    if not fv.workdir:
        raise UsageError("--workdir is required for train")
    train(fv.config, fv.workdir, allow_config_change=fv.allow_config_change)
    return 0


def _run_eval(fv):
    from conspo_jax.evals.command import run_eval_command

    if bool(fv.checkpoint) == bool(fv.hf):
        raise UsageError("eval needs exactly one of --checkpoint DIR or --hf PATH")
    run_eval_command(
        fv.config, checkpoint=fv.checkpoint, hf=fv.hf, benchmarks=fv.benchmarks, workdir=fv.workdir or "runs/eval"
    )
    return 0


def _run_sidecar(fv):
    from conspo_jax.sidecar.server import serve_from_cli

    serve_from_cli(
        fv.config, engine_name=fv.engine, port=fv.port, host=fv.host, allow_insecure_public=fv.allow_insecure_public
    )
    return 0


def _sweep_flags(fv):
    from conspo_jax.sweep.cli import define_flags

    define_flags(fv)


def _run_sweep(fv):
    from conspo_jax.sweep.cli import run

    return run(fv)


def _profile_flags(fv):
    flags.DEFINE_string("workdir", None, "Where the HLO, traces and summary.json go.", flag_values=fv)
    flags.DEFINE_integer("steps", 3, "Traced warm steps per program.", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum(
        "what", "both", ["train", "sample", "both"], "The train step, the sampler's programs, or both.", flag_values=fv
    )
    flags.DEFINE_float(
        "peak_tflops", None, "MFU peak in TFLOP/s (default: a bf16 matmul measured in the run).", flag_values=fv
    )
    flags.DEFINE_bool(
        "compile_only",
        False,
        "Compile and analyse the programs over abstract weights; allocate and run nothing (no traces).",
        flag_values=fv,
    )


def _run_profile(fv):
    from conspo_jax.profiling.command import profile

    if not fv.workdir:
        raise UsageError("--workdir is required for profile")
    summary = profile(
        fv.config, fv.workdir, steps=fv.steps, what=fv.what, peak_tflops=fv.peak_tflops, compile_only=fv.compile_only
    )
    traces = "" if fv.compile_only else " trace_*/ (TensorBoard, Perfetto, memory.prof),"
    print(f"wrote {fv.workdir}: *.stablehlo.txt, *.hlo.txt,{traces} summary.json")
    print(summary["table"], flush=True)
    return 0


def _import_gguf_flags(fv):
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16", "float16"], "Storage dtype of the weights.", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "Replace OUT_DIR if it exists and is not empty.", flag_values=fv)


def _run_import_gguf(fv, args):
    from conspo_jax.models.gguf_import import import_gguf

    if len(args) != 2:
        raise UsageError(f"import-gguf takes two arguments, FILE.gguf OUT_DIR; got {len(args)}")
    out = import_gguf(args[0], args[1], dtype=fv.dtype, overwrite=fv.overwrite)
    print(f"wrote {out}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json", flush=True)
    return 0


def _parse_positional(argv, define_flags) -> tuple[flags.FlagValues, list[str]]:
    """Flags and positional arguments of a command that takes paths and no --config."""
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(str(e)) from None
    return fv, rest[1:]


# Commands whose runner is run(fv, positional_args) and that take no --config.
POSITIONAL_COMMANDS = ("import-gguf",)

COMMANDS = {
    "train": (_train_flags, _run_train),
    "eval": (_eval_flags, _run_eval),
    "sidecar": (_sidecar_flags, _run_sidecar),
    "sweep": (_sweep_flags, _run_sweep),
    "profile": (_profile_flags, _run_profile),
    "import-gguf": (_import_gguf_flags, _run_import_gguf),
}


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[1]
    if command not in COMMANDS:
        stderr_line(f"conspo: unknown command {command!r} (expected one of {', '.join(COMMANDS)})")
        return 2
    define, run = COMMANDS[command]
    multi = command in MULTI_PROCESS_COMMANDS
    logs.console()
    try:
        if command in POSITIONAL_COMMANDS:
            return run(*_parse_positional([f"conspo {command}", *argv[2:]], define))
        fv = parse_command_line([f"conspo {command}", *argv[2:]], _with_distributed_flag(define) if multi else define)
        if multi:
            start_processes(fv)
        return run(fv)
    except UsageError as e:
        stderr_line(f"conspo {command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        stderr_line(f"conspo {command}: interrupted")
        return 130


def entry() -> None:
    sys.exit(main())
