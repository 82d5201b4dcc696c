"""The train-step rows of bench/real_model.py: one RL update on a real checkpoint, ours against torch.

Both sides load the same HF checkpoint and run the same step on the same random token ids: token
log-probs (the model's forward, an fp32 log-softmax gathered at the next token), the length-normalised
sequence score that ConSPO differentiates, backward, one AdamW step. Ours is one jitted program over
`nnx.split` state with the parameters and optimizer state donated; torch is `LlamaForCausalLM` with SDPA
attention and `torch.optim.AdamW`. Each side runs in its own process; peak memory is that process's
resident high-water mark (VmHWM) on the CPU, the allocator's peak on a GPU. The limit is the step's
model FLOPs (6 N per token plus attention) over the matmul ceiling measured by real_model.py.

    python bench/real_train.py --path ~/.cache/conspo_jax/smollm2-135m-instruct --sizes 16x512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logprob_step import flops_per_token, run_worker, sequence_score_loss, torch_sequence_score_loss  # noqa: E402

LR = 1e-6


def _token_ids(vocab: int, rows: int, seq: int):
    """The same random token ids on both sides (so the first step's losses agree)."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (rows, seq)).astype(np.int64)


def _peak_bytes(gpu_peak: int | None = None) -> int:
    if gpu_peak is not None:
        return gpu_peak
    from real_model import peak_rss_bytes

    return peak_rss_bytes()


def compiled_update(graphdef, tx, params, opt, rest, ids, mask):
    """The jitted RL update bench rows time: the gradient of `sequence_score_loss` with respect to
    `params`, then a `tx` step, params and optimizer state donated. Returns (compiled, compile seconds)."""
    import jax
    import optax

    loss_grad = jax.value_and_grad(sequence_score_loss(graphdef))

    def step(params, opt, rest, ids, mask):
        loss, grads = loss_grad(params, rest, ids, mask)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, rest, ids, mask).compile()
    return compiled, time.perf_counter() - t0


def timed_updates(compiled, params, opt, rest, ids, mask, steps: int):
    """Runs `steps` + 1 updates (the first a warm-up); returns (params, opt, last loss, median seconds)."""
    import jax

    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        params, opt, loss = compiled(params, opt, rest, ids, mask)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return params, opt, loss, statistics.median(times[1:])


def run_ours(path: str, rows: int, seq: int, steps: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from conspo_jax.models import load_hf_policy

    policy = load_hf_policy(path, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    tx = optax.adamw(LR)
    opt = tx.init(params)
    ids = jnp.asarray(_token_ids(policy.config.vocab_size, rows, seq), jnp.int32)
    mask = jnp.ones((rows, seq), bool)
    compiled, compile_s = compiled_update(graphdef, tx, params, opt, rest, ids, mask)
    _, _, loss, step_s = timed_updates(compiled, params, opt, rest, ids, mask, steps)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(side="ours", step_s=step_s, compile_s=compile_s, loss=float(loss),
                peak_bytes=_peak_bytes(stats.get("peak_bytes_in_use")))  # fmt: skip


def run_torch(path: str, rows: int, seq: int, steps: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = torch.from_numpy(_token_ids(model.config.vocab_size, rows, seq)).to(device)
    mask = torch.ones((rows, seq), dtype=torch.long, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_sequence_score_loss(model, ids, mask)
        loss.backward()
        opt.step()
        return loss

    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = float(step())
        times.append(time.perf_counter() - t0)
    return dict(side="torch", step_s=statistics.median(times[1:]), loss=loss,
                peak_bytes=_peak_bytes(torch.cuda.max_memory_allocated() if on_gpu else None))  # fmt: skip


def train_step_rows(path: str, *, sizes, limits: dict | None = None, steps: int = 2, dtype: str = "float32"):
    """One markdown row per (rows, seq) of bench/real_model.py's table: ours, torch, the speed ratio, both
    peaks, and ours as a fraction of the matmul ceiling (when `limits` is given)."""
    from conspo_jax.models.hf_io import read_hf_config

    config = read_hf_config(path)
    out = []
    for rows, seq in sizes:
        got = {}
        for side in ("ours", "torch"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--path", path]
            got[side] = run_worker(cmd + ["--sizes", f"{rows}x{seq}", "--steps", str(steps), "--dtype", dtype])
            print(f"  train {rows}x{seq} {side}: {json.dumps(got[side])}", flush=True)
        ours, torch_ = got["ours"], got["torch"]
        if "error" in ours or "error" in torch_:
            out.append({"markdown": f"| train {rows}x{seq} | {ours} | {torch_} | - | - | - |"})
            continue
        tokens = rows * seq
        flops = flops_per_token(config, seq) * tokens
        frac = f"{flops / ours['step_s'] / limits['jax_flops']:.0%} of matmul" if limits else "-"
        out.append(
            dict(
                ours=ours,
                torch=torch_,
                markdown=f"| train step {rows}x{seq} (logp + backward + AdamW) | {ours['step_s']:.1f} s "
                f"({tokens / ours['step_s']:.0f} tok/s, compile {ours['compile_s']:.0f} s) | "
                f"{torch_['step_s']:.1f} s | {torch_['step_s'] / ours['step_s']:.2f}x | "
                f"{ours['peak_bytes'] / 2**30:.2f} / {torch_['peak_bytes'] / 2**30:.2f} | {frac} |",
            )
        )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=None, help="HF checkpoint dir (default: the imported SmolLM2)")
    ap.add_argument("--sizes", default="16x512", help="comma list of ROWSxSEQ")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    if args.path is None:
        from conspo_jax.models.smollm2 import smollm2_dir

        args.path = smollm2_dir()
    if args.worker:
        fn = {"ours": run_ours, "torch": run_torch}[args.worker]
        try:
            res = fn(args.path, *sizes[0], args.steps, args.dtype)
        except Exception as e:  # an OOM or a crash becomes a row, not a lost table
            res = dict(side=args.worker, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        print("RESULT " + json.dumps(res), flush=True)
        return
    for r in train_step_rows(args.path, sizes=sizes, steps=args.steps, dtype=args.dtype):
        print(r["markdown"])


if __name__ == "__main__":
    main()
