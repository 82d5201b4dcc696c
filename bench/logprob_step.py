"""Benchmark: forward+backward of a sequence-score policy loss, conspo-jax vs HF transformers (PyTorch).

The loss is what sequence-level objectives (ConSPO, GSPO, ...) differentiate: the mean over rows of
the length-normalised token log-prob, -mean_b(sum_t logp[b,t] / T_b). Both frameworks run the same
architecture with random weights on the same device, each in its own subprocess so that neither one's
allocator pool distorts the other's peak memory. JAX runs with bf16 compute (fp32 on CPU unless
--dtype), chunked fp32 log-softmax and the chosen remat; torch runs SDPA attention with and without
gradient checkpointing, computing log-probs from full fp32 logits the usual way.

Reported per row: tokens/s, peak memory, compile seconds and model-FLOP utilisation, where model FLOPs
per token = 6 * non-embedding params + 6 * layers * d_model * seq_len. MFU is given twice: against a
matmul ceiling measured in the same run (a large matmul in the compute dtype, bf16 on GPU, in its own
subprocess) and, on GPU, against the dense bf16 spec sheet (H100/H200: 989 TFLOP/s). Each timed step
drops the previous step's loss and gradients before the next call, so the peak is one step's.

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
def sequence_score_loss(graphdef):
    """(params, rest, ids, mask) -> minus the mean length-normalised token log-prob (what sequence-level
    objectives differentiate), for a policy split into ``graphdef``, params and rest."""
    import jax.numpy as jnp
    from flax import nnx

    from conspo_jax.models import token_logprobs

    def loss_fn(params, rest, ids, mask):
        logp = token_logprobs(nnx.merge(graphdef, params, rest), ids, mask)
        n = jnp.maximum((mask[:, 1:] & mask[:, :-1]).sum(axis=1), 1)
        return -jnp.mean(logp.sum(axis=1) / n)

    return loss_fn


def compiled_peak_bytes(analysis) -> int:
    """XLA's compiled-memory estimate of a program's peak: arguments + outputs + temporaries - aliased."""
    return (
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def torch_sequence_score_loss(model, ids, mask):
    """The same loss for a transformers causal LM, from full fp32 logits the usual way."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].float()
    return -((logp * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def run_jax(args, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from conspo_jax.models import init_policy

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

    step = jax.jit(jax.value_and_grad(sequence_score_loss(graphdef)))
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
    out = None
    for _ in range(args.steps):
        # Drop the previous step's outputs first: otherwise its fp32 gradients stay alive while this
        # step allocates its own, and the peak counts two gradient sets.
        out = None
        out = compiled(params, rest, ids, mask)
    jax.block_until_ready(out)
    loss = out[0]
    elapsed = time.time() - t0
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, how = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    else:
        peak = compiled_peak_bytes(analysis)
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
        loss = torch_sequence_score_loss(model, ids, mask)
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


def measure_matmul_ceiling(dtype_name: str | None) -> dict:
    """FLOP/s of a large square matmul in the compute dtype on this device: the ceiling MFU is read against."""
    import jax
    import jax.numpy as jnp

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(dtype_name or ("bfloat16" if on_gpu else "float32"))
    n, reps = (8192, 20) if on_gpu else (2048, 5)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a: a @ a)  # fp32 accumulation inside the dot, output in the input dtype
    f(a).block_until_ready()
    best = 0.0
    for _ in range(3):  # best of three timed rounds: the ceiling, not an average
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return dict(peak_flops=best, note=f"measured {dtype.name} {n}^3 matmul, this run")


def worker(args) -> None:
    batch, seq = (int(x) for x in args.worker_shape.split("x"))
    try:
        if args.worker == "jax":
            out = run_jax(args, batch, seq)
        elif args.worker == "peak":
            out = measure_matmul_ceiling(args.dtype)
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
    out = run_worker(cmd)
    if "error" in out and "framework" not in out:  # the process died before reporting: name the side
        out = {"framework": kind, **out}
    return out


def run_worker(cmd: list[str]) -> dict:
    """Runs a worker process and returns the JSON of its `RESULT ` line, or {"error": ...} with its exit
    status and last line of output (a crash or an OOM kill becomes a row in the table)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(error=f"exit {proc.returncode}: {tail[0][:160]}")


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
    p.add_argument("--remat", default=None, help="JAX remat policy (default: names on GPU, none on CPU)")
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
    args.remat = args.remat or ("names" if on_gpu else "none")
    args.logprob_chunk = args.logprob_chunk or (2048 if on_gpu else 512)
    if args.shapes:
        shapes = args.shapes.split(",")
    elif args.batch or args.seq:
        shapes = [f"{args.batch or 4}x{args.seq or 512}"]
    else:
        shapes = (GPU_SHAPES if on_gpu else CPU_SHAPES).split(",")
    device = jax.devices()[0]
    spec = next((v for k, v in GPU_PEAK_FLOPS.items() if k in device.device_kind), None) if on_gpu else None
    ceiling = spawn(args, "peak", "1x1")
    peak = ceiling.get("peak_flops")
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
    print(
        f"MFU ceiling: {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s ({ceiling.get('note', ceiling)}); "
        f"spec sheet: {f'{spec / 1e12:.0f} TFLOP/s dense bf16' if spec else 'n/a'}"
    )
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
        f"{'MFU':>6} {'MFU spec':>8} {'compile s':>9} {'jax/torch tok/s':>16} {'torch/jax mem':>14}"
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
            mfu_spec = f"{tps * flops_per_token(config, seq) / spec:.1%}" if spec else "n/a"
            compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
            ratio_t = ratio_m = ""
            if jx and r["framework"] == "torch":
                ratio_t = f"{(jx['tokens'] / jx['seconds']) / tps:.2f}x"
                ratio_m = f"{r['peak_bytes'] / jx['peak_bytes']:.2f}x"
            print(
                f"{shape:>9} {r['framework']:<9} {r['variant']:<34} {tps:>10.0f} "
                f"{r['peak_bytes'] / 2**30:>9.3f} {mfu:>6.1%} {mfu_spec:>8} {compile_s:>9} {ratio_t:>16} {ratio_m:>14}"
            )
    hows = sorted({f"{r['framework']}: {r['peak_how']}" for r in rows if "peak_how" in r})
    print("peak memory: " + "; ".join(hows))


if __name__ == "__main__":
    main()
