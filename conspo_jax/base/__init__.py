"""The floor every layer stands on: modules that import nothing else of conspo_jax.

  configs      loading experiment config modules, ``UsageError`` (bad input: one line, exit code 2)
  distributed  multi-process start-up, global arrays from process-local rows, gathers
  xla_cache    the persistent XLA cache directory, one per host CPU
  logs         the library's one logger and its ``[conspo] ...`` console lines

Import the submodules directly; this package imports nothing, so that ``conspo_jax.base.xla_cache``
stays free of JAX (test set-up calls it before JAX reads its environment).
"""
