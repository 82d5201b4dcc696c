"""Benchmark: forward+backward of a sequence-score policy loss, conspo-jax vs HF transformers (PyTorch).

The loss is what sequence-level objectives (ConSPO, GSPO, ...) differentiate: the mean over rows of
the length-normalised token log-prob, -mean_b(sum_t logp[b,t] / T_b). Both frameworks run the same
architecture with random weights on the same device, each in its own subprocess so that neither one's
allocator pool distorts the other's peak memory. JAX runs with bf16 compute (fp32 on CPU unless
--dtype), chunked fp32 log-softmax and the chosen remat; torch runs SDPA attention with and without
gradient checkpointing, computing log-probs from full fp32 logits the usual way.

Reported per row: tokens/s, peak memory and model-FLOP utilisation, where model FLOPs per token =
6 * non-embedding params + 6 * layers * d_model * seq_len. Peak FLOP/s: the GPU's dense bf16 spec
(H100/H200: 989 TFLOP/s), or on CPU a measured fp32 matmul rate (so CPU "MFU" is relative to what a
large matmul achieves on this machine).

  python bench/logprob_step.py                        # CPU: small config, 4x512; GPU: R1-Distill-Qwen-1.5B
  python bench/logprob_step.py --arch r1-distill-qwen-1.5b --shapes 8x2048,16x2048,4x8192,16x8192
  python bench/logprob_step.py --batch 4 --seq 512 --steps 5 --remat full
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

# Torch and JAX share the device in one run: JAX must not grab 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

GPU_SHAPES = "8x2048,16x2048,4x8192,16x8192"
CPU_SHAPES = "4x512"
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def _cpu_bench_config():
    from conspo_jax.models import get_model_config

    return get_model_config(
        "tiny-qwen2",
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=32768,
    )


def model_config(arch: str):
    from conspo_jax.models import get_model_config

    return _cpu_bench_config() if arch == "cpu-small" else get_model_config(arch)


def flops_per_token(config, seq: int) -> float:
    return 6 * config.num_params(embeddings=False) + 6 * config.num_layers * config.hidden_size * seq


class RssPeak:
    """Peak resident memory growth of this process while active (CPU torch runs), sampled at 2 ms."""

    def __init__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------- workers
def run_jax(args, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from conspo_jax.models import init_policy, token_logprobs

    config = model_config(args.arch)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    policy = init_policy(
        config,
        dtype=dtype,
        param_dtype=jnp.float32,
        remat=args.remat,
        logprob_chunk=args.logprob_chunk,
        attn_impl=args.attn_impl,
    )
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    del policy

    def loss_fn(params, rest, ids, mask):
        logp = token_logprobs(nnx.merge(graphdef, params, rest), ids, mask)
        n = jnp.maximum((mask[:, 1:] & mask[:, :-1]).sum(axis=1), 1)
        return -jnp.mean(logp.sum(axis=1) / n)

    step = jax.jit(jax.value_and_grad(loss_fn))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), bool)
    t0 = time.time()
    compiled = step.lower(params, rest, ids, mask).compile()
    compile_s = time.time() - t0
    analysis = compiled.memory_analysis()
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, rest, ids, mask))
    t0 = time.time()
    for _ in range(args.steps):
        loss, grads = compiled(params, rest, ids, mask)
    jax.block_until_ready((loss, grads))
    elapsed = time.time() - t0
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, how = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    else:
        peak = (
            analysis.temp_size_in_bytes
            + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes
        )
        how = "XLA compiled memory analysis (args+outputs+temps)"
    return dict(
        framework="jax",
        variant=f"remat={args.remat}, {dtype.name}, chunk={args.logprob_chunk}",
        seconds=elapsed,
        tokens=batch * seq * args.steps,
        peak_bytes=int(peak),
        peak_how=how,
        loss=float(loss),
        compile_s=compile_s,
        device=str(jax.devices()[0].device_kind),
    )


def run_torch(args, batch: int, seq: int, checkpointing: bool) -> dict:
    import tempfile

    import torch
    import transformers

    config = model_config(args.arch)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    if not on_gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f)
        hf_config = transformers.AutoConfig.from_pretrained(tmp)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype).to(device)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    mask = torch.ones((batch, seq), dtype=torch.long, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:].float()
        loss = -((logp * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        loss.backward()
        return loss

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # CPU: peak RSS growth from just after model creation (weights resident) through warm-up and the
    # timed steps, plus the weights: params + grads + activations, as JAX's args+outputs+temps.
    rss = RssPeak() if not on_gpu else contextlib.nullcontext()
    with rss:
        for _ in range(args.warmup):
            step()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for _ in range(args.steps):
            loss = step()
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = time.time() - t0
    if on_gpu:
        peak, how = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, how = rss.peak - rss.base + weights, "peak RSS growth + weights"
    return dict(
        framework="torch",
        variant=f"sdpa, {'grad ckpt' if checkpointing else 'no ckpt'}, {str(dtype).split('.')[-1]}",
        seconds=elapsed,
        tokens=batch * seq * args.steps,
        peak_bytes=int(peak),
        peak_how=how,
        loss=float(loss),
        device=torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
    )


def measure_cpu_peak_flops() -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.time()
    reps = 5
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.time() - t0)


def worker(args) -> None:
    batch, seq = (int(x) for x in args.worker_shape.split("x"))
    try:
        if args.worker == "jax":
            out = run_jax(args, batch, seq)
        elif args.worker == "peak":
            out = dict(peak_flops=measure_cpu_peak_flops())
        else:
            out = run_torch(args, batch, seq, checkpointing=args.worker == "torch-ckpt")
    except Exception as e:  # OOM and friends become a row in the table, not a crash
        out = dict(framework=args.worker, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent
def spawn(args, kind: str, shape: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--worker-shape",
        shape,
        "--arch",
        args.arch,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--remat",
        args.remat,
        "--logprob-chunk",
        str(args.logprob_chunk),
        "--attn-impl",
        args.attn_impl,
    ] + (["--dtype", args.dtype] if args.dtype else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(framework=kind, error=f"exit {proc.returncode}: {tail[0][:160]}")


def versions() -> str:
    out = []
    for mod in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod} absent")
    return ", ".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=None, help="named config (see get_model_config) or cpu-small")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--shapes", default=None, help="comma list of BxT, e.g. 8x2048,16x2048")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--remat", default=None, help="JAX remat policy (default: full on GPU, none on CPU)")
    p.add_argument(
        "--logprob-chunk",
        type=int,
        default=None,
        help="tokens per log-softmax chunk (default: 2048 on GPU, 512 on CPU)",
    )
    p.add_argument("--attn-impl", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import jax

    on_gpu = jax.default_backend() == "gpu"
    args.arch = args.arch or ("r1-distill-qwen-1.5b" if on_gpu else "cpu-small")
    args.remat = args.remat or ("full" if on_gpu else "none")
    args.logprob_chunk = args.logprob_chunk or (2048 if on_gpu else 512)
    if args.shapes:
        shapes = args.shapes.split(",")
    elif args.batch or args.seq:
        shapes = [f"{args.batch or 4}x{args.seq or 512}"]
    else:
        shapes = (GPU_SHAPES if on_gpu else CPU_SHAPES).split(",")
    device = jax.devices()[0]
    if on_gpu:
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in device.device_kind), None)
        peak_note = f"{device.device_kind} dense bf16 spec"
    else:
        peak = spawn(args, "peak", "1x1").get("peak_flops")
        peak_note = "measured 2048^3 fp32 matmul on this CPU"
    config = model_config(args.arch)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"device {device.device_kind} ({jax.default_backend()})"
    )
    print(f"versions: python {platform.python_version()}, {versions()}")
    print(
        f"arch: {args.arch} (non-embedding params {config.num_params(embeddings=False) / 1e6:.1f}M, "
        f"vocab {config.vocab_size}, d={config.hidden_size}, layers {config.num_layers})"
    )
    print(f"peak FLOP/s for MFU: {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s ({peak_note})")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}", flush=True)

    rows = []
    for shape in shapes:
        kinds = ["jax"] + ([] if args.no_torch else ["torch", "torch-ckpt"])
        for kind in kinds:
            r = spawn(args, kind, shape)
            r["shape"] = shape
            rows.append(r)
            print("  " + json.dumps(r), flush=True)

    print()
    header = (
        f"{'shape':>9} {'framework':<9} {'variant':<34} {'tok/s':>10} {'peak GiB':>9} "
        f"{'MFU':>6} {'jax/torch tok/s':>16} {'torch/jax mem':>14}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        group = [r for r in rows if r["shape"] == shape]
        seq = int(shape.split("x")[1])
        jx = next((r for r in group if r.get("framework") == "jax" and "error" not in r), None)
        for r in group:
            if "error" in r:
                print(f"{shape:>9} {r['framework']:<9} ERROR {r['error']}")
                continue
            tps = r["tokens"] / r["seconds"]
            mfu = tps * flops_per_token(config, seq) / peak if peak else float("nan")
            ratio_t = ratio_m = ""
            if jx and r["framework"] == "torch":
                ratio_t = f"{(jx['tokens'] / jx['seconds']) / tps:.2f}x"
                ratio_m = f"{r['peak_bytes'] / jx['peak_bytes']:.2f}x"
            print(
                f"{shape:>9} {r['framework']:<9} {r['variant']:<34} {tps:>10.0f} "
                f"{r['peak_bytes'] / 2**30:>9.3f} {mfu:>6.1%} {ratio_t:>16} {ratio_m:>14}"
            )
    hows = sorted({f"{r['framework']}: {r['peak_how']}" for r in rows if "peak_how" in r})
    print("peak memory: " + "; ".join(hows))


if __name__ == "__main__":
    main()
