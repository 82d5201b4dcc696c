"""Loading experiment config modules (big_vision style) with one clear error for bad input.

A config module defines ``get_config(arg=None) -> ml_collections.ConfigDict``. It is selected as
``--config path/to/module.py[:arg]`` and overridden with ``--config.a.b=value``; the parsing itself is
ml_collections' ``config_flags``. This module adds what a researcher needs when something is wrong:
the offending key or value named in one line (``UsageError``), which the CLI turns into exit code 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags


class UsageError(ValueError):
    """Bad user input (config key, value, path). The CLI prints it as one line and exits with 2."""


def load_config_module(spec: str) -> ml_collections.ConfigDict:
    """Builds the ConfigDict of ``path.py[:arg]`` without any command-line overrides."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UsageError(f"--config: no such config file {path!r}")
    name = "conspo_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--config: {path!r} is not a Python module (expected path/to/config.py)")
    module = importlib.util.module_from_spec(module_spec)
    # A config module is user code: whatever goes wrong in it is one line naming the module, never a
    # traceback from deep inside the import machinery.
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UsageError(f"--config: {path}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - reported as one line, see above
        raise UsageError(f"--config: {path} failed to import: {_describe(e)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"--config: {path!r} defines no get_config(arg)")
    call = f"{path}:get_config({arg!r})" if arg else f"{path}:get_config()"
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - e.g. an unknown :arg; one line naming the module
        raise UsageError(f"--config: {call} failed: {_describe(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"--config: {call} returned {type(config).__name__}, expected an ml_collections.ConfigDict")
    return config


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line (a multi-line message keeps its first line)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _override_keys(argv):
    for a in argv:
        if a.startswith("--config."):
            yield a[len("--config.") :].split("=", 1)[0], a


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node = node[part]
        else:
            return False
    return True


def parse_command_line(argv, define_flags) -> flags.FlagValues:
    """Parses ``argv`` (argv[0] is the program) into a fresh FlagValues.

    ``define_flags(flag_values)`` defines the command's own flags; ``--config`` is always defined.
    Any problem raises ``UsageError`` naming the flag, key or value.
    """
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config module path.py[:arg].", flag_values=fv, lock_config=True, sys_argv=list(argv)
    )
    define_flags(fv)
    config_spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_spec is None and "--config" in argv[:-1]:
        config_spec = argv[argv.index("--config") + 1]
    if config_spec is not None:
        base = load_config_module(config_spec)  # fails early and clearly on a missing file
        for key, arg in _override_keys(argv):
            if not _has_key(base, key):
                raise UsageError(f"unknown config key {key!r} (from {arg})")
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(str(e).replace("flag --config.", "--config.")) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"bad config override: {e}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected argument {rest[1]!r}")
    if config_spec is None:
        raise UsageError("--config is required, e.g. --config experiments/arith_tiny.py")
    return fv


def require(cond: bool, message: str) -> None:
    """Raises UsageError(message) unless cond; for config validation."""
    if not cond:
        raise UsageError(message)


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
