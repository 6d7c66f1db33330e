"""The audit trail, ``STATE/history.jsonl``: one JSON object a line (time, voice, from, to, why, and
details such as load seconds), oldest first.

Written by appending: an event costs one ``write`` of one line and an ``fsync``, whatever the file's
size. A crash can leave at most a torn last line, which readers skip. When the file passes
``ROTATE_BYTES`` it is cut back to its newest ``KEEP_LINES`` lines (tmp + fsync + rename), so its
size stays bounded without rewriting it per event.

Read in bounded time: at start-up only the file's last ``TAIL_BYTES`` are read, and the newest
``SHOWN`` entries are kept parsed in memory for ``/v1/status``, so a request never reads the disk.

Thread-safe: the manager's threads (jobs, operator actions, request callbacks) all record here.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import math
import os
import stat
import time
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_text
from .pacing import Guard

log = logging.getLogger("ttsd.state")

SHOWN = 200  # entries kept parsed for the status page and /v1/status
KEEP_LINES = 2000  # lines kept when the file is cut back
ROTATE_BYTES = 1 << 20  # cut back once the file is larger than this
TAIL_BYTES = 256 * 1024  # read at start-up: the newest entries, never the whole of a damaged, huge file
MAX_LINE = 16 * 1024  # a longer line (not one ttsd wrote) is skipped


class AuditTrail:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = Guard()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=SHOWN)
        self._pending: list[str] = []  # lines not written yet (the disk was full)
        self._size = 0

    def load(self) -> None:
        """The newest entries from the file's tail (a missing or unreadable file starts a new trail)."""
        with self._lock:
            self._recent.clear()
            try:
                # O_NONBLOCK: a FIFO put there is opened without waiting for a writer (start-up hung)
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return
            except OSError as exc:
                log.error("%s is unreadable (%s); starting a new audit trail", self.path, exc.strerror or exc)
                return
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                self._size = st.st_size
                start = max(0, self._size - TAIL_BYTES)
                os.lseek(fd, start, os.SEEK_SET)
                data = os.read(fd, TAIL_BYTES)
            except OSError as exc:
                log.error("%s is unreadable (%s); starting a new audit trail", self.path, exc.strerror or exc)
                return
            finally:
                os.close(fd)
            lines = data.split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first one is cut by where the tail began
            for line in lines[-SHOWN:]:
                if entry := _parse(line):
                    self._recent.append(entry)

    def record(self, entry: dict[str, Any], *, write: bool = True) -> None:
        """Append ``entry`` (best effort: a full disk delays the write, never the change it records).
        ``write=False``: shown at once, written at the next ``flush`` (a swap's caller does not wait
        for the disk)."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
        line = json.dumps(entry)
        with self._lock:
            self._recent.append(json.loads(line))
            self._pending.append(line)
            if write:
                self._flush()

    def flush(self) -> None:
        """Write what ``record(..., write=False)`` left pending."""
        with self._lock:
            if self._pending:
                self._flush()

    def recent(self, count: int = SHOWN) -> list[dict[str, Any]]:
        """The newest ``count`` entries, oldest first."""
        with self._lock:
            entries = list(self._recent)
        return entries[-count:] if count else []

    def _flush(self) -> None:
        """Write the pending lines (under ``_lock``)."""
        data = ("\n".join(self._pending) + "\n").encode()
        done = 0  # bytes of ``data`` written: a disk with little room left takes part of a batch
        try:
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path, flags, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):  # a FIFO's buffer would fill and hold the trail's lock
                    raise OSError(errno.EINVAL, "not a regular file")
                self._size = st.st_size
                if self._size and not _ends_with_newline(fd, self._size):
                    self._size += os.write(fd, b"\n")  # a torn last line stays on its own line
                while done < len(data):
                    wrote = os.write(fd, data[done:])
                    if not wrote:
                        raise OSError(errno.ENOSPC, "no room left")
                    done += wrote
                os.fsync(fd)
            finally:
                self._size += done
                os.close(fd)
        except OSError as exc:
            if len(self._pending) == 1:  # logged once per outage
                log.error(
                    "cannot write %s (%s); the audit trail is kept in memory until it can",
                    self.path,
                    exc.strerror or exc,
                )
            del self._pending[: data[:done].count(b"\n")]  # written whole: not written again
            del self._pending[:-KEEP_LINES]
            return
        self._pending.clear()
        if self._size > ROTATE_BYTES:
            self._cut_back()

    def _cut_back(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(max(0, self._size - ROTATE_BYTES // 2))
                lines = handle.read().split(b"\n")[1:]
            kept = [line.decode("utf-8", "replace") for line in lines if line.strip()][-KEEP_LINES:]
            text = "\n".join(kept) + "\n"
            atomic_write_text(self.path, text)
            self._size = len(text.encode())
        except OSError as exc:
            log.error("cannot cut %s back (%s); it keeps growing until it can", self.path, exc.strerror or exc)


def _ends_with_newline(fd: int, size: int) -> bool:
    return os.pread(fd, 1, size - 1) == b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    """An entry as ttsd writes them: an object of plain values, its time, voice and versions text
    (a line edited by hand or damaged is skipped: ``/v1/status`` serves these as they are, and one
    ``NaN`` in them made the status page's JSON unreadable for browsers)."""
    if not line.strip() or len(line) > MAX_LINE:
        return None
    try:
        entry = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or not all(_plain(v) for v in entry.values()):
        return None
    texts = all(isinstance(entry.get(k, ""), str) for k in ("time", "voice", "why"))
    versions = all(isinstance(entry.get(k), (str, type(None))) for k in ("from", "to"))
    return entry if texts and versions else None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _plain(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # 1e400 reads as infinity
    return value is None or isinstance(value, (str, int, bool))
