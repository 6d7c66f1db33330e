"""Logging to wherever the daemon's stderr goes, in the form that place reads best:

* a terminal: rich, with colours and times;
* journald (systemd sets ``JOURNAL_STREAM`` to the device and inode of the stream it gave the
  service, which is how a process tells journald from a pipe): each line starts with its syslog
  priority, ``<4>`` for a warning, so ``journalctl -p warning`` picks out refusals, and carries no
  time (journald adds its own);
* anything else (a file, ``docker logs``, a pipe): one line per record with an ISO 8601 time.

``ttsd.access`` is the HTTP access log: off unless ``--access-log`` turns it on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from typing import IO

ACCESS = "ttsd.access"
# %a peer (empty on the Unix socket), %r request line, %s status, %b body bytes, %Tf seconds taken
ACCESS_FORMAT = '%a "%r" %s %b %Tf'
# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" at the start of a line
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        # a multi-line message (a traceback) keeps its priority on every line journald splits off
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines() or [""])


class TimedFormatter(logging.Formatter):
    """Each record with its local time, milliseconds and UTC offset: 2026-12-05T12:03:23.123+0100."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        when = datetime.fromtimestamp(record.created).astimezone()
        return f"{when:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}{when:%z}"


class OneLine(logging.Filter):
    """Every record is one line of printable text: a line break, a terminal escape or another
    control character in what it names (a folder name in the models dir, a mirror's words) is
    written escaped (``\\n``, ``\\x1b``), so no one who can name a file can forge a log line
    or drive the reader's terminal. A traceback (``exc_info``) is added after this, as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: logging's own handler says so, as before, not the caller
            return True
        if not message.isprintable():
            record.msg = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
            record.args = None
        return True


def is_journal(stream: IO[str]) -> bool:
    """Whether ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM=dev:inode``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def configure(level: str = "info", access_log: bool = False, stream: IO[str] | None = None) -> None:
    """Log records at ``level`` and above to ``stream`` (stderr) in the form its reader expects."""
    stream = stream if stream is not None else sys.stderr
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if stream.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    elif is_journal(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(TimedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(OneLine())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "watchdog", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger(ACCESS).setLevel(logging.INFO if access_log else logging.CRITICAL + 1)


class Throttle:
    """Log lines about misbehaving clients, which need no authentication to make: the first
    ``burst`` at their level, then at most one a minute (saying how many were left out), the rest
    at debug. A flood of bad connections is a few lines, not a full disk."""

    def __init__(self, log: logging.Logger, burst: int = 5, every: float = 60.0) -> None:
        self.log, self.burst, self.every = log, burst, every
        self.count = 0
        self._quiet = 0  # left out since the last line
        self._last = -float("inf")

    def __call__(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.burst or now - self._last >= self.every:
            self._last = now
            if self._quiet:
                message += " (and %d more like it since, logged at debug)"
                args = (*args, self._quiet)
            self._quiet = 0
            self.log.log(level, message, *args, exc_info=exc_info)
        else:
            self._quiet += 1
            self.log.debug(message, *args, exc_info=exc_info)
