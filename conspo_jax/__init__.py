"""conspo-jax: ConSPO and RLVR baselines for LLM reasoning, in JAX and Flax NNX.

Subpackages, from the floor up (each imports only those above it in this list; tests/test_layers.py):
  base        config loading and UsageError, multi-process helpers, the XLA cache directory, the logger.
  models      the Flax NNX decoder policy: HF / GGUF checkpoint I/O, sharding, token log-probs.
  rewards     the math answer verifier, in bounded worker processes.
  objectives  the ConSPO objective, its ablations and every baseline (jitted, segment-masked).
  data        math datasets, the synthetic arithmetic task and the grain input pipeline.
  rollout     the rollout-engine interface and its engines (JAX sampler, SGLang, mock, sidecar client);
              wire/, the sidecar protocol.
  run         config validation and the build layer (config -> tokenizer, task, mesh, policy, engine).
  evals       benchmark evaluation in the paper's protocol.
  sidecar     the gRPC rollout sidecar's server (SGLang or JAX engine).
  sweep       studies: grids of `conspo train` runs, with tables and figures.
  train       the RLVR trainer: the loop and its stages.
  profiling   XLA analyses, HLO facts and `conspo profile`.
The `conspo` command is cli.py.
"""

__version__ = "0.1.0"
