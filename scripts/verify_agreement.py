"""Our verdicts against direct math-verify calls, sample by sample, from `conspo eval`'s samples.jsonl.

    python scripts/verify_agreement.py --answer_format boxed_or_last_number runs/eval/samples.jsonl [...]

Our scoring extracts the answer itself, normalises it and compares it with math-verify in the reward
worker pool under a CPU-time limit. It takes the last ``\\boxed{}``, or, under boxed_or_last_number when
there is no box, the last number in the response's last 256 characters. Two direct calls, in this
process, with no pool, no time limit and no normalisation:
- same rule: math-verify parses the whole response with boxed-only extraction when it has a box. With
  no box it parses the last number of the tail, found by this script's own copy of the rule. This tests
  our code path (extraction, normalisation, the worker pool, the limit) against math-verify called
  plainly. Every disagreement here is a bug on one side, so the exit status is 1 if any sample disagrees.
- math-verify's own rule: its default extraction (LaTeX and plain expressions, the last match) on the
  whole response. It differs from ours by design on unboxed responses: an equation as the last
  expression, or a number outside the tail. These are counted and listed, not failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

TAIL = 256  # characters: the tail our last-number rule reads (conspo_jax/rewards/extract.py)
# The documented rule, written out again here: a number not glued to a letter, digit or decimal point, with
# a minus sign only where it is not a binary minus ("x-1" ends in 1).
LAST_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")


def _boxed(response: str) -> bool:
    return "\\boxed" in response or "\\fbox" in response


def direct_verdicts(response: str, gold: str, answer_format: str) -> dict:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    boxed_only = [LatexExtractionConfig(boxed_match_priority=0)]
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=boxed_only)

    def check(pred):
        return bool(gold_parsed and pred and verify(gold_parsed, pred)), str(pred[-1]) if pred else ""

    if _boxed(response) or answer_format == "boxed":
        same = check(parse(response, extraction_config=boxed_only))
    else:
        numbers = [m.group(0) for m in LAST_NUMBER.finditer(response[-TAIL:])]
        same = check(parse("\\boxed{" + numbers[-1] + "}", extraction_config=boxed_only)) if numbers else (False, "")
    own = check(parse(response, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()]))
    return {"same rule": same, "math-verify's own rule": own}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", help="samples.jsonl files written by `conspo eval`")
    ap.add_argument("--answer_format", default="boxed", help="the run's data.answer_format")
    args = ap.parse_args(argv)
    counts = collections.Counter()
    for path in args.samples:
        with open(path, encoding="utf-8") as f:
            for line in f:
                s = json.loads(line)
                for mode, (direct, extracted) in direct_verdicts(
                    s["response"], s["answer"], args.answer_format
                ).items():
                    agree = direct == s["correct"]
                    counts[(s["benchmark"], mode, agree)] += 1
                    if not agree:
                        print(
                            f"DISAGREE ({mode}) {s['benchmark']} id={s['id']} sample={s['sample']}: ours "
                            f"{s['correct']} (extracted {s['extracted']!r}), direct {direct} (extracted "
                            f"{extracted!r}), gold {s['answer']!r}"
                        )
    for bench, mode in sorted({k[:2] for k in counts}):
        agree, disagree = counts[(bench, mode, True)], counts[(bench, mode, False)]
        print(f"{bench}, {mode}: {agree}/{agree + disagree} samples agree")
    return 1 if any(not k[2] and k[1] == "same rule" for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
