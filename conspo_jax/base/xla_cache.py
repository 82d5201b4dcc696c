"""Where compiled XLA programs are persisted, keyed by the host CPU.

JAX's persistent-cache key names the platform ('cpu') but not the CPU's instruction set, so a
cache directory shared by different machines (an NFS home, a /tmp handed from one VM to the next)
can hand one machine native code compiled for another, which fails with SIGILL or SIGSEGV instead
of a cache miss. Every CPU model and flag set therefore gets its own subdirectory. Accelerator
executables are keyed by device kind already; the subdirectory only costs them one extra level.

This module imports no JAX, so test set-up can call it before JAX reads its environment.
"""

from __future__ import annotations

import hashlib
import os
import platform


def host_fingerprint() -> str:
    """A short hash of the CPU model, its feature flags and the architecture."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in lines:
                    lines.append(line)
    except OSError:  # no /proc (macOS): the processor string is the best there is
        lines.append(platform.processor())
    lines.append(platform.machine())
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:12]


def host_cache_dir(root: str) -> str:
    """``root``/host-<fingerprint>: the cache directory this machine may read and write."""
    return os.path.join(os.path.expanduser(root), f"host-{host_fingerprint()}")
