"""Reading data files: jsonl / json / parquet / csv rows, where the data directory is, and ``DataError``.

Every problem with a file (missing, unreadable, empty, truncated, of an unknown format, rows that are not
objects) is a ``DataError`` naming the file and the line, a ``UsageError`` the CLI prints as one line.
``conspo_jax.data.math_data`` turns the rows into ``{id, problem, answer}`` records.
"""

from __future__ import annotations

import csv
import json
import os

from conspo_jax.base.configs import UsageError

DATA_DIR_ENV = "CONSPO_DATA_DIR"


class DataError(UsageError):
    """A data file or dataset name that cannot be used: missing, unreadable, empty, truncated, of an
    unknown format, or a row without a required field. The message names the file (and row / field)."""


class MissingAnswerError(DataError):
    """A row has no usable answer; training sets skip such rows, evaluation sets refuse them."""


def default_data_dir() -> str:
    """``$CONSPO_DATA_DIR``, else ``../shared/data`` next to the repository root."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.normpath(os.path.join(repo, "..", "shared", "data"))


FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _parse_int(text: str):
    # json.loads refuses integers of more than 4300 digits (Python's conversion limit); keep them as text.
    return int(text) if len(text) < 4000 else text


def read_rows(path: str, format: str | None = None) -> list[dict]:
    """Raw rows of a jsonl / json (array, or {"data": [...]}) / parquet / csv file.

    Raises ``DataError`` naming the file (and line) for a missing, unreadable, empty or truncated file,
    an unknown extension, or rows that are not objects.
    """
    if not os.path.isfile(path):
        raise DataError(f"no such data file: {path!r} (set ${DATA_DIR_ENV} or pass data_dir)")
    ext = os.path.splitext(path)[1].lower()
    fmt = format or FORMATS.get(ext)
    if fmt is None:
        raise DataError(
            f"{path}: unknown data file extension {ext!r} (expected one of {', '.join(FORMATS)}, or name the "
            "format: data.train_format)"
        )
    if fmt not in FORMATS.values():
        raise DataError(f"format must be one of jsonl/json/parquet/csv, got {fmt!r} for {path!r}")
    try:
        rows = _read(path, fmt)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise DataError(f"{path}: empty data file (no rows)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: expected an object with problem/answer fields, got {type(row).__name__}")
    return rows


def _read(path: str, fmt: str) -> list:
    if fmt == "jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line, parse_int=_parse_int))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return rows
    if fmt == "json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            return []
        try:
            data = json.loads(text, parse_int=_parse_int)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        return data
    if fmt == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except pyarrow.ArrowException as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    with open(path, encoding="utf-8", newline="") as f:
        try:
            return list(csv.DictReader(f))
        except csv.Error as e:
            raise DataError(f"{path}: not a readable csv file ({e})") from None
