"""Lazy, slice-wise reading of (possibly sharded) safetensors checkpoints.

`safetensors.safe_open(framework="np")` cannot return bfloat16 (the dtype of nearly every published
LLM checkpoint), so tensors are memory-mapped here with ml_dtypes' bfloat16 instead: slicing a tensor
reads only the pages of that slice, so a device shard is read without loading the whole tensor.
Writing uses `safetensors.numpy.save_file`, which handles bfloat16.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

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


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class CheckpointReader:
    """All tensors of a HF checkpoint directory (single file or `model.safetensors.index.json`)."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {directory!r}")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, start = _read_header(path)
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
