"""Our verdicts against a direct math-verify call, sample by sample, from `conspo eval`'s samples.jsonl.

    python scripts/verify_agreement.py runs/eval_instruct/samples.jsonl [more samples.jsonl ...]

Our scoring extracts the answer itself (the last ``\\boxed{}``, or under answer_format
boxed_or_last_number the last number when there is no box), then compares it with math-verify in the
reward worker pool under a CPU-time limit. The direct call hands math-verify the whole response and the
gold answer and lets it extract with the configuration the sample's extraction implies: boxed only
(LatexExtractionConfig, boxed first) for a boxed response, math-verify's own defaults (LaTeX and plain
expressions, last match) for an unboxed one. Every disagreement is printed with both verdicts and
what each side extracted. Exits 1 if any sample disagrees.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


def direct_verdict(response: str, gold: str) -> tuple[bool, str]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    from conspo_jax.rewards.extract import extract_boxed

    boxed = extract_boxed(response) is not None
    config = (
        [LatexExtractionConfig(boxed_match_priority=0)] if boxed else [LatexExtractionConfig(), ExprExtractionConfig()]
    )
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
    pred = parse(response, extraction_config=config)
    return bool(gold_parsed and pred and verify(gold_parsed, pred)), str(pred[-1]) if pred else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", help="samples.jsonl files written by `conspo eval`")
    args = ap.parse_args(argv)
    counts = collections.Counter()
    for path in args.samples:
        with open(path, encoding="utf-8") as f:
            for line in f:
                s = json.loads(line)
                direct, extracted = direct_verdict(s["response"], s["answer"])
                key = (s["benchmark"], "agree" if direct == s["correct"] else "disagree")
                counts[key] += 1
                if direct != s["correct"]:
                    print(
                        f"DISAGREE {path} {s['benchmark']} id={s['id']} sample={s['sample']}: ours {s['correct']} "
                        f"(extracted {s['extracted']!r}, {s['verdict']}), direct {direct} (extracted {extracted!r}), "
                        f"gold {s['answer']!r}"
                    )
    for bench in sorted({b for b, _ in counts}):
        agree, disagree = counts[(bench, "agree")], counts[(bench, "disagree")]
        print(f"{bench}: {agree}/{agree + disagree} samples agree")
    return 1 if any(k[1] == "disagree" for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
