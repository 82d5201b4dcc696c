"""The math-verify comparison of two answer strings; runs inside a verifier worker process.

Both sides go through math-verify's LaTeX extractor only. Its ``ExprExtractionConfig`` path calls
``sympy.parse_expr``, which is built on ``eval`` and is not safe on model output, so it is never used.

Time: math-verify's own timeouts are wall-clock ``signal.alarm``s, which on a busy machine cut off
correct answers that merely waited for a CPU. They are switched off; instead ``cpu_limit`` arms a
CPU-time timer (``ITIMER_PROF``), so a task is stopped after using its CPU budget however long it
waited. Work stuck inside C code never sees that signal: the pool kills the process for those.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal


class CpuBudgetExceeded(BaseException):
    """Raised inside a task that used up its CPU budget (a BaseException so that library code's
    ``except Exception`` cannot swallow it)."""


def _on_sigprof(signum, frame):
    raise CpuBudgetExceeded()


@contextlib.contextmanager
def cpu_limit(seconds: float):
    """Raises ``CpuBudgetExceeded`` in the block once this process has used ``seconds`` of CPU.

    The handler stays installed afterwards: restoring SIGPROF's default action (terminate) could let a
    late signal kill the worker. Worker processes only; it takes over SIGPROF.
    """
    signal.signal(signal.SIGPROF, _on_sigprof)
    signal.setitimer(signal.ITIMER_PROF, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


@functools.lru_cache(maxsize=1)
def _config():
    from math_verify import LatexExtractionConfig

    # The inputs are already the bare answers; boxed first so "\boxed{...}" wrapping is taken verbatim.
    return (LatexExtractionConfig(boxed_match_priority=0),)


def _parse(answer: str):
    from math_verify import parse

    return parse("\\boxed{" + answer + "}", extraction_config=_config(), parsing_timeout=None)


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
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def warm_up() -> None:
    """Imports sympy / the LaTeX grammar and parses once so that the first real task is not slow."""
    # Quiet before the first call: math-verify warns once that its (wall-clock) timeouts are off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    verify_answer("\\frac{1}{2}", "0.5")
