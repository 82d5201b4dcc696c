"""Load a HuggingFace checkpoint directory into a (sharded) policy and export it back.

Loading builds the abstract policy (`nnx.eval_shape`), derives each weight's NamedSharding, and
creates every array with `jax.make_array_from_callback`, whose callback reads just that device's
slice from the memory-mapped safetensors: a model larger than host memory never exists whole on the
host. Export writes safetensors shards + config.json (+ generation_config.json) into a temporary
directory and renames it into place, so readers never see a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors.numpy import save_file

from conspo_jax.models.config import ModelConfig
from conspo_jax.models.lora import has_lora, merged_policy
from conspo_jax.models.safetensors_io import CheckpointError, CheckpointReader, check_checkpoint_files, read_header
from conspo_jax.models.sharding import state_shardings
from conspo_jax.models.transformer import Transformer, abstract_policy


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """How one of our weights relates to a HF tensor: ours = hf.reshape(split).transpose(perm).

    `groups[i]` lists the split dims that HF dim i was reshaped into (always consecutive).
    """

    hf_name: str  # may contain {i} (layer index) for stacked weights
    split: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]


def _identity(name, shape):
    return WeightMap(name, tuple(shape), tuple((i,) for i in range(len(shape))), tuple(range(len(shape))))


def weight_maps(c: ModelConfig) -> dict[tuple[str, ...], WeightMap]:
    """Our state path -> HF tensor mapping for config `c`."""
    d, f, h, k, dh, v = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size)
    pre = "model.layers.{i}."
    maps = {
        ("embed",): _identity("model.embed_tokens.weight", (v, d)),
        ("final_norm",): _identity("model.norm.weight", (d,)),
        ("layers", "attn_norm"): _identity(pre + "input_layernorm.weight", (d,)),
        ("layers", "mlp_norm"): _identity(pre + "post_attention_layernorm.weight", (d,)),
        # HF Linear weights are [out, in]; ours are [in, out] with heads split out.
        ("layers", "q"): WeightMap(pre + "self_attn.q_proj.weight", (h, dh, d), ((0, 1), (2,)), (2, 0, 1)),
        ("layers", "k"): WeightMap(pre + "self_attn.k_proj.weight", (k, dh, d), ((0, 1), (2,)), (2, 0, 1)),
        ("layers", "v"): WeightMap(pre + "self_attn.v_proj.weight", (k, dh, d), ((0, 1), (2,)), (2, 0, 1)),
        ("layers", "o"): WeightMap(pre + "self_attn.o_proj.weight", (d, h, dh), ((0,), (1, 2)), (1, 2, 0)),
        ("layers", "gate"): WeightMap(pre + "mlp.gate_proj.weight", (f, d), ((0,), (1,)), (1, 0)),
        ("layers", "up"): WeightMap(pre + "mlp.up_proj.weight", (f, d), ((0,), (1,)), (1, 0)),
        ("layers", "down"): WeightMap(pre + "mlp.down_proj.weight", (d, f), ((0,), (1,)), (1, 0)),
    }
    if c.qkv_bias:
        maps[("layers", "q_bias")] = WeightMap(pre + "self_attn.q_proj.bias", (h, dh), ((0, 1),), (0, 1))
        maps[("layers", "k_bias")] = WeightMap(pre + "self_attn.k_proj.bias", (k, dh), ((0, 1),), (0, 1))
        maps[("layers", "v_bias")] = WeightMap(pre + "self_attn.v_proj.bias", (k, dh), ((0, 1),), (0, 1))
    if c.qk_norm:
        maps[("layers", "q_norm")] = _identity(pre + "self_attn.q_norm.weight", (dh,))
        maps[("layers", "k_norm")] = _identity(pre + "self_attn.k_norm.weight", (dh,))
    if not c.tie_word_embeddings:
        maps[("lm_head",)] = WeightMap("lm_head.weight", (v, d), ((0,), (1,)), (1, 0))
    return maps


def _read_slice(tensor: np.ndarray, wm: WeightMap, ours: tuple[slice, ...]) -> np.ndarray:
    """Reads only the HF elements behind `ours` (slices over our dims) and returns them in our layout."""
    split_sl = [slice(None)] * len(wm.split)
    for j, s in enumerate(ours):
        split_sl[wm.perm[j]] = s
    split_sl = [slice(*s.indices(n)) for s, n in zip(split_sl, wm.split)]
    hf_sl, local_shape, local_sl = [], [], []
    for group in wm.groups:
        outer, inner = group[0], group[1:]
        inner_size = math.prod(wm.split[i] for i in inner)
        s = split_sl[outer]
        hf_sl.append(slice(s.start * inner_size, s.stop * inner_size))  # contiguous rows of the outer dim
        local_shape += [s.stop - s.start] + [wm.split[i] for i in inner]
        local_sl += [slice(None)] + [split_sl[i] for i in inner]
    block = np.asarray(tensor[tuple(hf_sl)]).reshape(local_shape)[tuple(local_sl)]
    return block.transpose(wm.perm)


def _stacked(path: tuple[str, ...]) -> bool:
    return path[0] == "layers"


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json; ``CheckpointError`` (a UsageError) naming
    the file when it is missing, not JSON, or describes an unsupported model."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"no such checkpoint directory {path!r}")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"checkpoint directory {path!r} has no config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    try:
        return ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def check_hf_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """Cheap up-front check of a checkpoint directory (no tensor data is read): config.json parses and
    every safetensors file (those the index lists, or all in the directory) exists and has a header
    consistent with its size. Returns the ModelConfig; raises ``CheckpointError`` naming the file."""
    config = read_hf_config(path)
    for file in check_checkpoint_files(path):
        read_header(file)
    return config


def load_hf_policy(
    path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, mesh: Mesh | None = None, **opts
) -> Transformer:
    """Policy with the weights of a local HF checkpoint directory (config.json + safetensors).

    `opts` are `init_policy` options (remat, logprob_chunk, attn_impl). Each weight goes straight to
    its devices in its sharding (`mesh`), converted to `param_dtype`.
    """
    path = os.fspath(path)
    config = read_hf_config(path)
    reader = CheckpointReader(path)
    model = abstract_policy(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **opts)
    graphdef, abs_state = nnx.split(model)
    if mesh is not None:
        shardings = nnx.to_flat_state(state_shardings(abs_state, mesh))
    else:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = nnx.to_flat_state(
            jax.tree.map(lambda v: v.replace(one), abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        )
    maps = weight_maps(config)
    target = np.dtype(param_dtype)
    leaves = []
    for (p, var), (_, shard_var) in zip(nnx.to_flat_state(abs_state), shardings):
        if p not in maps:
            raise KeyError(f"no HF mapping for policy weight {'.'.join(p)}")
        wm = maps[p]
        names = [wm.hf_name.format(i=i) for i in range(config.num_layers)] if _stacked(p) else [wm.hf_name]
        for name in names:
            if name not in reader:
                raise KeyError(f"checkpoint {path!r} is missing tensor {name!r}")
            want = tuple(math.prod(wm.split[i] for i in g) for g in wm.groups)
            if reader.shape(name) != want:
                raise ValueError(f"checkpoint tensor {name!r} has shape {reader.shape(name)}, config implies {want}")

        def callback(index, wm=wm, names=names, stacked=_stacked(p), shape=var.shape):
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
            if not stacked:
                return _read_slice(reader.tensor(names[0]), wm, index).astype(target)
            rows = range(*index[0].indices(shape[0]))
            return np.stack([_read_slice(reader.tensor(names[i]), wm, index[1:]).astype(target) for i in rows])

        arr = jax.make_array_from_callback(var.shape, shard_var.get_value(), callback)
        leaves.append((p, var.replace(arr)))
    state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------ export
_TORCH_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(jnp.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
}


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _to_hf(ours: np.ndarray, wm: WeightMap) -> np.ndarray:
    split = ours.transpose(np.argsort(wm.perm))
    return np.ascontiguousarray(split.reshape([math.prod(wm.split[i] for i in g) for g in wm.groups]))


def save_hf_policy(
    policy: Transformer,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = 4 * 1024**3,
    copy_files_from: str | None = None,
) -> str:
    """Writes `policy` as a HF checkpoint directory that transformers / SGLang load.

    dtype: storage dtype; default is the dtype the checkpoint was published in (`config.torch_dtype`),
    else the parameter dtype. Tensors are fetched one layer at a time, so host memory holds at most
    one shard. `copy_files_from` copies tokenizer / generation files from another checkpoint directory.
    A LoRA policy is written merged (W + scale * A @ B), loadable without peft; its adapters alone go
    through `peft_io.save_peft_adapter`. Returns the final path. Only process 0 writes.
    """
    path = os.path.abspath(os.fspath(path))
    if has_lora(policy):
        policy = merged_policy(policy)
    config: ModelConfig = policy.config
    state = nnx.state(policy, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    if dtype is None:
        dtype = config.torch_dtype or np.dtype(flat[("embed",)].get_value().dtype).name
    out_dtype = np.dtype(jnp.dtype(dtype))
    if out_dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"save_hf_policy dtype={dtype!r} not supported; use float32/bfloat16/float16")

    # Plan (name, getter, nbytes) first so shard files can be named "-of-N" before any is written.
    plan = []
    for p, wm in weight_maps(config).items():
        arr = flat[p].get_value()
        if _stacked(p):
            for i in range(config.num_layers):
                nbytes = math.prod(arr.shape[1:]) * out_dtype.itemsize
                plan.append((wm.hf_name.format(i=i), (lambda a=arr, i=i, wm=wm: _to_hf(_host(a[i]), wm)), nbytes))
        else:
            plan.append(
                (wm.hf_name, (lambda a=arr, wm=wm: _to_hf(_host(a), wm)), math.prod(arr.shape) * out_dtype.itemsize)
            )
    shards, current, size = [], [], 0
    for item in plan:
        if current and size + item[2] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item[2]
    shards.append(current)

    writer = jax.process_index() == 0
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent) if writer else None
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, get, nbytes in shard:
            tensors[name] = get().astype(out_dtype)  # every process joins the gathers
            weight_map[name] = fname
            total += nbytes
        if writer:
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
    if not writer:
        return path
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = _TORCH_DTYPE_NAMES[out_dtype]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    if copy_files_from:
        for name in os.listdir(copy_files_from):
            if name.endswith((".safetensors", ".index.json")) or name == "config.json":
                continue
            if name.startswith(
                ("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "generation_config")
            ):
                shutil.copy2(os.path.join(copy_files_from, name), os.path.join(tmp, name))
    return replace_dir(tmp, path)


def replace_dir(tmp: str, path: str) -> str:
    """Puts the finished directory ``tmp`` at ``path`` (same parent), moving any old one aside first, so a
    reader sees the old checkpoint or the new one, never a mix; returns ``path``."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=os.path.dirname(path) or ".")
        os.replace(path, os.path.join(old, "ckpt"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return path
