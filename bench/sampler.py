"""Benchmark: rollout sampling, conspo-jax's JaxEngine vs HF transformers `generate` (PyTorch) and vs the
static-batch engine it replaced (bench/static_engine.py), on the same random weights and the same batch.

Both JAX engines and HF sample (temperature 1, top-p 1 unless --top-p) from one random policy: ours is
built first and written with `save_hf_policy`, which HF loads, so all three run identical weights.

Reported per engine: useful tokens/s (completion tokens up to and including EOS, no padding), the
steady-state seconds of one generate call, compile seconds (first call minus steady call) and the
ratio of tokens/s to HF's and to the static engine's. Two batch kinds:
- full: every row runs to max_new_tokens (random weights rarely emit EOS);
- long-tail: a constant EOS logit bias is baked into the weights (hidden dim 0 made constant through
  the embedding, the LM head reads it only into the EOS logit) so that the median row stops at 10%
  of the limit and lengths are geometric: the case where a static batch wastes most of its steps.

  python bench/sampler.py --preset cpu     # random Qwen2, 4 layers, d=256, vocab 16384, 32 + 128 tokens
  python bench/sampler.py --preset gpu     # R1-Distill-Qwen-1.5B architecture, bf16, 256 x (32 + 512)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "cpu": dict(arch="cpu-small", batches=(64, 256), prompt=32, new=128, dtype="float32", tail_batch=256),
    "gpu": dict(arch="r1-distill-qwen-1.5b", batches=(256,), prompt=32, new=512, dtype="bfloat16", tail_batch=256),
}


def model_config(arch: str):
    from conspo_jax.models import get_model_config

    if arch != "cpu-small":
        return get_model_config(arch)
    return get_model_config(
        "tiny-qwen2",
        vocab_size=16384,
        hidden_size=256,
        intermediate_size=1024,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
    )


def bake_eos_bias(policy, eos: int, hazard: float):
    """Makes P(EOS) ~= hazard at every step, in the weights themselves (so HF sees the same model)."""
    import jax
    import jax.numpy as jnp

    from conspo_jax.models import hidden_states

    if policy.config.tie_word_embeddings:
        raise ValueError("bake_eos_bias needs an untied LM head")
    policy.embed[...] = policy.embed[...].at[:, 0].set(1.0)
    ids = jax.random.randint(jax.random.key(1), (4, 64), 3, policy.config.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(64), ids.shape)
    c0 = float(jnp.mean(hidden_states(policy, ids, pos)[..., 0].astype(jnp.float32)))
    vocab = policy.config.vocab_size
    bias = math.log(vocab * hazard / (1.0 - hazard))
    policy.lm_head[...] = policy.lm_head[...].at[0, :].set(0.0).at[0, eos].set(bias / c0)


def useful_lengths(completions_BxC, eos: int):
    import numpy as np

    hit = completions_BxC == eos
    first = np.where(hit.any(1), hit.argmax(1) + 1, completions_BxC.shape[1])
    return first


def time_hf(model, prompts, new: int, eos: int, top_p: float, seed: int, *, mask=None, n: int = 1):
    """Seconds of one `generate` call (after a tiny warm-up), n samples per prompt; `mask` marks real
    tokens of left-padded prompts (default: every token is real)."""
    import numpy as np
    import torch

    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=model.device)
    attn = torch.ones_like(ids) if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long, device=ids.device)
    kw = dict(do_sample=True, temperature=1.0, top_p=top_p, top_k=0, eos_token_id=eos, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=attn[:2], max_new_tokens=4, **kw)  # warm-up
        torch.manual_seed(seed)
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(
            ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=0, num_return_sequences=n, **kw
        )
        if ids.is_cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    comp = out[:, ids.shape[1] :].cpu().numpy()
    comp = np.pad(comp, ((0, 0), (0, new - comp.shape[1])))
    lens = useful_lengths(comp, eos)
    return dict(
        tokens=int(lens.sum()),
        secs=secs,
        compile=0.0,
        max_len=int(lens.max()),
        mean_len=float(lens.mean()),
        lens=lens.tolist(),
    )


_COMPILE_SECS = [0.0]


def _on_event(event, duration, **_):
    if event.startswith("/jax/core/compile/") and event.endswith("_duration"):  # trace, lower, compile
        _COMPILE_SECS[0] += duration


def time_engine(engine, prompts, new: int, top_p: float, seed: int, warmups: int = 2, n: int = 1):
    """Steady-state seconds of one generate call, after `warmups` calls with other seeds. The continuous
    engine compiles one program per (row bucket, window) it meets, so a call with new lengths may still
    compile: XLA compile time inside the timed call is measured and subtracted (reported with the rest)."""
    from conspo_jax.rollout import SamplingParams

    def call(s):
        before = _COMPILE_SECS[0]
        t0 = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=new, top_p=top_p, seed=s))
        return out, time.perf_counter() - t0, _COMPILE_SECS[0] - before

    compile_secs = sum(call(seed + 1000 + i)[2] for i in range(warmups))
    out, secs, late = call(seed)
    lens = out.completion_lens_R
    return dict(
        tokens=int(lens.sum()),
        secs=secs - late,
        compile=compile_secs + late,
        max_len=int(lens.max()),
        mean_len=float(lens.mean()),
        lens=lens.tolist(),
    )


def engines(policy, eos, dtype, rows_variants):
    from static_engine import StaticEngine

    from conspo_jax.rollout.jax_engine import JaxEngine

    out = {}
    for rows in rows_variants:
        eng = JaxEngine(policy, eos_token_ids=[eos], pad_id=0, prompt_bucket=32, cache_dtype=dtype)
        eng.decode_rows = rows
        out["conspo" if rows is None else f"conspo rows={rows}"] = eng
    out["static (old)"] = StaticEngine(policy, eos_token_ids=[eos], pad_id=0, prompt_bucket=32, cache_dtype=dtype)
    return out


def load_hf(policy, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    from conspo_jax.models import save_hf_policy

    tmp = tempfile.mkdtemp(prefix="sampler-bench-")
    path = save_hf_policy(policy, os.path.join(tmp, "hf"), dtype=dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name), attn_implementation="sdpa")
    return model.to(device).eval()


def sampling_only(batch: int, vocab: int, repeats: int = 20):
    """Per-call time of the token sampler alone, new (bisection, Gumbel-max) vs old (sort, categorical)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from static_engine import sample_tokens as old_sample

    from conspo_jax.rollout.sampling import sample_tokens

    logits = jax.random.normal(jax.random.key(0), (batch, vocab)) * 3.0
    print(f"sampler alone: {batch} rows x vocab {vocab}, median of {repeats} calls (ms)")
    print(f"{'top_p':>6} {'top_k':>6} {'new':>8} {'old':>8} {'old/new':>8}")
    for top_p, top_k in ((1.0, 0), (0.95, 0), (1.0, 50), (0.0, 0)):
        temp = 0.0 if top_p == 0.0 else 1.0
        args = (logits, jax.random.key(1), jnp.float32(temp), jnp.float32(max(top_p, 1e-3)), jnp.int32(top_k))
        times = []
        for fn in (sample_tokens, old_sample):
            f = jax.jit(fn)
            jax.block_until_ready(f(*args))
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append(time.perf_counter() - t0)
            times.append(1e3 * float(np.median(ts)))
        label = "greedy" if temp == 0.0 else f"{top_p:.2f}"
        print(f"{label:>6} {top_k:>6} {times[0]:>8.2f} {times[1]:>8.2f} {times[1] / times[0]:>7.1f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the preset's)")
    ap.add_argument("--new", type=int, default=None, help="max new tokens (default: the preset's)")
    ap.add_argument("--tail-batch", type=int, default=None, help="long-tail batch size (default: the preset's)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--tail-rows", type=int, default=None, help="also run the long tail on this many device rows")
    ap.add_argument("--skip-full", action="store_true", help="only the long-tail comparison")
    ap.add_argument("--sampling-only", action="store_true", help="time the token sampler alone (new vs old)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for XLA and torch (0: their defaults)")
    args = ap.parse_args()
    if args.threads == 1:
        # One thread each: on a shared CPU, oversubscribed thread pools make timings swing 5x.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    preset = dict(PRESETS[args.preset])
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(preset["batches"])
    new = args.new or preset["new"]
    preset["tail_batch"] = args.tail_batch or preset["tail_batch"]

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from conspo_jax.models import init_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    config = model_config(preset["arch"])
    if args.sampling_only:
        for batch in batches:
            sampling_only(batch, config.vocab_size)
        return
    dtype = jnp.dtype(preset["dtype"])
    eos = config.eos_token_id
    policy = init_policy(config, seed=0, dtype=dtype, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompt_pool = rng.integers(3, config.vocab_size, size=(max(batches + [preset["tail_batch"]]), preset["prompt"]))
    prompt_pool[prompt_pool == eos] = 3

    dev = jax.devices()[0]
    print(
        f"preset           {args.preset}: {preset['arch']} ({config.num_layers} layers, d={config.hidden_size}, "
        f"vocab {config.vocab_size}), {preset['prompt']}-token prompts x {new} new tokens, {dtype.name}, "
        f"top_p={args.top_p}"
    )
    print(
        f"device           {dev.platform}:{dev.device_kind}, host {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"versions         jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"date             {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    header = (
        f"{'batch':>8} {'engine':<18} {'tokens':>8} {'mean len':>8} {'max len':>7} {'s/call':>8} "
        f"{'tok/s':>8} {'compile s':>9} {'vs HF':>6} {'vs static':>9}"
    )

    def table(title, batch, results):
        print(f"\n{title}\n{header}\n" + "-" * len(header))
        hf, static = results.get("hf generate"), results.get("static (old)")
        for name, r in results.items():
            tps = r["tokens"] / r["secs"]
            vs_hf = f"{tps / (hf['tokens'] / hf['secs']):5.2f}x" if hf else ""
            vs_st = f"{tps / (static['tokens'] / static['secs']):8.2f}x" if static else ""
            print(
                f"{batch:>8} {name:<18} {r['tokens']:>8} {r['mean_len']:>8.1f} {r['max_len']:>7} "
                f"{r['secs']:>8.2f} {tps:>8.0f} {r['compile']:>9.1f} {vs_hf:>6} {vs_st:>9}",
                flush=True,
            )

    if not args.skip_full:
        hf_model = load_hf(policy, preset["dtype"])
        for batch in batches:
            prompts = prompt_pool[:batch].tolist()
            results = {"hf generate": time_hf(hf_model, prompts, new, eos, args.top_p, seed=0)}
            for name, eng in engines(policy, eos, dtype, [None]).items():
                results[name] = time_engine(eng, prompts, new, args.top_p, seed=0)
            table(f"full-length batch (rows run to {new} tokens unless EOS)", batch, results)
        del hf_model

    bake_eos_bias(policy, eos, hazard=1.0 - 0.5 ** (1.0 / (0.1 * new)))
    batch = preset["tail_batch"]
    prompts = prompt_pool[:batch].tolist()
    results = {"hf generate": time_hf(load_hf(policy, preset["dtype"]), prompts, new, eos, args.top_p, seed=0)}
    for name, eng in engines(policy, eos, dtype, [None] + ([args.tail_rows] if args.tail_rows else [])).items():
        results[name] = time_engine(eng, prompts, new, args.top_p, seed=0)
    table(f"long-tail batch (EOS hazard: median length {0.1 * new:.0f} = 10% of the limit)", batch, results)


if __name__ == "__main__":
    main()
