"""A ``RolloutEngine`` over SGLang's offline ``sglang.Engine`` (GPU machines only).

Written against ``python/sglang/srt/entrypoints/engine.py`` (sgl-project/sglang, 0.5.x):

* ``Engine.generate(input_ids=[[...], ...], sampling_params=[{...}, ...], return_logprob=True)`` with a
  batch returns a list of dicts ``{"text", "output_ids", "meta_info"}``; ``meta_info`` holds
  ``"output_token_logprobs"`` as ``[(logprob, token_id, text_or_None), ...]`` (one per generated token,
  the stop token included) and ``"finish_reason"`` as ``{"type": "stop"|"length"|"abort", ...}``.
* ``Engine.update_weights_from_disk(model_path, load_format=None)`` returns ``(success, message,
  num_paused_requests)`` (older releases: ``(success, message)``); ``Engine.flush_cache()``.

Each of the G samples of a prompt is its own request with its own ``sampling_seed`` (SGLang's ``n``
parameter would share one seed). SGLang honours ``sampling_seed`` when the engine is started with
``enable_deterministic_inference=True``; without it the seeds are accepted and sampling is
non-reproducible. The returned log-probs are SGLang's, of the temperature-scaled distribution; with
the paper's temperature 1 and top_p 1 they are the policy's own log-probs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from conspo_jax.rollout.engine import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Rollouts, SamplingParams

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, row: int) -> int:
    """A distinct, well-mixed 63-bit seed for row ``row`` of a request seeded ``seed`` (splitmix64)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(row) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _unpack_update_result(result: Any) -> tuple[bool, str]:
    if isinstance(result, dict):
        return bool(result.get("success")), str(result.get("message", ""))
    if isinstance(result, (tuple, list)) and len(result) >= 2:
        return bool(result[0]), str(result[1])
    return bool(result), ""


class SGLangEngine(RolloutEngine):
    """Rollouts from ``sglang.Engine``; weights are reloaded from HF safetensors directories.

    model_path:  the initial checkpoint (HF directory).
    engine:      an already-built engine object with ``sglang.Engine``'s methods (tests pass a stand-in).
    pad_id:      padding id of the returned ``Rollouts``.
    engine_kwargs: forwarded to ``sglang.Engine`` (e.g. ``mem_fraction_static``, ``tp_size``,
                 ``enable_deterministic_inference``, ``dtype``).
    """

    def __init__(
        self, model_path: str | None = None, *, engine=None, pad_id: int = 0, version: int = 0, **engine_kwargs
    ):
        if engine is None:
            if not model_path:
                raise ValueError("SGLangEngine needs model_path (an HF checkpoint directory) or engine=")
            try:
                import sglang
            except ImportError as e:
                raise ImportError("SGLangEngine needs SGLang: pip install -e '.[sglang]' on a CUDA machine") from e
            engine = sglang.Engine(model_path=model_path, **engine_kwargs)
        self.engine, self.pad_id, self.version = engine, pad_id, version

    def _request_params(self, params: SamplingParams, row: int) -> dict:
        return {
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": int(params.top_k) if params.top_k > 0 else -1,  # SGLang: -1 disables top-k
            "max_new_tokens": int(params.max_new_tokens),
            "stop_token_ids": [int(t) for t in params.stop_token_ids] or None,
            "sampling_seed": sample_seed(params.seed, row),
            "no_stop_trim": True,
            "skip_special_tokens": False,
        }

    def generate(self, prompts, params: SamplingParams, *, answers=None, prompt_ids=None) -> Rollouts:
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("SGLangEngine.generate: every prompt needs at least one token")
        n = params.n
        input_ids = [p for p in prompts for _ in range(n)]
        sampling = [self._request_params(params, row) for row in range(len(input_ids))]
        outs = self.engine.generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True)
        if isinstance(outs, dict):  # a batch of one comes back unwrapped
            outs = [outs]
        if len(outs) != len(input_ids):
            raise RuntimeError(f"sglang returned {len(outs)} outputs for {len(input_ids)} requests")
        rows, logps, reasons = [], [], []
        for row, out in enumerate(outs):
            meta = out["meta_info"]
            entries = meta.get("output_token_logprobs")
            if entries is None:
                raise RuntimeError("sglang output has no meta_info['output_token_logprobs'] (return_logprob ignored?)")
            ids = [int(e[1]) for e in entries]
            lps = [float(e[0]) for e in entries]
            output_ids = out.get("output_ids")
            if output_ids is not None and list(output_ids) != ids[: len(output_ids)]:
                raise RuntimeError(f"row {row}: sglang output_ids disagree with the token ids of output_token_logprobs")
            kind = (meta.get("finish_reason") or {}).get("type")
            if kind == "length":
                reasons.append(FINISH_LENGTH)
            elif kind == "stop":
                reasons.append(FINISH_STOP)
            else:
                raise RuntimeError(f"row {row}: sglang finished with {meta.get('finish_reason')!r}")
            rows.append(ids)
            logps.append(lps)
        width = max([1, *map(len, rows)])
        ids_RxC = np.full((len(rows), width), self.pad_id, np.int32)
        logp_RxC = np.zeros((len(rows), width), np.float32)
        lens_R = np.zeros(len(rows), np.int32)
        for i, (toks, lps) in enumerate(zip(rows, logps)):
            ids_RxC[i, : len(toks)] = toks
            logp_RxC[i, : len(toks)] = lps
            lens_R[i] = len(toks)
        return Rollouts(
            ids_RxC,
            lens_R,
            logp_RxC,
            reasons,
            np.repeat(np.arange(len(prompts), dtype=np.int32), n),
            weight_version=self.version,
            pad_id=self.pad_id,
        )

    def sync(self, weights, version: int) -> None:
        """``update_weights_from_disk(path)`` then ``flush_cache()`` (the prefix cache holds old-weight KV)."""
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError("SGLangEngine.sync loads weights from disk: pass the path of an HF safetensors directory")
        if os.path.isfile(os.path.join(weights, "adapter_config.json")):
            # A LoRA run pushes its PEFT adapter only; update_weights_from_disk would need full weights.
            raise ValueError(
                f"SGLangEngine.sync({os.fspath(weights)!r}): a PEFT adapter (model.lora.rank > 0); the sglang "
                "sidecar engine loads full checkpoints only: serve LoRA runs with --engine jax"
            )
        ok, message = _unpack_update_result(self.engine.update_weights_from_disk(os.fspath(weights)))
        if not ok:
            raise RuntimeError(f"sglang update_weights_from_disk({weights!r}) failed: {message}")
        self.engine.flush_cache()
        self.version = version

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)  # older sglang releases have no shutdown()
        if shutdown is not None:
            shutdown()
