"""CPU proof, compile only: the policy-gradient program of R1-Distill-Qwen-1.5B at 8 x 2048 fits the GPU budget.

Nothing is allocated or run: the model is abstract (eval_shape), the inputs are ShapeDtypeStructs, and
XLA compiles the forward + backward of a token-log-prob loss (the sequence-score loss of
bench/logprob_step.py, -mean_b(sum_t logp[b, t] / T_b)) for each remat policy. Reported per policy:

- executed / model FLOPs (both from conspo_jax.profiling, as `conspo profile` reports them). Model
  FLOPs per token = 6 * non-embedding params (LM head included) + 6 * layers * d_model * seq_len.
  Executed FLOPs are the matmul FLOPs of the optimised HLO (conspo_jax.profiling.hlo_facts), each dot
  weighted by the trip counts of the loops around it: XLA's cost_analysis() counts a while-loop body
  once (so its 'flops' for a scanned 28-layer model is about one layer's); it is printed beside as
  `xla_flops_loop_once`, with the same dots counted once (`dots_loop_once`) to show the counter and
  XLA agree on what a dot costs and that non-matmul work is small.
- compiled peak = arguments + outputs + temporaries - aliased, from memory_analysis().
- fp32 [tokens x vocab] dots: dot_generals in the lowered StableHLO (what JAX hands XLA, before the
  CPU backend upcasts bf16 dots it cannot run natively) with an fp32 operand and a vocab-sized axis.

- CPU compile flag: XLA's CPU backend cannot run bf16 dynamic-update-slice, so float normalisation
  wraps the scan's stacking of saved activations in f32 converts, and while-loop-invariant code motion
  then hoists those converts out of the loop: every saved activation is kept in f32 (~2x the GPU's
  bytes). GPUs run bf16 dynamic-update-slice natively, so this script disables that one CPU pass
  (`--cpu-licm` keeps it, to see the artifact). FLOPs are the same either way.

  python bench/cpu_proof_1p5b.py                                    # all four policies
  python bench/cpu_proof_1p5b.py --policies names --attn-chunk 512 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

if "--cpu-licm" not in sys.argv:  # before jax is imported: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from conspo_jax.models import REMAT_POLICIES, abstract_policy, get_model_config, token_logprobs  # noqa: E402
from conspo_jax.profiling import compile_report, hlo_facts, model_flops_per_token  # noqa: E402

GiB = 1024**3


def compile_one(config, *, batch: int, seq: int, remat: str, attn_chunk: int, logprob_chunk: int, hlo_dir: str) -> dict:
    model = abstract_policy(
        config,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        remat=remat,
        attn_impl="xla",
        attn_chunk=attn_chunk,
        logprob_chunk=logprob_chunk,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, ids, mask):
        logp = token_logprobs(nnx.merge(graphdef, params, rest), ids, mask)
        n = jnp.maximum((mask[:, 1:] & mask[:, :-1]).sum(1), 1)
        return -(logp.sum(1) / n).mean()

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    name = f"proof_{remat}_{attn_chunk}"
    r = compile_report(jax.jit(jax.value_and_grad(loss)), params, rest, ids, mask, name=name, out_dir=hlo_dir)
    facts = hlo_facts(open(r["hlo_path"]).read(), vocab_size=config.vocab_size)
    # The StableHLO holds the dtypes JAX hands XLA, before XLA:CPU upcasts the bf16 dots it cannot run.
    program = hlo_facts(open(r["stablehlo_path"]).read(), vocab_size=config.vocab_size)
    model_flops = batch * seq * model_flops_per_token(config, seq)
    return dict(
        remat=remat,
        attn_chunk=attn_chunk,
        logprob_chunk=logprob_chunk,
        executed_over_model=facts["dot_flops"] / model_flops,
        executed_tflop=facts["dot_flops"] / 1e12,
        model_tflop=model_flops / 1e12,
        peak_gib=r["peak_bytes"] / GiB,
        arguments_gib=r["argument_bytes"] / GiB,
        outputs_gib=r["output_bytes"] / GiB,
        temporaries_gib=r["temp_bytes"] / GiB,
        f32_vocab_dots=program["f32_vocab_dot_shapes"],
        xla_flops_loop_once_tflop=float(r["flops"] if r["flops"] is not None else float("nan")) / 1e12,
        dots_loop_once_tflop=facts["dot_flops_loops_once"] / 1e12,
        unknown_trip_counts=facts["unknown_trip_counts"],
        lower_s=r["lower_s"],
        compile_s=r["compile_s"],
    )


def print_table(rows, header) -> None:
    print(header)
    cols = (
        "| remat | attn_chunk | executed/model | executed TFLOP | peak GiB (args+out+temp) | fp32 [tok x V] dots "
        "| compile s | XLA flops, loops once (TFLOP) | dots, loops once (TFLOP) |"
    )
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for r in rows:
        print(
            f"| {r['remat']} | {r['attn_chunk']} | {r['executed_over_model']:.3f} | {r['executed_tflop']:.1f} "
            f"| {r['peak_gib']:.1f} ({r['arguments_gib']:.1f}+{r['outputs_gib']:.1f}+{r['temporaries_gib']:.1f}) "
            f"| {len(r['f32_vocab_dots'])} | {r['compile_s']:.0f} | {r['xla_flops_loop_once_tflop']:.2f} "
            f"| {r['dots_loop_once_tflop']:.2f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="r1-distill-qwen-1.5b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--policies", default=",".join(REMAT_POLICIES))
    p.add_argument("--attn-chunk", type=int, default=1024, help="query block of the masked XLA attention")
    p.add_argument("--logprob-chunk", type=int, default=2048, help="tokens per LM-head chunk")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--hlo-dir", default="", help="keep each program's StableHLO and optimised HLO here")
    p.add_argument("--cpu-licm", action="store_true", help="keep XLA CPU's while-loop LICM (f32 saved activations)")
    args = p.parse_args()
    config = get_model_config(args.arch)
    hlo_dir = args.hlo_dir or tempfile.mkdtemp(prefix="cpu_proof_hlo_")
    rows = []
    for remat in args.policies.split(","):
        rows.append(
            compile_one(
                config,
                batch=args.batch,
                seq=args.seq,
                remat=remat,
                attn_chunk=args.attn_chunk,
                logprob_chunk=args.logprob_chunk,
                hlo_dir=hlo_dir,
            )
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "f32_vocab_dots"}), flush=True)
        for sig in rows[-1]["f32_vocab_dots"]:
            print("  fp32 vocab dot:", sig)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{args.arch}, {args.batch} x {args.seq}, bf16 compute, fp32 params, compile only on "
        f"{jax.default_backend()} ({platform.processor() or platform.machine()}, jax {jax.__version__}), {now}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print()
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
