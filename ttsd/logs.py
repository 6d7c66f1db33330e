"""Logging: rich on a terminal, plain one-line records otherwise (journald adds its own time)."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "info") -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "watchdog", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
