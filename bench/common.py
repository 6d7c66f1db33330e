"""What the daemon benches (``busy.py``, ``hotswap.py``, ``serve.py``, ``soak.py``, ``voices.py``) share
beyond the daemon harness itself (``ttsd.testing``: ``Daemon``, ``request``, ``wait_for``, ``pct``,
``rss_mb``): where the voice cache is, the command line to print, and how a bench ends a daemon."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

from ttsd.testing import Daemon


def cache_dir(given: Path | None = None) -> Path:
    """``--cache`` if given, else ``$TTSD_CACHE``, else /tmp/ttsd-bench-cache: the built-in voice is
    converted there once (~5 s) and reused by every bench run."""
    return given or Path(os.environ.get("TTSD_CACHE") or Path(tempfile.gettempdir()) / "ttsd-bench-cache")


def command_line() -> str:
    """This run's command, as the results print it: a table says how it was made."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def finish(daemon: Daemon, grace: float = 60.0) -> tuple[int, str]:
    """SIGTERM, a daemon still up after ``grace`` s killed (its code then says so): (exit code, log).
    Removes the daemon's temp dirs: a bench's measures are taken, and its voices take GBs of disk."""
    try:
        return daemon.stop(grace=grace, raise_on_timeout=False), daemon.logs()
    finally:
        daemon.cleanup()
