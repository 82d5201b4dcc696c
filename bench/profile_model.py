"""Profile of the policy's RL update and sampler programs at a model's real size: a front for `conspo profile`.

It runs `conspo profile` on experiments/r1_distill_qwen_1p5b.py:random (random weights of the
R1-Distill-Qwen-1.5B architecture, or --arch NAME; with --cpu the tiny config), with no checkpoint,
tokenizer or data to fetch: the synthetic task's tokenizer, a generated prompt file, no evaluation. The
update takes one prompt of B samples of T tokens (--shape BxT: 256 prompt tokens, or T/4 when T <= 512,
and T minus that of completion), so it is the update `conspo train` would run at that shape. What is
reported, and how, is `conspo profile`'s (conspo_jax/profiling/): compile reports, HLO facts and, unless
--compile-only, traces of --steps warm steps; the summary table is printed last and OUT/summary.json
written.

  python bench/profile_model.py                       # GPU: 1.5B, 8x2048, bf16, remat full
  python bench/profile_model.py --cpu                 # tiny config, runs to the end on a CPU
  python bench/profile_model.py --compile-only --shape 8x2048 --no-decode   # CPU: analyse the 1.5B update
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "r1_distill_qwen_1p5b.py")


def parse_shape(text: str, flag: str) -> tuple[int, int]:
    try:
        b, t = (int(x) for x in text.lower().split("x"))
        if b < 1 or t < 8:
            raise ValueError
    except ValueError:
        raise SystemExit(f"{flag}={text!r} must be BxT with B >= 1 and T >= 8, e.g. 8x2048") from None
    return b, t


def profile_argv(args, prompts_path: str) -> list[str]:
    """The `conspo profile` command line these options stand for."""
    batch, seq = parse_shape(args.shape or ("2x256" if args.cpu else "8x2048"), "--shape")
    prompt = 256 if seq > 512 else seq // 4
    argv = [
        f"--config={os.path.normpath(CONFIG)}:random",
        f"--workdir={args.out}",
        f"--steps={args.steps}",
        f"--what={'train' if args.no_decode else 'both'}",
        "--config.tokenizer=arith",
        f"--config.data.train={prompts_path}",
        "--config.eval.benchmarks=",
        "--config.eval.every=0",
        "--config.rollout.prompts_per_step=1",
        f"--config.rollout.n={batch}",
        f"--config.data.max_prompt_len={prompt}",
        f"--config.rollout.max_new_tokens={seq - prompt}",
        f"--config.model.remat={args.remat}",
        f"--config.model.dtype={args.dtype or ('float32' if args.cpu else 'bfloat16')}",
        f"--config.model.logprob_chunk={args.logprob_chunk}",
        f"--config.model.arch={'tiny-qwen2' if args.cpu else args.arch}",
    ]
    if args.compile_only:
        argv.append("--compile_only")
    if args.peak_flops:
        argv.append(f"--peak_tflops={args.peak_flops / 1e12}")
    return argv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny config and shapes that run on a CPU in seconds")
    p.add_argument("--arch", default="r1-distill-qwen-1.5b", help="named model config (ignored with --cpu)")
    p.add_argument("--shape", default=None, help="update rows x tokens, BxT (default 8x2048; --cpu 2x256)")
    p.add_argument("--no-decode", action="store_true", help="profile the update only, not the sampler")
    p.add_argument("--remat", default="full", help="model.remat policy of the update")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; --cpu float32)")
    p.add_argument("--logprob-chunk", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="traced warm steps per program")
    p.add_argument("--compile-only", action="store_true", help="analyse the compiled programs, run nothing")
    p.add_argument("--peak-flops", type=float, default=None, help="MFU peak FLOP/s (default: measured matmul)")
    p.add_argument("--out", default="/tmp/conspo_profile_model", help="directory for HLO, traces, summary.json")
    args = p.parse_args(argv)

    from conspo_jax.cli import main as conspo

    os.makedirs(args.out, exist_ok=True)
    prompts = os.path.join(args.out, "prompts.jsonl")
    with open(prompts, "w") as f:  # the prompts' content is irrelevant: profiling feeds random tokens
        for i in range(1, 17):
            f.write(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
    command = ["conspo profile", *profile_argv(args, prompts)]
    print("command:", " ".join(command), flush=True)
    return conspo(["conspo", "profile", *command[1:]])


if __name__ == "__main__":
    sys.exit(main())
