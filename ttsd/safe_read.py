"""Reading a model folder's files without being led astray: never through a link, never past a
file's listed size, never more than ``MAX_ENTRIES`` entries. What ``manifest`` checks folders
with, and what the store and the signature check read listed files through. Plain I/O only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .errors import Problem, VerifyError

MAX_ENTRIES = 1000  # files and folders a model folder may hold (a VITS folder has fewer than 10)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def walk(folder: Path) -> tuple[list[str], list[Problem]]:
    """Relative paths of regular files under ``folder``, and a problem for anything that is not
    one. Never follows a link; more than ``MAX_ENTRIES`` entries is a ``VerifyError`` found
    without reading the rest (a folder of 100,000 files costs what one of 1,000 does)."""
    files: list[str] = []
    unsafe: list[Problem] = []
    stack, seen = [folder], 0
    while stack:
        base = stack.pop()
        with os.scandir(base) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_ENTRIES:
                    raise VerifyError(
                        f"{folder}: more than {MAX_ENTRIES} files and folders",
                        [Problem("too_many", f"more than {MAX_ENTRIES}")],
                    )
                rel = Path(entry.path).relative_to(folder).as_posix()
                if entry.is_symlink():
                    unsafe.append(Problem("unsafe", rel, "symlink"))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(rel)
                else:
                    unsafe.append(Problem("unsafe", rel, "not a regular file"))
    return sorted(files), sorted(unsafe, key=lambda p: p.path)


_READ = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_regular(name: str | Path, dir_fd: int | None = None) -> int:
    """``name`` opened for reading without following a link or blocking, refused unless a regular
    file; closed on any failure after the open (a load called off included: nothing runs between
    the open and the ``try`` that could stop it there)."""
    fd = os.open(name, _READ | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_listed(path: Path) -> int:
    """A listed file opened for reading without following a link (a file swapped for a link or a
    device after the walk cannot make a check follow it); the caller closes the descriptor."""
    return _open_regular(path)


def open_beneath(root: int, rel: str) -> int:
    """``rel`` (a manifest path: no ``..``, not absolute) opened beneath the directory ``root``
    without following a link at any step, so nothing outside the folder can be read through a
    folder or file swapped for a link; ``ELOOP`` if one is met. The caller closes it."""
    parts = rel.split("/")
    opened = [-1] * (len(parts) - 1)  # stored without a call, so that each is closed below
    fd = root
    try:
        for index, part in enumerate(parts[:-1]):
            opened[index] = fd = os.open(part, _READ | os.O_DIRECTORY, dir_fd=fd)
        return _open_regular(parts[-1], dir_fd=fd)
    finally:
        for directory in opened:
            if directory >= 0:
                os.close(directory)


def hash_fd(fd: int, size: int, sink: Callable[[bytes], object] | None = None) -> tuple[int, str]:
    """(size, sha256) of an open listed file, read no further than one byte past ``size`` (a file
    that grows cannot make the check read forever). ``sink`` receives every byte hashed: the store
    writes its copy from exactly the bytes it checks."""
    actual = os.fstat(fd).st_size
    if actual != size:
        return actual, ""
    digest, left = hashlib.sha256(), size + 1
    while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
        digest.update(chunk)
        if sink is not None:
            sink(chunk)
        left -= len(chunk)
    return size + 1 - left, digest.hexdigest()


def hash_listed(path: Path, size: int) -> tuple[int, str]:
    """``hash_fd`` of the listed file at ``path`` (opened with ``open_listed``)."""
    fd = open_listed(path)
    try:
        return hash_fd(fd, size)
    finally:
        os.close(fd)


def read_small(path: Path, limit: int, wait: float = 30.0) -> bytes:
    """A small file the operator named (a token, a private key), whole: through a link (they
    named it), a regular file or a pipe (``--key <(gpg -d key.pem.gpg)``), at most ``limit`` bytes.
    A FIFO with no writer reads as empty; a pipe that sends nothing for ``wait`` seconds and a
    device are refused (waiting on a FIFO hung the command; reading ``/dev/zero`` ran out of memory).
    ``OSError`` with a readable ``strerror`` otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise OSError(errno.EINVAL, "not a regular file or a pipe")
        data = b""
        deadline = time.monotonic() + wait
        while len(data) <= limit:
            try:
                chunk = os.read(fd, limit + 1 - len(data))  # b"": the end, or a FIFO with no writer
            except BlockingIOError:  # a pipe whose writer has not written yet
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise OSError(errno.ETIMEDOUT, f"nothing to read for {wait:.0f} s") from None
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data
