"""The objective registry and the one signature the trainer calls every objective with.

    fn = get_objective("conspo")
    J, aux = fn(inputs, num_groups=G, progress=p, **hparams)

``J`` is a scalar to *maximise*. ``aux`` holds scalar diagnostics and always ``aux["normalizer"]``: the
stop-gradient count J is a mean over (valid groups, non-empty groups, or tokens, per objective). A
trainer that splits a batch into micro-batches of whole groups recovers the full-batch value and
gradient exactly as ``J = sum_m J_m n_m / sum_m n_m``.

Registered objectives are plain functions ``f(inputs, *, num_groups, progress, **hparams)``; the
registry wraps each in an :class:`Objective` that validates hyperparameter names, the inputs, and which
optional log-probs the objective needs.

Non-finite rewards (NaN, +-inf) are an error, the same for every objective: ``check_rewards`` raises
ValueError naming the first offending rollout row and its value. ``Objective.__call__`` applies it
whenever the rewards are concrete; inside ``jax.jit`` they are traced and nothing can raise, so the
trainer calls ``check_rewards`` on the host before the jitted step. What an objective computes from a
non-finite reward that bypassed the check is unspecified (the objectives used to disagree).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_RESERVED = ("num_groups", "progress")


@flax.struct.dataclass(kw_only=True)
class ObjectiveInputs:
    """One (micro-)batch of scored rollouts, flat over R rollouts with T completion-token slots.

    token_logp:   [R, C] f32 log-probs of the completion tokens under the current policy; the only
                  input objectives differentiate.
    old_logp:     [R, C] log-probs under pi_old (the sampling / pre-update policy); treated as constant.
                  Required by objectives with ``uses_old_logp``.
    mask:         [R, C] 1 (or True) on completion tokens.
    rewards:      [R] verifier rewards.
    group_ids:    [R] int32 prompt index of each rollout, in [0, num_groups).
    rollout_mask: [R] 1 on real rollouts, 0 on padding rollouts; None means all real.
    ref_logp:     [R, C] log-probs under the reference policy (KL terms); None when unused.
    """

    token_logp: jax.Array
    mask: jax.Array
    rewards: jax.Array
    group_ids: jax.Array
    old_logp: jax.Array | None = None
    rollout_mask: jax.Array | None = None
    ref_logp: jax.Array | None = None


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def validate_inputs(inputs: ObjectiveInputs, num_groups: int, objective: str) -> None:
    """Shape/dtype checks (always, they are static) and a group-id range check when values are concrete."""
    if not isinstance(inputs, ObjectiveInputs):
        raise TypeError(f"objective {objective!r} expects ObjectiveInputs, got {type(inputs).__name__}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive Python int (it is static), got {num_groups!r}")
    logp = inputs.token_logp
    if logp.ndim != 2:
        raise ValueError(f"inputs.token_logp must be [R, C], got shape {logp.shape}")
    num_rollouts = logp.shape[0]
    for field in ("mask", "old_logp", "ref_logp"):
        value = getattr(inputs, field)
        if value is not None and value.shape != logp.shape:
            raise ValueError(f"inputs.{field} must have token_logp's shape {logp.shape}, got {value.shape}")
    for field in ("rewards", "group_ids", "rollout_mask"):
        value = getattr(inputs, field)
        if value is not None and value.shape != (num_rollouts,):
            raise ValueError(f"inputs.{field} must have shape ({num_rollouts},), got {value.shape}")
    if not jnp.issubdtype(inputs.group_ids.dtype, jnp.integer):
        raise ValueError(f"inputs.group_ids must be integer, got dtype {inputs.group_ids.dtype}")
    if _is_concrete(inputs.group_ids) and num_rollouts:
        ids = np.asarray(inputs.group_ids)
        if ids.min() < 0 or ids.max() >= num_groups:
            raise ValueError(
                f"inputs.group_ids must lie in [0, num_groups={num_groups}), got range [{ids.min()}, {ids.max()}]"
            )


def check_rewards(rewards_R: Any, rollout_mask_R: Any = None) -> None:
    """Raises ValueError naming the first real rollout whose reward is NaN or +-inf.

    ``rollout_mask_R`` (1 on real rollouts) exempts padding rows, which may hold anything. Host-side:
    call it on concrete arrays before a jitted step; a traced argument is skipped.
    """
    if not _is_concrete(rewards_R):
        return
    rewards = np.asarray(rewards_R)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [R], got shape {rewards.shape}")
    if rewards.dtype != np.bool_ and (
        not np.issubdtype(rewards.dtype, np.number) or np.issubdtype(rewards.dtype, np.complexfloating)
    ):
        raise ValueError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    bad = ~np.isfinite(rewards.astype(np.float64))
    if rollout_mask_R is not None and _is_concrete(rollout_mask_R):
        bad &= np.asarray(rollout_mask_R).astype(bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"rewards[{row}] = {float(rewards[row])} is not finite ({int(bad.sum())} non-finite reward(s) among "
            f"{rewards.size} rollouts); rewards must be finite numbers"
        )


class Objective:
    """A registered objective: call it as ``J, aux = obj(inputs, num_groups=G, progress=p, **hparams)``.

    Attributes:
      name: registry name.
      uses_old_logp: whether the objective reads ``inputs.old_logp`` (the trainer may skip computing it
        otherwise).
      uses_ref_logp: whether it *can* read ``inputs.ref_logp``; :meth:`requires_ref_logp` says whether
        it does for given hyperparameters (GRPO only with ``beta > 0``).
      defaults: the hyperparameters it accepts and their defaults (the cited paper's values).
    """

    def __init__(
        self,
        name: str,
        fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
        *,
        uses_old_logp: bool,
        uses_ref_logp: bool,
        requires_ref: Callable[[dict[str, Any]], bool] | None = None,
    ):
        self.name = name
        self.fn = fn
        self.uses_old_logp = bool(uses_old_logp)
        self.uses_ref_logp = bool(uses_ref_logp)
        self._requires_ref = requires_ref
        params = inspect.signature(fn).parameters
        self.defaults = {
            key: p.default
            for key, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and key not in _RESERVED
        }
        self.__doc__ = fn.__doc__
        self.__name__ = name
        self.__wrapped__ = fn

    def check_hparams(self, hparams: dict[str, Any]) -> None:
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"objective {self.name!r} got unknown hyperparameter(s) {unknown}; it accepts {sorted(self.defaults)}"
            )

    def requires_ref_logp(self, **hparams: Any) -> bool:
        """Whether, with these hyperparameters, ``inputs.ref_logp`` must be provided."""
        self.check_hparams(hparams)
        if not self.uses_ref_logp:
            return False
        if self._requires_ref is None:
            return True
        try:
            return bool(self._requires_ref({**self.defaults, **hparams}))
        except jax.errors.ConcretizationTypeError:  # a traced hyperparameter: assume it is needed
            return True

    def __call__(
        self, inputs: ObjectiveInputs, *, num_groups: int, progress: Any = None, **hparams: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        self.check_hparams(hparams)
        validate_inputs(inputs, num_groups, self.name)
        check_rewards(inputs.rewards, inputs.rollout_mask)
        if self.uses_old_logp and inputs.old_logp is None:
            raise ValueError(
                f"objective {self.name!r} needs inputs.old_logp (got None); for a purely on-policy "
                "step pass jax.lax.stop_gradient(token_logp)"
            )
        if self.requires_ref_logp(**hparams) and inputs.ref_logp is None:
            raise ValueError(f"objective {self.name!r} with {hparams} needs inputs.ref_logp (got None)")
        value, aux = self.fn(inputs, num_groups=int(num_groups), progress=progress, **hparams)
        aux = {key: jax.lax.stop_gradient(val) for key, val in aux.items()}
        assert "normalizer" in aux, f"objective {self.name!r} did not report aux['normalizer']"
        return value, aux

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, defaults={self.defaults})"


_REGISTRY: dict[str, Objective] = {}


def register_objective(
    name: str,
    fn: Callable | None = None,
    *,
    uses_old_logp: bool,
    uses_ref_logp: bool = False,
    requires_ref: Callable[[dict[str, Any]], bool] | None = None,
    overwrite: bool = False,
):
    """Registers ``fn(inputs, *, num_groups, progress, **hparams) -> (J, aux)`` under ``name``.

    Usable as a decorator. Hyperparameters are ``fn``'s keyword-only arguments other than
    ``num_groups`` and ``progress``; their defaults are the objective's defaults. Returns the
    :class:`Objective` wrapper.
    """

    def decorate(f: Callable) -> Objective:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"objective {name!r} is already registered (pass overwrite=True to replace)")
        params = inspect.signature(f).parameters
        missing = [key for key in _RESERVED if key not in params]
        if missing:
            raise TypeError(f"objective {name!r}: function must accept keyword arguments {missing}")
        obj = Objective(name, f, uses_old_logp=uses_old_logp, uses_ref_logp=uses_ref_logp, requires_ref=requires_ref)
        _REGISTRY[name] = obj
        return obj

    return decorate if fn is None else decorate(fn)


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known objectives: {list_objectives()}") from None


def list_objectives() -> list[str]:
    """Sorted names of every registered objective."""
    return sorted(_REGISTRY)


def check_positive(objective: str, **values: Any) -> None:
    """Raises ValueError for a concrete hyperparameter that is not > 0 (traced values pass through)."""
    for key, value in values.items():
        if _is_concrete(value) and not np.all(np.asarray(value) > 0):
            raise ValueError(f"objective {objective!r}: {key} must be > 0, got {value!r}")


def check_nonnegative(objective: str, **values: Any) -> None:
    """Raises ValueError for a concrete hyperparameter that is < 0."""
    for key, value in values.items():
        if _is_concrete(value) and not np.all(np.asarray(value) >= 0):
            raise ValueError(f"objective {objective!r}: {key} must be >= 0, got {value!r}")
