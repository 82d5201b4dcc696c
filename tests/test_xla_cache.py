"""The persistent compilation cache is keyed by the host CPU, so machines never share native code."""

import os
import subprocess
import sys

from conspo_jax.base import xla_cache


def test_the_directory_is_stable_on_one_host_and_differs_across_cpus(monkeypatch, tmp_path):
    here = xla_cache.host_cache_dir(str(tmp_path))
    assert here == xla_cache.host_cache_dir(str(tmp_path)) and here.startswith(str(tmp_path))
    info = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *a, **kw):
        return real_open(info, *a, **kw) if path == "/proc/cpuinfo" else real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    info.write_text("processor\t: 0\nmodel name\t: CPU A\nflags\t\t: sse2 avx2 avx512f\n")
    a = xla_cache.host_cache_dir(str(tmp_path))
    info.write_text("processor\t: 0\nmodel name\t: CPU A\nflags\t\t: sse2 avx2\n")  # same model, fewer features
    b = xla_cache.host_cache_dir(str(tmp_path))
    info.write_text("processor\t: 0\nmodel name\t: CPU A\nflags\t\t: sse2 avx2\nprocessor\t: 1\n" * 2)
    assert a != b and b == xla_cache.host_cache_dir(str(tmp_path))  # one more core does not matter


def test_the_trainer_enables_the_host_directory(tmp_path):
    code = (
        "import jax; from conspo_jax.run import build; from ml_collections import ConfigDict;"
        f"build.enable_compilation_cache(ConfigDict(dict(xla_cache_dir={str(tmp_path)!r})));"
        "print(jax.config.jax_compilation_cache_dir)"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == xla_cache.host_cache_dir(str(tmp_path))
