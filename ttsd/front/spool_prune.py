"""Old answers leave the spool: files in ``out/``, ``done/`` and ``failed/`` that have been there
longer than ``--spool-keep-days`` are removed, so a spool left alone for months does not fill
its disk with the daemon's own answers (``0`` keeps them forever).

A file's age is its change time (``st_ctime``): set when it was written or moved into that
folder, and not something a writer can set back or forward as it can a modification time. A file
the running daemon wrote is never taken as older than its uptime (``written_since``): a box
without a real-time clock starts in the past, and NTP moves it on later. The answers of IDs being
served stay, and each file's age is looked at again just before it goes (an ID served anew).

Removal keeps the spool's promises to its readers. In ``out/``, ``ID.json`` marks a complete
answer: it goes first, and ``ID.<format>`` goes only once its ``ID.json`` is gone (the audio,
written first, is always a little older). In ``failed/`` a request never sits without its
reason: the request goes first, and ``STEM.error.json`` only once no request of that stem is
left beside it. Dot-files (temp files being written) and folders are never touched, and each
folder is opened without following a link, its files removed through that open folder, so a
folder swapped for a link never has another folder's files removed. Runs on an executor thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FOLDERS = ("out", "done", "failed")
DAY = 86400.0
REASON = ".error.json"


def interval(keep_seconds: float) -> float:
    """How often to look: a twenty-fourth of the time kept (an hour for a day or more), at least
    every second."""
    return min(3600.0, max(1.0, keep_seconds / 24))


def age(seconds: float) -> str:
    """``7 days``, ``12 h``, ``30 s``."""
    if seconds >= DAY:
        days = seconds / DAY
        return f"{days:g} day{'s' if days != 1 else ''}"
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.3g} s"


def kept(seconds: float) -> str:
    """How long answers are kept, for the start-up line."""
    return f"answers kept {age(seconds)}" if seconds else "answers kept for ever"


@dataclass
class Pruned:
    """Files removed, per folder, and folders that could not be looked at (with why)."""

    removed: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.removed.values())


def prune(
    dirs: dict[str, Path],
    keep_seconds: float,
    now: float,
    *,
    busy: frozenset[str] = frozenset(),
    written_since: float | None = None,
    stop: threading.Event | None = None,
) -> Pruned:
    """Remove the files of ``out/``, ``done/`` and ``failed/`` (of ``dirs``, the spool's folders)
    whose change time is before ``now - keep_seconds``, and before ``written_since`` when given
    (files written since then are younger than the daemon's uptime, whatever the clock said
    when they were written). ``out/`` files of the IDs in ``busy`` (being served) stay. ``stop``,
    once set, ends the removal after the current file."""
    cutoff = now - keep_seconds if written_since is None else min(now - keep_seconds, written_since)
    pruned = Pruned()
    for name in FOLDERS:
        if stop is not None and stop.is_set():
            break
        try:
            fd = os.open(dirs[name], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            pruned.problems.append(f"{name}/: {_why(dirs[name], exc)}")
            continue
        try:
            files = _listing(fd)
            if name == "out":
                files = {file: changed for file, changed in files.items() if _stem(file) not in busy}
            pruned.removed[name] = _prune_folder(fd, name, files, _Removal(cutoff, stop), pruned.problems)
        except OSError as exc:
            pruned.problems.append(f"{name}/: {exc.strerror or exc}")
        finally:
            os.close(fd)
    return pruned


def _why(path: Path, exc: OSError) -> str:
    """Why a folder could not be opened: a link (ELOOP, or ENOTDIR with O_DIRECTORY), or the error."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
        return "a symbolic link"
    return exc.strerror or str(exc)


def _listing(fd: int) -> dict[str, float]:
    """Every entry of the folder ``fd`` that is no folder and no dot-file, with its change time."""
    files: dict[str, float] = {}
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    files[entry.name] = st.st_ctime
    return files


@dataclass(frozen=True)
class _Removal:
    cutoff: float  # files changed before this go
    stop: threading.Event | None  # set: no more removals


def _prune_folder(fd: int, folder: str, files: dict[str, float], removal: _Removal, problems: list[str]) -> int:
    old = [name for name, changed in files.items() if changed < removal.cutoff]  # in the listing's order
    if folder == "out":  # ID.json marks a complete answer: it goes before the audio
        first = [name for name in old if name.endswith(".json")]
    elif folder == "failed":  # a request never stays without its reason: the request goes first
        first = [name for name in old if not name.endswith(REASON)]
    else:
        first = old
    stuck: dict[str, str] = {}
    removed = _remove(fd, first, removal, stuck)
    taken = set(first)
    remaining, rest = set(files) - removed, [name for name in old if name not in taken]
    if folder == "out":
        then = [name for name in rest if _stem(name) + ".json" not in remaining]
    elif folder == "failed":
        requests = {_stem(name) for name in remaining if not name.endswith(REASON)}
        then = [name for name in rest if name.removesuffix(REASON) not in requests]
    else:
        then = []
    removed |= _remove(fd, then, removal, stuck)
    for why in sorted(set(stuck.values())):  # said once while it lasts: no count, no name, that change
        problems.append(f"{folder}/: old files cannot be removed ({why})")
    return len(removed)


def _stem(name: str) -> str:
    """``ID`` of ``ID.wav``, ``ID.txt``, ``NAME-hash.request``: the name without its last suffix."""
    return name.rsplit(".", 1)[0]


def _remove(fd: int, names: Iterable[str], removal: _Removal, stuck: dict[str, str]) -> set[str]:
    """Remove ``names`` from the folder ``fd`` (in the listing's order: sorted, ext4 took ever
    longer per file), each still older than the cut-off when it goes (a name listed old may have
    been written anew since: an ID served again once its old ``ID.json`` went); those that
    cannot be go into ``stuck``, with why."""
    removed = set()
    for name in names:
        if removal.stop is not None and removal.stop.is_set():
            break
        try:
            if os.stat(name, dir_fd=fd, follow_symlinks=False).st_ctime >= removal.cutoff:
                continue
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            removed.add(name)  # gone already: as good as removed
        except OSError as exc:
            stuck[name] = exc.strerror or str(exc)
        else:
            removed.add(name)
    return removed
