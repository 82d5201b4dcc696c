"""Versioned weight directories shared by the trainer (writer) and the sidecar (reader).

The trainer exports each new policy as an HF safetensors checkpoint into ``<root>/v000012``; the
sidecar loads it from there when told by PushWeights. Weight bytes never travel over gRPC. A version
is written to a hidden temporary directory and renamed into place, so a reader never sees half a
checkpoint. Once the sidecar has acknowledged version v, every older version is deleted.

The default root is ``/dev/shm/conspo-weights-<uid>`` (RAM-backed, so an export costs no disk I/O),
falling back to the system temp dir where /dev/shm does not exist.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

_VERSION_DIR = re.compile(r"^v(\d{6,})$")
BASE_DIRNAME = "base"


def default_weights_dir() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"conspo-weights-{os.getuid()}")


def version_dirname(version: int) -> str:
    if version < 0:
        raise ValueError(f"weight version must be >= 0, got {version}")
    return f"v{version:06d}"


def resolve_inside(root: str, path: str) -> str:
    """``realpath(path)`` if it lies strictly inside ``realpath(root)``, else ValueError.

    Symlinks are resolved before the check, so a link inside the weights dir that points elsewhere
    is refused like any other path outside it. Relative paths are taken relative to ``root``.
    """
    if not path:
        raise ValueError("weights path is empty")
    if "\x00" in path:
        raise ValueError(f"weights path contains a NUL byte: {path!r}")
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, path))
    if os.path.commonpath([root_real, real]) != root_real or real == root_real:
        raise ValueError(f"weights path {path!r} resolves to {real!r}, outside the weights dir {root_real!r}")
    return real


class WeightStore:
    """The trainer's side of the weights directory: export, list, clean up."""

    def __init__(self, root: str | None = None, *, saver: Callable | None = None):
        self.root = os.path.abspath(root or default_weights_dir())
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._saver = saver

    def path_for(self, version: int) -> str:
        return os.path.join(self.root, version_dirname(version))

    def versions(self) -> list[int]:
        out = []
        for name in os.listdir(self.root):
            m = _VERSION_DIR.match(name)
            if m and os.path.isdir(os.path.join(self.root, name)):
                out.append(int(m.group(1)))
        return sorted(out)

    def export(self, policy, version: int) -> str:
        """Writes ``policy`` as HF safetensors into ``path_for(version)`` atomically; returns that path.

        A LoRA policy is written as its PEFT adapter alone (1-5% of the bytes): the sidecar holds the
        frozen base and merges the adapters onto it (``JaxEngine.sync``)."""
        final = self.path_for(version)
        if self._saver is None:  # both savers write to a temporary and rename it into place themselves
            from conspo_jax.models.hf_io import save_hf_policy
            from conspo_jax.models.lora import has_lora
            from conspo_jax.models.peft_io import save_peft_adapter

            return save_peft_adapter(policy, final) if has_lora(policy) else save_hf_policy(policy, final)
        saver = self._saver
        tmp = tempfile.mkdtemp(prefix=f".tmp-{version_dirname(version)}-", dir=self.root)
        try:
            saver(policy, tmp)
            if os.path.isdir(final):  # a re-export of the same version replaces the old one
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def export_base(self, policy) -> str:
        """Writes a LoRA run's frozen base (a plain policy) as HF safetensors into ``root/base``, which
        ``cleanup`` keeps; returns that path."""
        from conspo_jax.models.hf_io import save_hf_policy

        return save_hf_policy(policy, os.path.join(self.root, BASE_DIRNAME))

    @staticmethod
    def nbytes(path: str) -> int:
        """Bytes of the files of one exported version (what the sidecar reads for a weight sync)."""
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())

    def cleanup(self, keep_from: int) -> list[int]:
        """Deletes every version older than ``keep_from`` and stale temporaries; returns the versions removed."""
        removed = []
        for v in self.versions():
            if v < keep_from:
                shutil.rmtree(self.path_for(v), ignore_errors=True)
                removed.append(v)
        for name in os.listdir(self.root):
            tmp = os.path.join(self.root, name)
            # A temporary older than a minute belongs to a crashed export, not a running one.
            try:
                if name.startswith((".tmp-v", ".old-v")) and time.time() - os.path.getmtime(tmp) > 60:
                    shutil.rmtree(tmp, ignore_errors=True)
            except FileNotFoundError:
                pass
        return removed
