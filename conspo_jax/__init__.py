"""conspo-jax: ConSPO and RLVR baselines for LLM reasoning, in JAX and Flax NNX.

Subpackages:
  objectives  the ConSPO objective, its ablations and every baseline (jitted, segment-masked).
  models      the Flax NNX decoder policy: HF checkpoint I/O, sharding, token log-probs.
  rollout     the rollout-engine interface, the embedded JAX sampler and a mock.
  data        math datasets, the synthetic arithmetic task and the grain input pipeline.
  rewards     the math answer verifier.
  train       the RLVR trainer.
  evals       benchmark evaluation in the paper's protocol.
  sidecar     the gRPC rollout sidecar (SGLang or JAX engine).
"""

__version__ = "0.1.0"
