"""Which math task does a model partly solve? pass@1 at T = 0.6, top-p 0.95 on a few candidate sets, with the
model's chat template and the paper's \\boxed{} instruction, through the embedded engine and math-verify.

    python scripts/probe_task.py --hf ~/.cache/conspo_jax/smollm2-135m-instruct --num 100 --out runs/probe

Prints one row per candidate (pass@1, boxed rate, truncated rate, mean response tokens) and writes each
candidate's results.json / samples.jsonl under --out. A group-relative objective needs groups with both
outcomes, so the RL task is the candidate whose pass rate lies between 5% and 60% (experiments/smollm2_135m.py).
"""

import argparse
import json
import os
import time

import jax.numpy as jnp
from transformers import AutoTokenizer

from conspo_jax.data.arith import make_arith_nl_records
from conspo_jax.data.math_data import load_benchmark
from conspo_jax.evals import evaluate
from conspo_jax.models import load_hf_policy
from conspo_jax.rollout.jax_engine import JaxEngine


def candidates(num: int) -> dict:
    return {
        "gsm8k": load_benchmark("gsm8k", limit=num),
        "math500_l12": load_benchmark("math500_l12", limit=num),
        "arith_nl": make_arith_nl_records("eval", num=num, seed=0, max_operand=99, ops="+-"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="an HF checkpoint directory with its tokenizer")
    ap.add_argument("--num", type=int, default=100, help="problems per candidate")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--rows", type=int, default=64, help="device rows decoding at once (refilled)")
    ap.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    ap.add_argument("--out", default="runs/probe")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.hf)
    policy = load_hf_policy(a.hf, dtype=jnp.float32, param_dtype=jnp.float32)
    eos = [t for t in {tok.eos_token_id, policy.config.eos_token_id} if isinstance(t, int)]
    engine = JaxEngine(policy, eos_token_ids=eos, pad_id=tok.pad_token_id or 0, prompt_bucket=64,
                       cache_dtype=jnp.float32, decode_rows=a.rows, progress_after_s=5.0)  # fmt: skip
    sets = candidates(a.num)
    if a.only:
        sets = {k: v for k, v in sets.items() if k in a.only.split(",")}
    rows = []
    for name, records in sets.items():
        t0 = time.time()
        res = evaluate(engine, tok, {name: records}, out_dir=os.path.join(a.out, name), k_overrides=1,
                       max_new_tokens=a.max_new_tokens, rows_per_call=len(records), label=name)  # fmt: skip
        b = res["benchmarks"][name]
        rows.append((name, len(records), b["score"], 100 * (1 - b["no_box_frac"]), 100 * b["truncated_frac"],
                     b["mean_response_tokens"], time.time() - t0))  # fmt: skip
    print("| candidate | problems | pass@1 % | boxed % | truncated % | mean tokens | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.0f} | {:.0f} |".format(*r))
    with open(os.path.join(a.out, "probe.json"), "w") as f:
        json.dump([dict(zip(("name", "n", "pass1", "boxed", "truncated", "tokens", "wall_s"), r)) for r in rows], f)


if __name__ == "__main__":
    main()
