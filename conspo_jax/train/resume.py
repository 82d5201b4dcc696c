"""Resuming a run changes nothing: a resumed run whose config differs from the run's own ``config.json``
(beyond the length of training and settings that do not change what is computed) is refused with the
differing keys named, unless the user says ``--allow_config_change``."""

from __future__ import annotations

import json
import os

from conspo_jax.base.configs import UsageError, config_to_json

# Keys a resumed run may change without --allow_config_change: the length of training, and settings that
# do not change what is computed (where the sidecar listens, the progress bar, the compilation cache).
RESUME_MAY_CHANGE = (
    "train.num_steps",
    "train.stop_after",
    "data.num_epochs",
    "train.progress_bar",
    "train.keep_ckpts",
    "xla_cache_dir",
    "rollout.sidecar.address",
    "rollout.sidecar.token",
    "rollout.sidecar.deadline_s",
    "train.diagnostics_every",  # only writes the credit dumps
    # Where the processes meet and which one this is (the coordinator port is new each launch; every
    # process has its own id); a different process count is refused by _restore_data.
    "distributed.enabled",
    "distributed.coordinator",
    "distributed.num_processes",
    "distributed.process_id",
    "distributed.init_timeout_s",
)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(config, workdir: str, *, allow_config_change: bool = False) -> None:
    """A run resumed from ``workdir`` with another config stops with a line naming the keys that differ."""
    path = os.path.join(workdir, "config.json")
    ckpts = os.path.join(workdir, "checkpoints")
    if allow_config_change or not os.path.isfile(path) or not os.path.isdir(ckpts):
        return
    if not any(d.isdigit() for d in os.listdir(ckpts)):
        return
    try:
        with open(path) as f:
            before = _flatten(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(
            f"{path}: the run's config is unreadable ({e}); pass --allow_config_change to resume"
        ) from None
    now = _flatten(json.loads(config_to_json(config)))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:6])
        more = f" (+{len(differ) - 6} more)" if len(differ) > 6 else ""
        raise UsageError(
            f"--workdir {workdir!r} holds a run with another config ({shown}{more}); "
            "use a new --workdir, or --allow_config_change to resume it anyway"
        )
