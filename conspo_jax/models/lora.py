"""LoRA adapters on the policy's layer projections, for RL with a frozen base model.

`attach_lora(model, LoRAConfig(rank=8, alpha=16))` adds, per target projection t (any of q, k, v, o,
gate, up, down), a stacked pair of `LoRAParam`s to `model.layers`:

    {t}_lora_a  [L, in..., R]   uniform in +-1/sqrt(fan_in), peft's default (kaiming_uniform, a=sqrt(5))
    {t}_lora_b  [L, R, out...]  zeros, so a fresh adapter leaves the model's outputs bitwise unchanged

and every layer then computes x @ W + scale * (x @ A) @ B, scale = alpha / rank (peft's convention).
The base W stays an `nnx.Param`; `LoRAParam` is flax's `nnx.LoRAParam`, an `nnx.Param` subclass, so
`nnx.state(model, LoRAParam)` is exactly the adapters and `split_trainable` hands the optimizer only
those. The objectives see log-probs of a `Transformer` as always and know nothing of LoRA.

A's logical axes are the base weight's input axes plus 'lora_rank' (replicated), B's are 'lora_rank'
plus the base weight's output axes: A is FSDP-sharded like W's model dim, B tensor-parallel like
W's heads / MLP dim, so x @ A and (x A) @ B need no other layout than x @ W does.

`merge_lora(state)` (pure, jit-able) folds the adapters into the base weights and drops them: the
result matches `plain_graphdef(model)`, the graph of the same policy without adapters. Decode is
memory-bandwidth bound, so the sampler should get merged weights (see BENCHMARKS.md, "LoRA decode").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from conspo_jax.models.config import ModelConfig
from conspo_jax.models.sharding import logical_to_spec
from conspo_jax.models.transformer import Transformer, layer_param_specs

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# How many leading dims of each target's per-layer weight are its input (contracted) dims.
INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
LoRAParam = nnx.LoRAParam


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`model.lora.*`: rank (0 = no adapters), alpha (scale = alpha / rank), targets (a subset of
    LORA_TARGETS, as a sequence or a comma-separated string). Frozen and hashable: it is a static
    attribute of the policy, so jitted code reads the scale from the graphdef."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if not _is_int(self.rank) or self.rank < 0:
            raise ValueError(f"model.lora.rank must be an integer >= 0 (0 = off), got {self.rank!r}")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be a finite number > 0, got {self.alpha!r}")
        targets = self.targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"model.lora.targets must be names from {','.join(LORA_TARGETS)}, got {self.targets!r}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"model.lora.targets has unknown target {unknown[0]!r} (in {self.targets!r}); "
                f"expected a subset of {','.join(LORA_TARGETS)}"
            )
        if self.rank > 0 and not targets:
            raise ValueError(f"model.lora.targets is empty, but model.lora.rank={self.rank} asks for adapters")
        # Canonical order: equal sets give equal (hashable, graphdef-equal) configs.
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> LoRAConfig:
        """From the `model.lora` section of a run config (a ConfigDict or a dict); unknown keys are errors."""
        fields = [f.name for f in dataclasses.fields(cls)]
        values = dict(section)
        for key in values:
            if key not in fields:
                raise ValueError(f"model.lora.{key} is not a LoRA option (it takes {', '.join(fields)})")
        return cls(**values)


def adapter_specs(c: ModelConfig, lora: LoRAConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], int]]:
    """name -> (stacked shape, logical axes, fan_in) of every adapter `lora` gives a model of `c`."""
    base = layer_param_specs(c)
    out = {}
    for t in lora.targets:
        shape, axes, _ = base[t]
        n = INPUT_DIMS[t]
        fan_in = math.prod(shape[:n])
        out[f"{t}_lora_a"] = ((c.num_layers, *shape[:n], lora.rank), ("layers", *axes[:n], "lora_rank"), fan_in)
        out[f"{t}_lora_b"] = ((c.num_layers, lora.rank, *shape[n:]), ("layers", "lora_rank", *axes[n:]), fan_in)
    return out


def has_lora(model: Transformer) -> bool:
    return getattr(model, "lora", None) is not None


def attach_lora(model: Transformer, lora: LoRAConfig, *, seed: int = 0, dtype=jnp.float32) -> Transformer:
    """Adds `lora`'s adapters to `model` in place (and returns it); a rank-0 config changes nothing.

    Adapters are created in `dtype` (fp32: they are what the optimizer updates), directly in their
    shardings when the policy has a mesh. The base keeps its parameter dtype: load it with
    `param_dtype=bfloat16` to hold the frozen weights in the compute dtype (half the memory; they get
    no optimizer state either way).
    """
    if not isinstance(lora, LoRAConfig):
        raise TypeError(f"attach_lora needs a LoRAConfig, got {type(lora).__name__}")
    if has_lora(model):
        raise ValueError("attach_lora: the policy already has LoRA adapters")
    if not lora.enabled:
        return model
    specs = adapter_specs(model.config, lora)
    dtype = jnp.dtype(dtype)

    def init():
        keys = jax.random.split(jax.random.key(seed), len(lora.targets))
        out = {}
        for key, t in zip(keys, lora.targets):
            a_shape, _, fan_in = specs[f"{t}_lora_a"]
            bound = 1.0 / math.sqrt(fan_in)
            out[f"{t}_lora_a"] = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
            out[f"{t}_lora_b"] = jnp.zeros(specs[f"{t}_lora_b"][0], dtype)
        return out

    shardings = None
    if model.mesh is not None:
        shardings = {
            name: NamedSharding(model.mesh, logical_to_spec(axes, shape, model.mesh))
            for name, (shape, axes, _) in specs.items()
        }
    values = jax.jit(init, out_shardings=shardings)()
    for name, (_, axes, _) in specs.items():
        # lora_scale travels with the variable so that merge_lora needs nothing but the state.
        param = LoRAParam(values[name], logical_axes=axes, eager_sharding=False, lora_scale=lora.scale)
        setattr(model.layers, name, param)
    model.lora = lora
    return model


# ---------------------------------------------------------------------------- trainable vs frozen
def trainable_filter(model: Transformer):
    """The nnx filter of what the optimizer updates: the adapters under LoRA, else every Param."""
    return LoRAParam if has_lora(model) else nnx.Param


def split_trainable(model: Transformer):
    """(graphdef, trainable, frozen): `nnx.merge(graphdef, trainable, frozen)` is the policy again.

    Differentiate and optimise `trainable` only; `frozen` (the base weights and anything else) goes
    into the loss as a constant, so it gets no gradient buffer and no optimizer state."""
    return nnx.split(model, trainable_filter(model), ...)


def adapter_state(state: nnx.State) -> nnx.State:
    """The adapter entries of a policy state (what a LoRA run must send to a remote sampler)."""
    return nnx.filter_state(state, LoRAParam)


def state_nbytes(state: nnx.State) -> int:
    """Bytes of a state's arrays (shapes and dtypes only: abstract states work too)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------- merging
def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B for stacked [L, in..., out...] W, [L, in..., R] A and [L, R, out...] B, in W's dtype.

    The sum is formed in fp32 (full-precision matmul: no TF32) and rounded once to W's dtype."""
    num_layers, rank = w.shape[0], a.shape[-1]
    a_LxIxR = a.reshape(num_layers, -1, rank).astype(jnp.float32)
    b_LxRxO = b.reshape(num_layers, rank, -1).astype(jnp.float32)
    delta = jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO, precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def merge_lora(state: nnx.State, mesh: Mesh | None = None) -> nnx.State:
    """The policy state with every adapter folded into its base weight and removed (pure, jit-able).

    The result has the layout of `plain_graphdef(model)`: use it to sample from merged weights or
    to export. A state without adapters comes back unchanged. With `mesh`, merged weights are
    constrained to their base weight's sharding (what XLA would otherwise pick from A and B's)."""
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        base = (*path[:-1], path[-1].rsplit("_lora_", 1)[0])
        if isinstance(var, LoRAParam) and base not in flat:
            raise KeyError(
                f"merge_lora: adapter {'.'.join(path)} without its base weight {'.'.join(base)} in the state"
            )
    out = []
    for path, var in flat.items():
        if isinstance(var, LoRAParam):
            continue
        a = flat.get((*path[:-1], f"{path[-1]}_lora_a"))
        # A fresh Variable even where nothing changes: the merged state shares no Variable object
        # with the policy it came from, so in-place updates of one never reach the other.
        value = var.get_value()
        if a is not None:
            b = flat.get((*path[:-1], f"{path[-1]}_lora_b"))
            if b is None:
                raise KeyError(f"merge_lora: {'.'.join(map(str, path))} has a LoRA A but no B")
            value = merged_weight(value, a.get_value(), b.get_value(), b.get_metadata()["lora_scale"])
            axes = var.get_metadata().get("logical_axes")
            if mesh is not None and axes:
                spec = logical_to_spec(axes, value.shape, mesh)
                value = jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def _without_adapters(model: Transformer) -> Transformer:
    """A copy of `model` (Variables new, arrays shared) with the adapters removed."""
    plain = nnx.clone(model)
    for t in plain.lora.targets:
        delattr(plain.layers, f"{t}_lora_a")
        delattr(plain.layers, f"{t}_lora_b")
    plain.lora = None
    return plain


def plain_graphdef(model: Transformer):
    """The graphdef `merge_lora(nnx.state(model))` fits: the policy's own when it has no adapters."""
    return nnx.graphdef(_without_adapters(model) if has_lora(model) else model)


def base_policy(model: Transformer) -> Transformer:
    """The frozen base of `model` as a plain Transformer: its adapters dropped, not merged. A policy
    without adapters is returned as is."""
    if not has_lora(model):
        return model
    return nnx.merge(plain_graphdef(model), nnx.filter_state(nnx.state(model), nnx.Not(LoRAParam)))


def merged_policy(model: Transformer) -> Transformer:
    """A plain Transformer with the adapters folded in (for an engine, `save_hf_policy`, evaluation);
    `model` itself is left as it is. A policy without adapters is returned as is."""
    if not has_lora(model):
        return model
    return nnx.merge(plain_graphdef(model), merge_lora(nnx.state(model), model.mesh))


# ------------------------------------------------------------------------------------ accounting
def count_lora_params(c: ModelConfig, lora: LoRAConfig) -> int:
    """Adapter parameters `lora` adds to a model of `c`: L * R * (in + out) per target."""
    if not lora.enabled:
        return 0
    return sum(math.prod(shape) for shape, _, _ in adapter_specs(c, lora).values())
