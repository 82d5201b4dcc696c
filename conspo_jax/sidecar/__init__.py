"""The gRPC rollout sidecar: a process that owns the rollout engine (SGLang or the embedded JAX
sampler), generates and verifies groups of rollouts, and streams them to the JAX trainer, which
pushes new weights as HF safetensors directories after each update.

Public API (imported lazily, so verifier worker processes stay light):
  SidecarClient, SidecarError        trainer side (client.py)
  serve, serve_from_cli, SidecarOptions   sidecar side (server.py)
  WeightStore                        versioned weight directories (weights.py)
"""

import importlib

_EXPORTS = {
    "SidecarClient": "client",
    "SidecarError": "client",
    "serve": "server",
    "serve_from_cli": "server",
    "SidecarOptions": "server",
    "WeightStore": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"conspo_jax.sidecar.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'conspo_jax.sidecar' has no attribute {name!r}")
