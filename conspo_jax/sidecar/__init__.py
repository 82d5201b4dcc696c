"""The gRPC rollout sidecar, server side: a process that owns a rollout engine (SGLang or the embedded
JAX sampler), generates and verifies groups of rollouts, streams them to the trainer, and loads the
weights the trainer pushes as HF safetensors directories.

The trainer's side is an engine like any other, ``conspo_jax.rollout.sidecar_client.SidecarClient``;
the protocol both sides speak is ``conspo_jax.rollout.wire``. This package imports neither the trainer
nor the evaluator.

Public API (imported lazily, so verifier worker processes stay light):
  serve, serve_from_cli   (server.py)
  SidecarOptions          (options.py)
"""

import importlib

_EXPORTS = {
    "serve": "server",
    "serve_from_cli": "server",
    "SidecarOptions": "options",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"conspo_jax.sidecar.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'conspo_jax.sidecar' has no attribute {name!r}")
