"""Greedy decoding by our engine and by transformers' ``generate`` (torch, fp32) on the same chat prompts.

    python scripts/greedy_crosscheck.py --hf ~/.cache/conspo_jax/smollm2-135m-instruct --num 50 --out runs/greedy.json

Both decode each prompt greedily to ``--max_new_tokens`` or the end-of-turn token. A prompt agrees when the
two token sequences are identical. Where they are not, the first differing position is listed with torch's
gap between its two best logits there: float32 rounding differs between the two programs, so a divergence
at a near-tie (a gap of a few 1e-4) is rounding, and one at a large gap would be a bug.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def crosscheck(hf_dir: str, *, num: int, max_new_tokens: int, data: str = "gsm8k") -> dict:
    import jax.numpy as jnp
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conspo_jax.data.math_data import load_benchmark
    from conspo_jax.data.prompts import encode_prompt
    from conspo_jax.models import load_hf_policy
    from conspo_jax.rollout import SamplingParams
    from conspo_jax.rollout.jax_engine import JaxEngine

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [encode_prompt(r["problem"], tok) for r in load_benchmark(data, limit=num)]
    policy = load_hf_policy(hf_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    eos = sorted({t for t in (tok.eos_token_id, policy.config.eos_token_id) if isinstance(t, int)})
    engine = JaxEngine(policy, eos_token_ids=eos, pad_id=tok.pad_token_id or 0, prompt_bucket=64,
                       cache_dtype=jnp.float32, progress_after_s=5.0)  # fmt: skip
    t0 = time.time()
    ours = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)).completions()
    t_ours = time.time() - t0

    # One row at a time is a chain of small ops: one thread is as fast, and it does not stall when another
    # process holds a core (2026-12-08, 50 prompts x 128 tokens beside a training run: unfinished after 21 min
    # on two threads, about 8 min on one).
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows, t0 = [], time.time()
    for i, (p, mine) in enumerate(tqdm(list(zip(prompts, ours)), desc="transformers generate", unit="prompt")):
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        theirs = out.sequences[0, len(p) :].tolist()
        row = {"prompt": i, "ours_len": len(mine), "torch_len": len(theirs), "same": list(mine) == theirs}
        if not row["same"]:
            k = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            row["first_diff"] = k
            if k < len(out.scores):
                top2 = torch.topk(out.scores[k][0], 2).values
                row["torch_top2_gap"] = float(top2[0] - top2[1])
                row["ours_token"], row["torch_token"] = (int(mine[k]) if k < len(mine) else None), int(theirs[k])
        rows.append(row)
    same = sum(r["same"] for r in rows)
    return {"prompts": len(rows), "same": same, "agreement": same / len(rows), "max_new_tokens": max_new_tokens,
            "ours_s": round(t_ours, 1), "torch_s": round(time.time() - t0, 1),
            "differences": [r for r in rows if not r["same"]],
            "mean_tokens": float(np.mean([r["ours_len"] for r in rows]))}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--num", type=int, default=50)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--data", default="gsm8k")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    res = crosscheck(a.hf, num=a.num, max_new_tokens=a.max_new_tokens, data=a.data)
    print(f"greedy agreement: {res['same']}/{res['prompts']} prompts token-identical ({100 * res['agreement']:.0f}%)")
    for d in res["differences"]:
        print(f"  prompt {d['prompt']}: first difference at token {d.get('first_diff')}, "
              f"torch's top-2 logit gap there {d.get('torch_top2_gap', float('nan')):.2e}")  # fmt: skip
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
