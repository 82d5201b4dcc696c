"""Export a LoRA policy's adapters as a PEFT adapter directory, and read one back.

The directory holds `adapter_config.json` and `adapter_model.safetensors` as peft writes them for a
`*ForCausalLM` base (Llama, Qwen2, Qwen3 name their projections alike), so
`peft.PeftModel.from_pretrained(base, path)` loads it onto the base checkpoint (tests/test_lora.py);
it is peft's standard layout, the one vLLM's and SGLang's LoRA loaders read (not tested here):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [R, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, R]

peft computes W_hf + (alpha / r) * lora_B @ lora_A with W_hf = [out, in], the transpose of our
[in..., out...] layout (conspo_jax/models/hf_io.py), so lora_A is our A flattened to [in, R] and
transposed and lora_B our B flattened to [R, out] and transposed; the flattening order of the head
dims is the one hf_io uses for the base weights. A merged checkpoint (no peft needed to load it)
comes from `hf_io.save_hf_policy`, which folds the adapters in.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from conspo_jax.models.hf_io import _TORCH_DTYPE_NAMES, _host, replace_dir, weight_maps
from conspo_jax.models.lora import LoRAConfig, adapter_specs, has_lora
from conspo_jax.models.safetensors_io import CheckpointReader
from conspo_jax.models.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)


def hf_module(config, target: str) -> str:
    """The HF module path of a target projection, with {i} for the layer: 'model.layers.{i}.mlp.up_proj'."""
    return weight_maps(config)[("layers", target)].hf_name.removesuffix(".weight")


def peft_keys(config, target: str, layer: int) -> tuple[str, str]:
    """(lora_A key, lora_B key) of one target in one layer, as peft saves them (no adapter name)."""
    module = _PREFIX + hf_module(config, target).format(i=layer)
    return module + ".lora_A.weight", module + ".lora_B.weight"


def adapter_config(lora: LoRAConfig, config, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json of `lora` on a model of `config` (plain LoRA: no dropout, bias, DoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        # The leaf module names; peft matches them in every layer.
        "target_modules": sorted(hf_module(config, t).rsplit(".", 1)[1] for t in lora.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as ours
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "inference_mode": True,
    }


def save_peft_adapter(
    policy: Transformer, path: str | os.PathLike, *, base_model_name_or_path: str | None = None, dtype=None
) -> str:
    """Writes `policy`'s adapters as a PEFT adapter directory at `path` (atomically); returns the path.

    base_model_name_or_path: recorded in adapter_config.json (a hub id or the base checkpoint's
    directory) for loaders that resolve the base from it. dtype: storage dtype, default the adapters'
    own (fp32). Only process 0 writes; every process joins the gathers of sharded adapters.
    """
    if not has_lora(policy):
        raise ValueError("save_peft_adapter: the policy has no LoRA adapters (see conspo_jax.models.lora.attach_lora)")
    path = os.path.abspath(os.fspath(path))
    config, lora = policy.config, policy.lora
    tensors = {}
    for t in lora.targets:
        a_all = getattr(policy.layers, f"{t}_lora_a")[...]
        b_all = getattr(policy.layers, f"{t}_lora_b")[...]
        out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else a_all.dtype))
        if out_dtype not in _TORCH_DTYPE_NAMES:
            raise ValueError(f"save_peft_adapter dtype={dtype!r} not supported; use float32/bfloat16/float16")
        a_all, b_all = _host(a_all), _host(b_all)
        for i in range(config.num_layers):
            a_key, b_key = peft_keys(config, t, i)
            tensors[a_key] = np.ascontiguousarray(a_all[i].reshape(-1, lora.rank).T.astype(out_dtype))
            tensors[b_key] = np.ascontiguousarray(b_all[i].reshape(lora.rank, -1).T.astype(out_dtype))
    if jax.process_index() != 0:
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(lora, config, base_model_name_or_path), f, indent=2, sort_keys=True)
    return replace_dir(tmp, path)


def read_peft_config(path: str | os.PathLike, config) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; ValueError for what we cannot represent exactly."""
    with open(os.path.join(os.fspath(path), ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}, only LORA is supported")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if cfg.get(key, plain) != plain:
            raise ValueError(f"{path}: {key}={cfg[key]!r} not supported (only {plain!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}={cfg[key]!r} not supported (adapters on every layer only)")
    names = {hf_module(config, t).rsplit(".", 1)[1]: t for t in LoRAConfig().targets}
    modules = cfg["target_modules"]
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise ValueError(f"{path}: target_modules {unknown} are not projections of this model ({sorted(names)})")
    return LoRAConfig(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=tuple(names[m] for m in modules))


def load_peft_adapter(policy: Transformer, path: str | os.PathLike) -> Transformer:
    """Sets `policy`'s adapters (already attached, with the same rank and targets as the directory's)
    to a PEFT adapter directory's weights, in place; returns the policy."""
    if not has_lora(policy):
        raise ValueError("load_peft_adapter: attach adapters first (LoRAConfig from read_peft_config(path, config))")
    config, lora = policy.config, policy.lora
    theirs = read_peft_config(path, config)
    if theirs != lora:
        raise ValueError(f"load_peft_adapter: {path} holds {theirs}, the policy has {lora}")
    reader = CheckpointReader(os.fspath(path))
    specs = adapter_specs(config, lora)
    for t in lora.targets:
        for side, key_index in (("a", 0), ("b", 1)):
            var = getattr(policy.layers, f"{t}_lora_{side}")
            rows = []
            for i in range(config.num_layers):
                key = peft_keys(config, t, i)[key_index]
                if key not in reader:
                    raise KeyError(f"adapter {path!r} is missing tensor {key!r}")
                rows.append(np.asarray(reader.tensor(key)).T.reshape(specs[f"{t}_lora_{side}"][0][1:]))
            value = np.stack(rows).astype(var[...].dtype)
            var[...] = jax.device_put(value, var[...].sharding)
    return policy
