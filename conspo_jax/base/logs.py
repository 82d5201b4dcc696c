"""The library's one logger, ``conspo_jax`` (modules log to ``logging.getLogger(__name__)`` below it).

``console()`` prints its INFO lines as the user-visible ``[conspo] message`` lines on stdout. The CLI
calls it; ``train()`` calls it too when nothing else configured logging (a plain script or notebook).
"""

from __future__ import annotations

import logging
import sys

LOGGER = "conspo_jax"


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (pytest and notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def console(level: int = logging.INFO) -> None:
    """Shows the library's messages as ``[conspo] ...`` on stdout; idempotent."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[conspo] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # the console line is the message; no second copy through root handlers
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)


def console_unless_configured() -> None:
    """``console()`` unless the application already configured logging (root or our logger)."""
    if not logging.getLogger().hasHandlers():
        console()
