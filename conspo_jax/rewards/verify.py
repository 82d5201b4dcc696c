"""The math-verify comparison of two answer strings; runs inside a verifier worker process.

Both sides go through math-verify's LaTeX extractor only. Its ``ExprExtractionConfig`` path calls
``sympy.parse_expr``, which is built on ``eval`` and is not safe on model output, so it is never used.
math-verify's own signal-based timeouts stay on as a first line of defence (they work here because a
worker verifies in its main thread); the pool's hard per-task deadline is what actually bounds time.
"""

from __future__ import annotations

import functools
import logging

_PARSE_TIMEOUT_S = 1  # math-verify takes whole seconds


@functools.lru_cache(maxsize=1)
def _config():
    from math_verify import LatexExtractionConfig

    # The inputs are already the bare answers; boxed first so "\boxed{...}" wrapping is taken verbatim.
    return (LatexExtractionConfig(boxed_match_priority=0),)


def _parse(answer: str):
    from math_verify import parse

    return parse("\\boxed{" + answer + "}", extraction_config=_config(), parsing_timeout=_PARSE_TIMEOUT_S)


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str):
    # A group of n rollouts shares one ground truth: parse it once.
    return _parse(answer)


def verify_answer(pred: str, gold: str) -> bool:
    """True if the normalised answer ``pred`` equals ``gold`` by math-verify's comparison."""
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_PARSE_TIMEOUT_S))


def warm_up() -> None:
    """Imports sympy / the LaTeX grammar and parses once so that the first real task is not slow."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-timeout warnings are noise here
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    verify_answer("\\frac{1}{2}", "0.5")
