"""Profile of the policy's training step (and one sampler decode step) through conspo_jax.profiling.

Builds the R1-Distill-Qwen-1.5B architecture (or --arch NAME, or with --cpu a tiny config) with random
weights, jits the forward + backward of a token-log-prob loss (-mean over rows of the length-normalised
sum of token log-probs, as bench/logprob_step.py) and one cached decode step, then for each program:
compile_report (compile seconds, XLA cost and memory analyses, StableHLO + optimised HLO text),
hlo_facts (cuDNN attention, f32 / [tokens x vocab] f32 dots, KV-cache copies, loop-aware matmul
FLOPs), and unless --compile-only a trace of --steps warm annotated steps (XPlane + Perfetto + device
memory profile). Prints the summary table last and writes OUT/summary.json.

  python bench/profile_model.py                       # GPU: 1.5B, 8x2048, bf16, remat full
  python bench/profile_model.py --cpu                 # tiny config, runs to the end on a CPU
  python bench/profile_model.py --compile-only --shape 8x2048   # CPU proof: analyse the 1.5B step, run nothing
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def parse_shape(text: str, flag: str) -> tuple[int, int]:
    try:
        b, t = (int(x) for x in text.lower().split("x"))
        if b < 1 or t < 2:
            raise ValueError
    except ValueError:
        raise SystemExit(f"{flag}={text!r} must be BxT with B >= 1 and T >= 2, e.g. 8x2048") from None
    return b, t


def cpu_config():
    from conspo_jax.models import get_model_config

    return get_model_config("tiny-qwen2", vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2)


def build(args):
    """(config, graphdef, params, rest): real random weights, or ShapeDtypeStructs with --compile-only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from conspo_jax.models import abstract_policy, get_model_config, init_policy

    config = cpu_config() if args.cpu else get_model_config(args.arch)
    kwargs = dict(
        dtype=jnp.dtype(args.dtype),
        param_dtype=jnp.float32,
        remat=args.remat,
        logprob_chunk=args.logprob_chunk,
        attn_impl=args.attn_impl,
    )
    policy = abstract_policy(config, **kwargs) if args.compile_only else init_policy(config, **kwargs)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    if args.compile_only:
        params, rest = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s) for s in (params, rest))
    return config, graphdef, params, rest


def train_program(graphdef, batch: int, seq: int, vocab: int, compile_only: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from conspo_jax.models import token_logprobs

    def loss_fn(params, rest, ids_BxT, mask_BxT):
        logp_BxT1 = token_logprobs(nnx.merge(graphdef, params, rest), ids_BxT, mask_BxT)
        n_B = jnp.maximum((mask_BxT[:, 1:] & mask_BxT[:, :-1]).sum(axis=1), 1)
        return -jnp.mean(logp_BxT1.sum(axis=1) / n_B)

    if compile_only:
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    else:
        ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, seq)), jnp.int32)
        mask = jnp.ones((batch, seq), bool)
    return jax.jit(jax.value_and_grad(loss_fn)), (ids, mask)


def decode_program(graphdef, config, batch: int, cache_len: int, dtype, compile_only: bool):
    """One greedy decode step at slot cache_len // 2 with the cache donated (a sampler's inner step)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from conspo_jax.models import forward_cached, init_kv_cache, policy_logits

    def step(params, rest, cache, tok_B, pos_B, kv_mask_BxS):
        model = nnx.merge(graphdef, params, rest)
        h_Bx1xD, cache = forward_cached(model, tok_B[:, None], pos_B[:, None], cache, pos_B[0], kv_mask_BxS)
        return jnp.argmax(policy_logits(model, h_Bx1xD)[:, 0], axis=-1).astype(jnp.int32), cache

    cache_shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
    if compile_only:
        cache = jax.eval_shape(lambda: init_kv_cache(config, batch, cache_len, dtype))
    else:
        cache = init_kv_cache(config, batch, cache_len, dtype)
    tok = jnp.zeros((batch,), jnp.int32)
    pos = jnp.full((batch,), cache_len // 2, jnp.int32)
    kv_mask = jnp.arange(cache_len)[None, :] <= pos[:, None]
    return jax.jit(step, donate_argnums=(2,)), (cache, tok, pos, kv_mask), cache_shape


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny config and shapes that run on a CPU in seconds")
    p.add_argument("--arch", default="r1-distill-qwen-1.5b", help="named model config (ignored with --cpu)")
    p.add_argument("--shape", default=None, help="train BxT (default 8x2048; --cpu 2x256)")
    p.add_argument("--decode-shape", default=None, help="decode batch x cache length (default 64x1024; --cpu 4x64)")
    p.add_argument("--no-decode", action="store_true", help="profile the training step only")
    p.add_argument("--remat", default="full", help="model.remat policy of the training step")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; --cpu float32)")
    p.add_argument("--logprob-chunk", type=int, default=2048)
    p.add_argument("--attn-impl", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--steps", type=int, default=3, help="traced warm steps per program")
    p.add_argument("--compile-only", action="store_true", help="analyse the compiled programs, run nothing")
    p.add_argument("--peak-flops", type=float, default=None, help="MFU peak FLOP/s (default: measured matmul)")
    p.add_argument("--out", default="/tmp/conspo_profile_model", help="directory for HLO, traces, summary.json")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.cpu else "bfloat16")
    batch, seq = parse_shape(args.shape or ("2x256" if args.cpu else "8x2048"), "--shape")
    dec_b, dec_s = parse_shape(args.decode_shape or ("4x64" if args.cpu else "64x1024"), "--decode-shape")
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps} must be >= 1")

    import jax
    import jax.numpy as jnp

    from conspo_jax import profiling as P

    device = jax.devices()[0]
    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, device {device.device_kind} ({jax.default_backend()})")
    print(f"versions: python {platform.python_version()}, jax {jax.__version__}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}", flush=True)
    config, graphdef, params, rest = build(args)
    print(
        f"arch: {'cpu tiny' if args.cpu else args.arch}: {config.num_params() / 1e9:.3f} B params, "
        f"vocab {config.vocab_size}"
    )

    peak, peak_how = args.peak_flops, "given"
    if peak is None and not args.compile_only:
        on_gpu = jax.default_backend() == "gpu"
        mm_dtype, n = (jnp.bfloat16, 8192) if on_gpu else (jnp.dtype(args.dtype), 1024)
        peak = P.measure_matmul_peak(mm_dtype, n)
        peak_how = f"measured {jnp.dtype(mm_dtype).name} {n}^3 matmul, this run"
    os.makedirs(args.out, exist_ok=True)

    rows, reports = [], {}
    programs = [("train", batch * seq)] + ([] if args.no_decode else [("decode", dec_b)])
    for name, tokens in programs:
        if name == "train":
            fn, inputs = train_program(graphdef, batch, seq, config.vocab_size, args.compile_only)
            label, kv_shapes = f"train {batch}x{seq} {args.remat}", ()
            model_fpt = P.model_flops_per_token(config, seq)
        else:
            dec_params = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, args.dtype) if args.compile_only else x.astype(args.dtype),
                params,
            )
            fn, inputs, cache_shape = decode_program(graphdef, config, dec_b, dec_s, args.dtype, args.compile_only)
            label, kv_shapes = f"decode {dec_b}x{dec_s}", (cache_shape,)
            # Forward only: a third of the training FLOPs per token, attention over half the cache.
            model_fpt = P.model_flops_per_token(config, dec_s // 2) / 3
        step_params = params if name == "train" else dec_params
        report = P.compile_report(
            fn, step_params, rest, *inputs, name=name, out_dir=args.out, keep_compiled=not args.compile_only
        )
        facts = P.hlo_facts(open(report["hlo_path"]).read(), vocab_size=config.vocab_size, kv_cache_shapes=kv_shapes)
        program_facts = P.hlo_facts(open(report["stablehlo_path"]).read(), vocab_size=config.vocab_size)
        print(
            f"{name}: compiled in {report['compile_s']:.1f} s; {facts['num_f32_dots']} f32 dots of {facts['num_dots']}"
            f" ({program_facts['num_f32_dots']} in the StableHLO: {program_facts['f32_dot_shapes']})",
            flush=True,
        )
        seconds, measured = None, None
        if not args.compile_only:
            compiled = report.pop("compiled")
            if name == "train":
                make_args = lambda i: (step_params, rest, *inputs)  # noqa: E731
                step_fn = compiled
            else:
                state = {"cache": inputs[0]}

                def step_fn(p, r, _cache, *rest_inputs, _c=compiled, _s=state):
                    tok, _s["cache"] = _c(p, r, _s["cache"], *rest_inputs)  # cache donated: thread it
                    return tok

                make_args = lambda i: (step_params, rest, None, *inputs[1:])  # noqa: E731
            trace_dir = os.path.join(args.out, f"trace_{name}")
            seconds = P.trace_steps(step_fn, args.steps, trace_dir, make_args=make_args, annotation=name)
            # The device's peak is per process, so it belongs to the first (largest) program only.
            stats = device.memory_stats() or {}
            measured = stats.get("peak_bytes_in_use") if name == "train" else None
        reports[name] = dict(report=report, facts=facts, program_facts=program_facts, step_seconds=seconds)
        rows.append(
            P.summary_row(
                label,
                report=report,
                tokens_per_step=tokens,
                model_flops_per_token=model_fpt,
                step_seconds=seconds,
                facts=facts,
                program_facts=program_facts,
                peak_flops=peak,
                peak_flops_how=peak_how,
                measured_peak_bytes=measured,
            )
        )
    P.save_json(dict(rows=rows, programs=reports, argv=sys.argv), os.path.join(args.out, "summary.json"))
    traces = "" if args.compile_only else ", trace_*/"
    print(f"\nwrote {args.out}: *.stablehlo.txt, *.hlo.txt{traces}, summary.json")
    print(P.summary_table(rows))


if __name__ == "__main__":
    main()
