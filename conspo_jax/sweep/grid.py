"""Sweep grids: the points of a study, loaded from a sweep module, and the ``conspo train`` command of each.

A sweep module (``experiments/sweeps/NAME.py``) defines ``get_sweep(arg=None) -> list[Point]``. Each point
is one ordinary training run in ``<workdir>/runs/<name>``: the experiment config with ``overrides`` applied
and ``--config.seed=<seed>``. ``method`` is the row it reports under (Table 1 / Table 6); ``params``
marks a point of the parameter study (Figure 2) as ``{"tau": 10.0}``, one entry per curve it lies on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any

from conspo_jax.base.configs import UsageError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a study. ``overrides`` maps dotted config keys to values (``{"objective.name": "grpo"}``)."""

    name: str
    method: str
    seed: int
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, float] = dataclasses.field(default_factory=dict)
    in_table: bool = True  # False: only in the parameter study (Figure 2), not a row of Table 1 / 6

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise UsageError(
                f"sweep point name must match {_NAME_RE.pattern} (it names a directory), got {self.name!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"sweep point {self.name!r}: seed must be an int >= 0, got {self.seed!r}")
        for key in self.overrides:
            if key == "seed" or key.startswith("sft.cache_dir"):
                raise UsageError(f"sweep point {self.name!r}: override {key!r} is set by the sweep itself")


def format_value(value: Any) -> str:
    """A value as ``--config.k=<this>`` expects it (bools lower-case, as absl parses them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_sweep(spec: str) -> list[Point]:
    """The points of ``path.py[:arg]``; one UsageError naming the problem otherwise."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UsageError(f"--sweep: no such sweep file {path!r}")
    name = "conspo_sweep_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses defined in the module need it while executing
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise UsageError(f"--sweep: {path!r} defines no get_sweep(arg)")
    try:
        points = list(module.get_sweep(arg) if arg else module.get_sweep())
    except ValueError as e:  # a bad argument: the module names it
        raise UsageError(f"--sweep {spec}: {e}") from None
    if not points:
        raise UsageError(f"--sweep: {spec!r} has no points")
    seen: dict[str, Point] = {}
    for p in points:
        if not isinstance(p, Point):
            raise UsageError(f"--sweep: get_sweep must return Point objects, got {type(p).__name__}")
        if p.name in seen:
            raise UsageError(f"--sweep: two points are named {p.name!r}")
        seen[p.name] = p
    return points


def train_command(
    point: Point,
    *,
    config_spec: str,
    run_dir: str,
    cache_root: str | None,
    extra_overrides: dict[str, Any] | None = None,
    python: str | None = None,
) -> list[str]:
    """``python -m conspo_jax train`` for one point. Sweep-wide overrides come first, the point's win.

    ``cache_root`` set: the run gets ``--config.sft.cache_dir=<cache_root>/seed_<seed>``, so every method
    of one seed starts from one warm start (the trainer computes it once and reuses it).
    """
    cmd = [python or sys.executable, "-m", "conspo_jax", "train", "--config", config_spec, "--workdir", run_dir]
    merged = {**(extra_overrides or {}), **point.overrides, "seed": point.seed}
    if cache_root is not None:
        merged["sft.cache_dir"] = os.path.join(cache_root, f"seed_{point.seed}")
    cmd += [f"--config.{key}={format_value(value)}" for key, value in merged.items()]
    return cmd
