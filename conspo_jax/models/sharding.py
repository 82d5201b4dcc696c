"""Device mesh and logical-axis sharding rules for the policy.

Parameters and activations are annotated with *logical* axis names ('embed', 'heads', 'batch', ...);
`LOGICAL_RULES` maps those to the mesh axes ('data', 'fsdp', 'tensor'). A dimension that does not
divide evenly over its mesh axes is replicated instead (e.g. Qwen2-1.5B's 2 KV heads on tensor=4), so
every mesh shape works for every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Weights: FSDP over the model dim, tensor-parallel over heads/MLP/vocab.
# Activations: batch over data x fsdp, features over tensor where the matching weight is split.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA's R (8-64) is too small to split; A and B shard by their base weight's axes
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
)


def make_mesh(shape: Sequence[int] | dict[str, int] = (1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. `shape` is a 3-tuple or a dict with any of those keys (others 1).

    One axis may be -1 to take the remaining devices. Uses the first prod(shape) of `devices`
    (default: all devices).
    """
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"make_mesh shape has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
        shape = tuple(shape.get(a, 1) for a in MESH_AXES)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"make_mesh shape={shape} must have 3 entries (data, fsdp, tensor)")
    devices = list(jax.devices() if devices is None else devices)
    if shape.count(-1) > 1:
        raise ValueError(f"make_mesh shape={shape}: at most one axis may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape = tuple(len(devices) // rest if s == -1 else s for s in shape)
    n = int(np.prod(shape))
    if n < 1 or n > len(devices) or min(shape) < 1:
        raise ValueError(f"make_mesh shape={shape} needs {n} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules=LOGICAL_RULES
) -> P:
    """PartitionSpec for logical `axes`; with `shape` and `mesh`, non-divisible dims are replicated."""
    table = dict(rules)
    out, used = [], set()
    for i, name in enumerate(axes):
        mesh_axes = table.get(name) if name is not None else None
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None:
                size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
                if shape[i] % size:
                    mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for an (abstract) nnx state, from each Variable's `logical_axes` metadata.

    Works for any state whose Variables carry `logical_axes` (params, and optimizer state built from
    them); Variables without it are replicated.
    """

    def one(v):
        axes = v.get_metadata().get("logical_axes")
        shape = v.shape
        spec = logical_to_spec(axes, shape, mesh, rules) if axes else P()
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for an activation, by logical axes; a no-op without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] input batch: rows over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh))
