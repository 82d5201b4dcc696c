"""Lazy, slice-wise reading of (possibly sharded) safetensors checkpoints.

`safetensors.safe_open(framework="np")` cannot return bfloat16 (the dtype of nearly every published
LLM checkpoint), so tensors are memory-mapped here with ml_dtypes' bfloat16 instead: slicing a tensor
reads only the pages of that slice, so a device shard is read without loading the whole tensor.
Writing uses `safetensors.numpy.save_file`, which handles bfloat16.

Every header is checked against its file's size on open, so a truncated, empty or garbage file fails
at once with a ``CheckpointError`` (a ``UsageError``) naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from conspo_jax.base.configs import UsageError

_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "U8": np.uint8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "BOOL": np.bool_,
}


# A header larger than this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 << 20


class CheckpointError(UsageError):
    """A checkpoint file that is missing, truncated or not safetensors; the message names the file."""


def read_header(path: str) -> tuple[dict, int]:
    """The tensor table of one safetensors file and where its data starts, checked against the file's
    size so a truncated or garbage file fails here, naming the file, not later in a reshape."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no 8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header length {n}, file size {size} bytes)"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for key, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            count = math.prod(int(d) for d in info["shape"])
            itemsize = np.dtype(_DTYPES[info["dtype"]]).itemsize if info["dtype"] in _DTYPES else None
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r:.200}") from None
        if not 0 <= begin <= end <= data_bytes:
            raise CheckpointError(
                f"{path}: truncated or corrupt: tensor {key!r} spans bytes [{begin}, {end}) of a {data_bytes}-byte "
                "data section"
            )
        if itemsize is not None and end - begin != count * itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r} of shape {info['shape']} {info['dtype']} needs {count * itemsize} bytes, "
                f"its offsets give {end - begin}"
            )
    return header, 8 + n


def check_checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory, each header read and checked (see ``read_header``).

    With ``model.safetensors.index.json``, every file its ``weight_map`` names must exist; without, every
    ``*.safetensors`` file in the directory is read. Raises ``CheckpointError`` naming the file.
    """
    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e})") from None
        for name in files:
            if not os.path.isfile(os.path.join(directory, name)):
                raise CheckpointError(f"{index} lists {name!r}, which does not exist in {directory}")
    else:
        try:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        except OSError as e:
            raise CheckpointError(f"{directory}: cannot list checkpoint directory: {e.strerror or e}") from None
    if not files:
        raise CheckpointError(f"no *.safetensors files in checkpoint directory {directory!r}")
    return [os.path.join(directory, name) for name in files]


class CheckpointReader:
    """All tensors of a HF checkpoint directory (single file or `model.safetensors.index.json`)."""

    def __init__(self, directory: str | os.PathLike):
        self._where: dict[str, tuple[str, dict, int]] = {}
        for path in check_checkpoint_files(directory):
            header, start = read_header(path)
            for key, info in header.items():
                self._where[key] = (path, info, start)
        self._maps: dict[str, np.memmap] = {}

    def keys(self):
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def dtype(self, key: str):
        return np.dtype(_DTYPES[self._where[key][1]["dtype"]])

    def tensor(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (nothing is read until it is sliced)."""
        if key not in self._where:
            raise KeyError(f"tensor {key!r} not found in checkpoint")
        path, info, start = self._where[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {key!r} has unsupported safetensors dtype {info['dtype']!r}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][start + begin : start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
