"""Verifier registry and the worker-process side of verification.

A verifier is ``fn(response_text, answer) -> float``. The registry maps a name to an import path
(``"module:function"``) rather than to the function itself, because verification runs in worker
processes started with ``spawn`` (the sidecar holds gRPC threads and an accelerator runtime, neither
of which survives ``fork``): each worker imports the verifier it is asked for by path.

Completion ids are decoded to text in the worker too, with the sidecar's tokenizer: a directory
(``AutoTokenizer.from_pretrained``) or ``"arith"`` (the synthetic task's character tokenizer). With no
tokenizer, the text is the space-separated ids; this exists for tests and the mock engine only.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

Verifier = Callable[[str, str], float]

_REGISTRY: dict[str, str] = {
    "math": "conspo_jax.sidecar.verifiers:math_verifier",
    "arith": "conspo_jax.data.arith:arith_reward",
    "exact": "conspo_jax.sidecar.verifiers:exact_match",
}


def exact_match(response: str, answer: str) -> float:
    """1.0 when the stripped response equals the stripped answer (tests, string-answer tasks)."""
    return float(response.strip() == answer.strip())


def math_verifier(response: str, answer: str) -> float:
    """``conspo_jax.rewards.math_reward`` with one hard-timeout subprocess per sidecar worker: the
    sidecar's worker processes already give the parallelism, so each needs no pool of its own."""
    from conspo_jax.rewards import default_pool, math_reward

    default_pool(1)
    return math_reward(response, answer)


def register(name: str, target: str | Verifier) -> None:
    """Adds ``name``; ``target`` is ``"module:function"`` or a module-level function (stored by path)."""
    if not name:
        raise ValueError("verifier name must be non-empty")
    if callable(target):
        target = f"{target.__module__}:{target.__qualname__}"
    if ":" not in target:
        raise ValueError(f"verifier target must look like 'module:function', got {target!r}")
    _REGISTRY[name] = target


def names() -> list[str]:
    return sorted(_REGISTRY)


def target_of(name: str) -> str:
    if name not in _REGISTRY:
        raise KeyError(f"unknown verifier {name!r} (known: {', '.join(names())})")
    return _REGISTRY[name]


def resolve(target: str) -> Verifier:
    """Imports ``module:function``; a failure names the target and the import error."""
    module, _, attr = target.partition(":")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"verifier {target!r} is not importable: {e}") from e
    if not callable(fn):
        raise TypeError(f"verifier {target!r} is not callable")
    return fn


def load_tokenizer(spec: str | None):
    """The decoding tokenizer: None, ``"arith"``, or a directory with an HF tokenizer."""
    if not spec:
        return None
    if spec == "arith":
        from conspo_jax.data.arith import build_arith_tokenizer

        return build_arith_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def decode(tokenizer, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


# ---- worker-process side (module globals are per process) ----
_TOKENIZER = None
_CACHE: dict[str, Verifier] = {}


def init_worker(tokenizer_spec: str | None) -> None:
    """ProcessPoolExecutor initializer: loads the tokenizer once per worker."""
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_spec)


def score_group(target: str, answer: str, completions: Sequence[Sequence[int]]) -> list[float]:
    """Decodes and verifies one group. A verifier that raises scores 0 (logged), as an unparsable
    answer would; a verifier that cannot be imported raises, since that is a setup error."""
    fn = _CACHE.get(target)
    if fn is None:
        fn = _CACHE[target] = resolve(target)
    rewards = []
    for ids in completions:
        text = decode(_TOKENIZER, ids)
        try:
            r = float(fn(text, answer))
        except Exception as e:  # noqa: BLE001 - a verifier crash on odd text must not kill the group
            log.warning("verifier %s raised %s: %s on %r", target, type(e).__name__, e, text[:200])
            r = 0.0
        rewards.append(r if math.isfinite(r) else 0.0)
    return rewards
