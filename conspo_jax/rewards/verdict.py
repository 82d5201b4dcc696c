"""A response's ``Verdict``, and the part of verification the parent does itself (``decide_in_parent``).

Extraction of the answer, the size bound and the exact and integer matches are linear in the response's
length, so they run in the calling process; only what they leave undecided crosses the pipe to a worker
(``RewardPool``, pool.py), with a deadline.
"""

from __future__ import annotations

import dataclasses

from conspo_jax.rewards import extract as ex


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome for one response: score 1.0/0.0, the extracted answer, and how it was decided."""

    score: float
    extracted: str | None
    reason: str
    cpu_s: float | None = None  # worker CPU seconds spent on it (None: decided in the parent)


def decide_in_parent(response: str, ground_truth, answer_format: str, max_answer_chars: int):
    """(extracted answer, Verdict or None, (pred, gold)): a Verdict when the linear-time checks decide,
    else None and the normalised pair a worker must compare."""
    box = ex.extract_answer(response, answer_format)
    if box is None:
        return None, Verdict(0.0, None, ex.NO_BOX), None
    # Linear-time checks first: a 5000-digit integer that matches is scored, however long.
    pred, gold = ex.normalize_answer(box), ex.ground_truth_answer(ground_truth)
    quick = ex.quick_verdict(pred, gold)
    if quick is not None:
        return box, Verdict(quick[0], box if len(box) <= max_answer_chars else box[:200], quick[1]), None
    if max(len(pred), len(gold)) > max_answer_chars:
        return box, Verdict(0.0, box[:200], ex.TOO_LONG), None
    return box, None, (pred, gold)
