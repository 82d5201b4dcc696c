"""From a config to a run's objects: the checks, then the construction.

  validation  every value and path of a config checked before anything runs (``UsageError`` naming the key)
  build       tokenizer, task, mesh, policy and rollout engine from a config; the one engine factory

Training, evaluation, the sidecar and profiling all construct through ``build``, so they never disagree on
how an engine or a policy is made. This layer sits above models, data, rewards, objectives and rollout,
and below everything that runs (train, evals, sidecar). Import the submodules directly.
"""
