"""Crash-safe file writes: temporary file, fsync, rename into place, fsync the directory.

A reader (or a restart after ``kill -9``) sees either the old file or the complete new one,
never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux's /proc; else set and restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(
    path: Path, write: Callable[[BinaryIO], None], mode: int | None = None, *, exclusive: bool = False
) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, then publish it as ``path``.

    The file is private (0600, as ``mkstemp`` makes it) unless ``mode`` is given: outputs that
    other users or groups consume (``ttsd say -o``, the spool's ``out/``) pass 0o666 and get the
    umask applied, as a plain ``open()`` would.

    ``exclusive`` publishes only where nothing is at ``path`` yet (a hard link, which unlike a
    rename never replaces; ``FileExistsError`` otherwise): of two processes creating the same
    file at once, the first wins whole and the second can read what it wrote."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, *, exclusive: bool = False) -> None:
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic_write(path, write, mode, exclusive=exclusive)


def atomic_write_text(path: Path, text: str, mode: int | None = None, *, exclusive: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode, exclusive=exclusive)


SHARED = 0o666  # mode for outputs meant for other users: the umask decides, as for open()
