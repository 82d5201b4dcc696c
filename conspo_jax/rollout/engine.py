"""The rollout-engine contract shared by the trainer, the evaluator and the sidecar.

An engine turns P tokenised prompts into P groups of ``n`` sampled completions. Every engine
(the embedded JAX sampler, the SGLang wrapper, the gRPC sidecar client, the mock) returns the
same typed ``Rollouts`` so that consumers never care where tokens came from.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import time
from collections.abc import Sequence

import numpy as np

FINISH_STOP = "stop"  # an EOS / stop token was produced (it is included in the completion)
FINISH_LENGTH = "length"  # max_new_tokens was reached


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. Defaults are the paper's training settings (temperature 1.0)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        """Rejects every value the samplers would turn into garbage (NaN log-probs, all-zero tokens),
        naming the field and the value: NaN fails every comparison, so finiteness is checked first."""

        def integer(field, low):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"SamplingParams.{field} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"SamplingParams.{field} must be >= {low}, got {value!r}")

        def real(field):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"SamplingParams.{field} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"SamplingParams.{field} must be finite, got {value!r}")
            return value

        integer("n", 1)
        if real("temperature") < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < real("top_p") <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        integer("top_k", 0)
        integer("max_new_tokens", 1)
        integer("seed", 0)
        for tok in self.stop_token_ids:
            if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)) or tok < 0:
                raise ValueError(f"SamplingParams.stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")


@dataclasses.dataclass
class Rollouts:
    """P prompts x n samples, flattened prompt-major: row ``p * n + k`` is sample k of prompt p.

    completion_ids_RxC: int32, right-padded with ``pad_id``; R = P * n.
    completion_lens_R:  int32, number of valid completion tokens per row (EOS included).
    logprobs_RxC:       float32, the sampling distribution's log-prob of each token (0 on padding).
    finish_reasons:     one of FINISH_STOP / FINISH_LENGTH per row.
    group_ids_R:        int32, the prompt index p of each row.
    weight_version:     version of the weights that produced these samples (sidecar staleness).
    rewards_R:          float32 verifier rewards when the engine verified the rows (the sidecar
                        does), else None and the trainer scores the rows itself.
    """

    completion_ids_RxC: np.ndarray
    completion_lens_R: np.ndarray
    logprobs_RxC: np.ndarray
    finish_reasons: list[str]
    group_ids_R: np.ndarray
    weight_version: int = 0
    pad_id: int = 0
    rewards_R: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.completion_ids_RxC.shape[0])

    def completions(self) -> list[list[int]]:
        """The valid token ids of every row, as python lists."""
        return [row[:n].tolist() for row, n in zip(self.completion_ids_RxC, self.completion_lens_R)]

    def completion_mask_RxC(self) -> np.ndarray:
        t = np.arange(self.completion_ids_RxC.shape[1])[None, :]
        return t < self.completion_lens_R[:, None]


class RolloutEngine(abc.ABC):
    """Generates groups of completions for tokenised prompts: the one contract every engine implements.

    ``version`` is the weight version the engine samples with (the ``version`` of the last ``sync``).
    """

    version: int = 0

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        answers: Sequence[str] | None = None,
        prompt_ids: Sequence[str] | None = None,
    ) -> Rollouts:
        """Samples ``params.n`` completions for every prompt (token id lists, no padding).

        answers:    per-prompt ground truth. An engine that verifies (the sidecar client) fills
                    ``Rollouts.rewards_R`` from them; the others leave it None and the caller verifies.
        prompt_ids: stable per-prompt ids (exactly-once delivery across reconnects); optional.
        """

    @abc.abstractmethod
    def sync(self, weights, version: int) -> None:
        """Samples with new weights from now on, tagged ``version``.

        weights: an ``nnx.State`` of the policy graph the engine was built for (in-process engines swap
                 arrays without recompiling), or the path of a Hugging Face safetensors directory
                 (engines in another process or runtime load it from disk).
        """

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Releases engine resources; engines holding none need not override."""


def reverse_echo_script(prompt, k):
    """A MockEngine script: even samples echo the prompt reversed, odd samples answer ``2``; 1 ends each.

    Together with the 'exact' verifier and answer = the reversed prompt as text, even samples score 1
    and odd samples 0, so a test can check that every reward belongs to its own prompt.
    """
    body = list(reversed(prompt)) if k % 2 == 0 else [2]
    return [*body, 1]


class MockEngine(RolloutEngine):
    """Deterministic stand-in for tests: completions are given by a callable or drawn from a seed.

    ``script(prompt_ids, k) -> list[int]`` returns sample k's completion for a prompt; without a
    script, completions are random tokens in [low, high) of random length, ending in eos_id.
    ``delay_s`` makes every generate call take that long, so a test can act mid-stream.
    """

    def __init__(
        self,
        *,
        eos_id: int = 1,
        vocab_low: int = 2,
        vocab_high: int = 50,
        script=None,
        pad_id: int = 0,
        delay_s: float = 0.0,
    ):
        self.eos_id, self.low, self.high, self.script, self.pad_id = eos_id, vocab_low, vocab_high, script, pad_id
        self.delay_s = delay_s
        self.version = 0
        self.calls = 0

    def generate(self, prompts, params, *, answers=None, prompt_ids=None):
        if self.delay_s:
            time.sleep(self.delay_s)
        rng = np.random.default_rng(params.seed + 7919 * self.calls)
        self.calls += 1
        rows, reasons = [], []
        for p in prompts:
            for k in range(params.n):
                if self.script is not None:
                    toks = list(self.script(list(p), k))[: params.max_new_tokens]
                else:
                    length = int(rng.integers(1, params.max_new_tokens + 1))
                    toks = rng.integers(self.low, self.high, size=length).tolist()
                    if length < params.max_new_tokens:
                        toks[-1] = self.eos_id
                stop = bool(toks) and toks[-1] in (self.eos_id, *params.stop_token_ids)
                reasons.append(FINISH_STOP if stop else FINISH_LENGTH)
                rows.append(toks)
        width = max([1, *map(len, rows)])
        ids = np.full((len(rows), width), self.pad_id, np.int32)
        lens = np.zeros(len(rows), np.int32)
        for i, toks in enumerate(rows):
            ids[i, : len(toks)] = toks
            lens[i] = len(toks)
        logp = np.where(np.arange(width)[None] < lens[:, None], -1.0, 0.0).astype(np.float32)
        groups = np.repeat(np.arange(len(prompts), dtype=np.int32), params.n)
        return Rollouts(ids, lens, logp, reasons, groups, weight_version=self.version, pad_id=self.pad_id)

    def sync(self, weights, version):
        if isinstance(weights, (str, os.PathLike)) and not os.path.isdir(weights):
            raise FileNotFoundError(f"weights dir {str(weights)!r} does not exist")
        self.version = version
