"""Benchmark: one RL update with LoRA against one with every weight trained, and what a weight sync sends.

The update is what the trainer jits: the gradient of a sequence-score loss (the length-normalised token
log-prob, as in bench/logprob_step.py) with respect to the trainable parameters, then an AdamW step on
them, the state donated. Full fine-tuning differentiates every Param; LoRA (rank R on all seven
projections) differentiates the adapters only, over a frozen base. Each side runs in its own process
(one allocator, one peak RSS) and the two alternate `--reps` times. Reported per side: compile seconds,
the median step, trainable parameters, the optimizer state's bytes, XLA's compiled peak (arguments +
outputs + temporaries - aliased), the process's peak RSS, and the bytes one sidecar weight sync writes
(`WeightStore.export`: HF safetensors for full, the PEFT adapter for LoRA).

  python bench/lora_train.py                      # SmolLM2-135M shapes (random weights), 8 x 128 tokens
  python bench/lora_train.py --arch cpu-small --rows 16 --seq 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logprob_step import compiled_peak_bytes, run_worker  # noqa: E402
from lora_decode import config_for  # noqa: E402
from real_train import compiled_update, timed_updates  # noqa: E402


def run_side(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from conspo_jax.models import init_policy
    from conspo_jax.models.lora import LoRAConfig, attach_lora, state_nbytes, trainable_filter
    from conspo_jax.rollout.wire.weights import WeightStore

    config = config_for(args.arch)
    policy = init_policy(config, dtype=jnp.float32, param_dtype=jnp.float32, remat="none")
    if args.side == "lora":
        attach_lora(policy, LoRAConfig(rank=args.rank), dtype=jnp.float32)
    graphdef, params, rest = nnx.split(policy, trainable_filter(policy), ...)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (args.rows, args.seq)), jnp.int32)
    mask = jnp.ones((args.rows, args.seq), bool)
    compiled, compile_s = compiled_update(graphdef, tx, params, opt, rest, ids, mask)
    params, opt, loss, step_s = timed_updates(compiled, params, opt, rest, ids, mask, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        store = WeightStore(tmp)
        sync_bytes = store.nbytes(store.export(nnx.merge(graphdef, params, rest), 1))
    return dict(
        side=args.side,
        compile_s=compile_s,
        step_s=step_s,
        trainable=sum(x.size for x in jax.tree.leaves(params)),
        opt_bytes=state_nbytes(opt),
        xla_peak_bytes=compiled_peak_bytes(compiled.memory_analysis()),
        rss_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        sync_bytes=sync_bytes,
        loss=float(loss),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="smollm2", help="smollm2, cpu-small or a conspo_jax.models name")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up")
    ap.add_argument("--reps", type=int, default=2, help="processes per side, alternating")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    print(f"arch {args.arch}, rank {args.rank}, {args.rows} x {args.seq} tokens, fp32")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}", flush=True)
    base = [sys.executable, os.path.abspath(__file__), "--arch", args.arch, "--rank", str(args.rank)]
    base += ["--rows", str(args.rows), "--seq", str(args.seq), "--steps", str(args.steps)]
    got: dict[str, list[dict]] = {"full": [], "lora": []}
    for rep in range(args.reps):
        for side in ("full", "lora"):
            r = run_worker([*base, "--side", side])
            print(f"  rep {rep} {side}: {json.dumps(r)}", flush=True)
            if "error" in r:
                raise SystemExit(f"{side} failed: {r['error']}")
            got[side].append(r)

    def med(side, key):
        return statistics.median(r[key] for r in got[side])

    rows = [
        ("median step s", "step_s", lambda x: f"{x:.2f}"),
        ("compile s", "compile_s", lambda x: f"{x:.1f}"),
        ("trainable params", "trainable", lambda x: f"{x / 1e6:.2f}M"),
        ("AdamW state MB", "opt_bytes", lambda x: f"{x / 1e6:.1f}"),
        ("XLA compiled peak MB", "xla_peak_bytes", lambda x: f"{x / 1e6:.0f}"),
        ("process peak RSS MB", "rss_peak_bytes", lambda x: f"{x / 1e6:.0f}"),
        ("bytes per weight sync MB", "sync_bytes", lambda x: f"{x / 1e6:.2f}"),
    ]
    print(f"\n| | full | LoRA r{args.rank} | LoRA / full |\n|---|---:|---:|---:|")
    for label, key, fmt in rows:
        f, lo = med("full", key), med("lora", key)
        print(f"| {label} | {fmt(f)} | {fmt(lo)} | {lo / f:.3f}x |")


if __name__ == "__main__":
    main()
