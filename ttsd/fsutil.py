"""Crash-safe file writes: temporary file, fsync, rename into place, fsync the directory.

A reader (or a restart after ``kill -9``) sees either the old file or the complete new one,
never a half-written one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import BinaryIO


def own_dir(base: Path, rel: str | PurePath = ".") -> Path:
    """``base / rel``, each folder below ``base`` made 0700 where missing: a work folder in a cache
    of this process's own. A link found in the place of one is removed and a folder made there:
    nothing in a cache is followed out of it (a link planted in the downloads cache had a fetch
    write its files where the link pointed). So is a file inside the work folder (an older
    download's, where a folder is wanted now); a file directly in ``base`` (which holds other
    downloads' lock files) is an error, not removed. ``base`` itself is taken as it is."""
    path = base
    for depth, part in enumerate(p for p in PurePath(rel).parts if p not in (".", "")):
        if part == "..":
            raise ValueError(f"{rel}: not a path below {base}")
        path = path / part
        with contextlib.suppress(FileExistsError):  # (a folder made meanwhile by another process: fine)
            path.mkdir(mode=0o700)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISLNK(st.st_mode) and depth == 0:
            raise FileExistsError(errno.EEXIST, "a file stands where a download's folder goes", str(path))
        path.unlink()
        path.mkdir(mode=0o700)
    return path


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


_RENAME_NOREPLACE = 1  # linux/fs.h
_renameat2: Callable[..., int] | bool | None = False  # False: not looked up yet


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless something is at ``dst`` (``FileExistsError``): a rename
    that never replaces, for moves between folders other programs write into. Linux's
    ``renameat2(RENAME_NOREPLACE)``; where the filesystem or libc lacks it, a hard link and an
    unlink for a file, a checked rename for anything else (a race then replaces)."""
    global _renameat2
    if _renameat2 is False:
        _renameat2 = _libc_renameat2()
    if callable(_renameat2):
        at_fdcwd = -100
        if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # (the filesystem cannot)
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # a directory, or a filesystem without hard links
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


SHARED = 0o666  # mode for outputs meant for other users: the umask decides, as for open()
