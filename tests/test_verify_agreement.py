"""scripts/verify_agreement.py: our eval verdicts against direct math-verify calls. Agreeing samples pass,
and one flipped verdict fails the script."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from verify_agreement import main  # noqa: E402

from conspo_jax.rewards import default_pool  # noqa: E402


def _samples(tmp_path, flip=False):
    rows = [("The answer is \\boxed{\\frac{1}{2}}.", "0.5"), ("So 5x-1 = 9 gives x = 2", "2"), ("I do not know.", "7")]
    verdicts = default_pool().verify([r for r, _ in rows], [g for _, g in rows], answer_format="boxed_or_last_number")
    path = tmp_path / "samples.jsonl"
    with open(path, "w") as f:
        for i, ((response, gold), v) in enumerate(zip(rows, verdicts)):
            correct = bool(v.score > 0) != (flip and i == 1)
            f.write(json.dumps(dict(benchmark="b", id=i, sample=0, answer=gold, extracted=v.extracted,
                                    correct=correct, response=response)) + "\n")  # fmt: skip
    return str(path), [bool(v.score > 0) for v in verdicts]


def test_our_verdicts_agree_with_direct_math_verify_and_a_flip_is_caught(tmp_path, capsys):
    path, correct = _samples(tmp_path)
    assert correct == [True, True, False]  # boxed, last number (the minus of "5x-1" is not a sign), nothing
    assert main(["--answer_format", "boxed_or_last_number", path]) == 0
    assert "b, same rule: 3/3 samples agree" in capsys.readouterr().out
    flipped, _ = _samples(tmp_path, flip=True)
    assert main(["--answer_format", "boxed_or_last_number", flipped]) == 1
    assert "DISAGREE (same rule) b id=1" in capsys.readouterr().out
