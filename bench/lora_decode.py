"""Benchmark: decoding a LoRA policy from merged weights vs with the adapters applied at every step.

One random policy with rank-R adapters on all seven projections (B perturbed, so the adapters matter)
is sampled by two JaxEngines: one built on `merged_policy(model)` (W + scale * A @ B, the plain graph),
one on the LoRA policy itself (x @ W + scale * (x @ A) @ B in every decode step). Both decode the same
prompts with the same seed; tokens are checked equal. Calls alternate between the two engines so that
a shared machine's load shifts both alike; the median steady-state call is reported, plus the cost of
one jitted `merge_lora` (what merged decoding pays per weight update).

  python bench/lora_decode.py                    # cpu-small (bench/sampler.py), 64 rows x (32 + 128)
  python bench/lora_decode.py --arch smollm2     # SmolLM2-135M shapes, random weights
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def config_for(arch: str):
    from sampler import model_config

    from conspo_jax.models import get_model_config

    if arch == "smollm2":
        return get_model_config("smollm2-135m")
    return model_config(arch)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cpu-small", help="cpu-small, smollm2 or a conspo_jax.models name")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from conspo_jax.models import LoRAConfig, attach_lora, init_policy, merge_lora, merged_policy
    from conspo_jax.rollout import SamplingParams
    from conspo_jax.rollout.jax_engine import JaxEngine

    c = config_for(args.arch)
    dtype = jnp.dtype(args.dtype)
    model = init_policy(c, seed=0, dtype=dtype)
    attach_lora(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank), seed=1)
    for i, t in enumerate(model.lora.targets):
        var = getattr(model.layers, f"{t}_lora_b")
        var[...] = 0.02 * jax.random.normal(jax.random.key(10 + i), var.shape)
    engines = {
        "merged": JaxEngine(merged_policy(model), eos_token_ids=[], cache_dtype=dtype, prompt_bucket=args.prompt),
        "applied": JaxEngine(model, eos_token_ids=[], cache_dtype=dtype, prompt_bucket=args.prompt),
    }
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, c.vocab_size, args.prompt)) for _ in range(args.rows)]
    params = SamplingParams(n=1, max_new_tokens=args.new, temperature=1.0, seed=5)
    times = {name: [] for name in engines}
    outs = {}
    for name, eng in engines.items():  # warm-up: every program compiled
        outs[name] = eng.generate(prompts, params)
    for _ in range(args.reps):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.generate(prompts, params)
            times[name].append(time.perf_counter() - t0)
    same = np.array_equal(outs["merged"].completion_ids_RxC, outs["applied"].completion_ids_RxC)

    state = nnx.state(model)
    merge = jax.jit(merge_lora)
    jax.block_until_ready(merge(state))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(merge(state))
    merge_s = (time.perf_counter() - t0) / 5

    tokens = args.rows * args.new
    print(
        f"arch {args.arch}: {c.num_layers} layers, d={c.hidden_size}, vocab {c.vocab_size}, {c.num_params() / 1e6:.1f}M"
    )
    print(
        f"lora rank {args.rank} on {','.join(model.lora.targets)}; {args.rows} rows x ({args.prompt} + {args.new}), {args.dtype}"
    )
    print(
        f"device {jax.devices()[0].platform}, host {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}"
    )
    print(f"versions jax {jax.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:8s} median {med:7.3f} s/call  {tokens / med:8.0f} tok/s  (calls {', '.join(f'{t:.2f}' for t in ts)})"
        )
    ratio = statistics.median(times["applied"]) / statistics.median(times["merged"])
    print(
        f"applied / merged time: {ratio:.3f}x; identical tokens: {same}; one jitted merge_lora: {merge_s * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
