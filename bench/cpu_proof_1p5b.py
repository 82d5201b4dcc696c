"""CPU proof, compile only: the policy-gradient program of R1-Distill-Qwen-1.5B at 8 x 2048 fits the GPU budget.

Nothing is allocated or run: the model is abstract (eval_shape), the inputs are ShapeDtypeStructs, and
XLA compiles the forward + backward of a token-log-prob loss (the sequence-score loss of
bench/logprob_step.py, -mean_b(sum_t logp[b, t] / T_b)) for each remat policy. Reported per policy:

- executed / model FLOPs. Model FLOPs per token = 6 * non-embedding params (LM head included) +
  6 * layers * d_model * seq_len. Executed FLOPs are the matmul FLOPs of the optimised HLO, each dot
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
import math
import os
import platform
import re
import sys
import time

if "--cpu-licm" not in sys.argv:  # before jax is imported: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from conspo_jax.models import REMAT_POLICIES, abstract_policy, get_model_config, token_logprobs  # noqa: E402

GiB = 1024**3


def model_flops_per_token(config, seq_len: int) -> float:
    c = config
    layer = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    )
    head = c.hidden_size * c.vocab_size
    return 6 * (c.num_layers * layer + head) + 6 * c.num_layers * c.hidden_size * seq_len


_STABLEHLO_DOT = re.compile(
    r"stablehlo\.dot_general[^\n]*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)"
)


def f32_vocab_dots(stablehlo: str, vocab: int) -> list[str]:
    """Signatures of dot_generals with an fp32 operand and an axis of size `vocab`."""
    bad = []
    for m in _STABLEHLO_DOT.finditer(stablehlo):
        operands = m.group(1), m.group(2)
        sizes = {int(x) for t in m.groups() for x in re.findall(r"(\d+)x", t)}
        if vocab in sizes and any(t.endswith("xf32>") for t in operands):
            bad.append(f"({operands[0]}, {operands[1]}) -> {m.group(3)}")
    return bad


_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)(?:\{[^}]*\})?\s+(\w[\w\-]*)\((.*?)\)(.*)$")
_PARAM = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*(\w+\[[\d,]*\])")


def _dims(shape: str) -> list[int]:
    inner = shape[shape.index("[") + 1 : shape.index("]")]
    return [int(x) for x in inner.split(",") if x]


def hlo_dot_flops(hlo: str) -> tuple[float, float]:
    """(matmul FLOPs weighted by loop trip counts, the same with every loop body counted once)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    def visit(name: str, mult: float, once: float) -> tuple[float, float]:
        shapes, total, total_once = {}, 0.0, 0.0
        for line in comps[name]:
            p = _PARAM.match(line)
            if p:
                shapes[p.group(1)] = p.group(2)
            m = _INSTR.match(line)
            if m and m.group(3) == "dot":
                _, out_shape, _, operands, attrs = m.groups()
                lhs = operands.split(",")[0].strip().split(" ")[-1].lstrip("%")
                lhs_dims = _dims(shapes[lhs])
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
                k = math.prod(lhs_dims[int(i)] for i in contract.split(",") if i)
                f = 2.0 * math.prod(_dims(out_shape)) * k
                total, total_once = total + mult * f, total_once + once * f
            trip = 1
            if re.search(r"\swhile\(", line):
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                if t is None:
                    raise ValueError(f"while loop without a known trip count in {name}: {line.strip()[:200]}")
                trip = int(t.group(1))
            for key in ("calls", "body"):
                for callee in re.findall(rf"\b{key}=%?([\w.\-]+)", line):
                    a, b = visit(callee, mult * trip, once)
                    total, total_once = total + a, total_once + b
        return total, total_once

    return visit(entry, 1.0, 1.0)


def compile_one(config, *, batch: int, seq: int, remat: str, attn_chunk: int, logprob_chunk: int) -> dict:
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
    t0 = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, rest, ids, mask)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    dots, dots_once = hlo_dot_flops(compiled.as_text())
    model_flops = batch * seq * model_flops_per_token(config, seq)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(
        remat=remat,
        attn_chunk=attn_chunk,
        logprob_chunk=logprob_chunk,
        executed_over_model=dots / model_flops,
        executed_tflop=dots / 1e12,
        model_tflop=model_flops / 1e12,
        peak_gib=peak / GiB,
        arguments_gib=mem.argument_size_in_bytes / GiB,
        outputs_gib=mem.output_size_in_bytes / GiB,
        temporaries_gib=mem.temp_size_in_bytes / GiB,
        f32_vocab_dots=f32_vocab_dots(lowered.as_text(), config.vocab_size),
        xla_flops_loop_once_tflop=float(cost.get("flops", float("nan"))) / 1e12,
        dots_loop_once_tflop=dots_once / 1e12,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
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
    p.add_argument("--cpu-licm", action="store_true", help="keep XLA CPU's while-loop LICM (f32 saved activations)")
    args = p.parse_args()
    config = get_model_config(args.arch)
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
