"""Policy models for conspo-jax: Qwen2 / Llama / Qwen3 decoder-only transformers in Flax NNX.

Public API: `ModelConfig`, `get_model_config`, `init_policy`, `load_hf_policy`, `save_hf_policy`,
`token_logprobs`, `make_mesh`, `REMAT_POLICIES` (the `remat=` values), `compute_layer_params`, and for the sampler `init_kv_cache`, `forward_cached`,
`policy_logits`. LoRA (conspo_jax/models/lora.py): `LoRAConfig`, `LoRAParam`, `attach_lora`,
`split_trainable`, `merge_lora`, `merged_policy`, `base_policy`, `plain_graphdef`. Sharding helpers: `state_shardings` (any nnx state whose Variables carry
`logical_axes`, e.g. params or optimizer state), `policy_state_shardings`, `batch_sharding`.

Typical trainer use (jit a pure function over split state):

    policy = load_hf_policy(path, mesh=make_mesh((1, 8, 1)), remat="full")
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    def loss(params, rest, batch):
      logp = token_logprobs(nnx.merge(graphdef, params, rest), batch["ids"], batch["mask"])
      ...
"""

from conspo_jax.models.cache import KVCache, forward_cached, init_kv_cache, kv_cache_sharding
from conspo_jax.models.config import ModelConfig, get_model_config, list_model_configs
from conspo_jax.models.hf_io import load_hf_policy, save_hf_policy
from conspo_jax.models.layers import REMAT_POLICIES
from conspo_jax.models.logprobs import mask_positions, segment_positions, token_logprobs
from conspo_jax.models.lora import (
    LoRAConfig,
    LoRAParam,
    attach_lora,
    base_policy,
    merge_lora,
    merged_policy,
    plain_graphdef,
    split_trainable,
)
from conspo_jax.models.sharding import LOGICAL_RULES, batch_sharding, logical_to_spec, make_mesh, state_shardings
from conspo_jax.models.transformer import (
    Transformer,
    abstract_policy,
    compute_layer_params,
    hidden_states,
    init_policy,
    policy_logits,
    policy_state_shardings,
)

Policy = Transformer

__all__ = [
    "KVCache",
    "LOGICAL_RULES",
    "LoRAConfig",
    "LoRAParam",
    "ModelConfig",
    "Policy",
    "REMAT_POLICIES",
    "Transformer",
    "abstract_policy",
    "attach_lora",
    "base_policy",
    "batch_sharding",
    "compute_layer_params",
    "forward_cached",
    "get_model_config",
    "hidden_states",
    "init_kv_cache",
    "init_policy",
    "kv_cache_sharding",
    "list_model_configs",
    "load_hf_policy",
    "logical_to_spec",
    "make_mesh",
    "mask_positions",
    "merge_lora",
    "merged_policy",
    "plain_graphdef",
    "policy_logits",
    "policy_state_shardings",
    "save_hf_policy",
    "segment_positions",
    "split_trainable",
    "state_shardings",
    "token_logprobs",
]
