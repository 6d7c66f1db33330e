"""The source: which model folders exist and what each is ready for. It only looks at the disk.

TF Serving's split: a *source* says which versions exist; the manager decides what to load. A
source hands the manager ``Candidate``s, each with a verdict:

* ``READY``: the folder is complete (manifest, file list, every size); its bytes are hashed once,
  when the manager copies it into the store;
* ``INCOMPLETE``: files missing or short, or hidden temp files: a copy still in progress. Offered
  again each time it changes, until it is complete or stays unchanged past ``incomplete_timeout``,
  when it becomes ``REFUSED`` with the reason;
* ``REFUSED``: what is there cannot serve (bad manifest, extra, unsafe or pickle files), until it
  changes.

``LocalFolderSource`` watches a models dir. A folder is looked at once its contents (names, sizes,
mtimes) have not changed for ``settle`` seconds, so a file-by-file copy is never judged half-way,
and each verdict is handed over once per change. A second kind of source (a registry, a mirror) is
one more class with the same five methods (``Source``). Called from the manager's loader thread only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Protocol

from ..disk_changes import Settle
from ..errors import ManifestError, TtsdError, VerifyError, is_system_oserror
from ..manifest import (
    MAX_ENTRIES,
    Manifest,
    inspect_folder,
    problems_error,
    read_manifest,
)
from ..models_dir import candidate_folders

log = logging.getLogger("ttsd.source")


class Verdict(str, Enum):
    READY = "ready"
    INCOMPLETE = "incomplete"
    REFUSED = "refused"


@dataclass(frozen=True)
class Candidate:
    """One folder and the source's verdict on it. ``manifest`` is there whenever it could be read
    (an incomplete or refused folder may still say which version it is)."""

    path: Path
    verdict: Verdict
    manifest: Manifest | None = None
    reason: str = ""
    fingerprint: str = ""  # the folder as it was judged (``fingerprint``), "" when not known


class Source(Protocol):
    """What the manager needs of a source of model folders."""

    def scan(self) -> list[Candidate]:
        """Candidates whose verdict is new since the last scan (each change is handed over once)."""

    def folders(self) -> list[Candidate]:
        """Current folders that are not ready: incomplete or refused, with the reason."""

    def present(self) -> set[Path]:
        """Every folder the source holds now, whatever its verdict."""

    def waiting(self) -> bool:
        """Whether a folder is settling or incomplete (scan again soon, not at the next tick)."""

    def again(self, path: Path) -> None:
        """The manager could not act on ``path`` for the box's reasons (an I/O error, a full
        disk): hand it over again at the next scan."""


def signature(folder: Path, limit: int = MAX_ENTRIES) -> tuple[object, ...]:
    """Cheap change detector: every entry's relative name, size and mtime, in directory order.
    At most ``limit`` + 1 entries are looked at: a folder with more is refused anyway (see
    ``manifest.MAX_ENTRIES``), and rescanning it must stay cheap (a 100,000-file folder took
    0.66 s of CPU per rescan when every entry was stat'ed)."""
    if folder.is_symlink():  # refused for being a link, whatever it points to: never walked
        try:
            st = os.lstat(folder)
        except OSError:
            return ("unreadable", time.time())
        with contextlib.suppress(OSError):
            return (f"symlink to {os.readlink(folder)}", st.st_size, st.st_mtime_ns)
        return ("symlink", st.st_size, st.st_mtime_ns)
    entries: list[object] = []
    stack, seen = [folder], 0
    try:
        while stack and seen <= limit:
            base = stack.pop()
            with os.scandir(base) as it:
                for entry in it:
                    seen += 1
                    if seen > limit + 1:
                        break
                    st = entry.stat(follow_symlinks=False)
                    entries.extend((os.path.relpath(entry.path, folder), st.st_size, st.st_mtime_ns))
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
    except OSError:
        return ("unreadable", time.time())
    return tuple(entries)


def fingerprint(folder: Path) -> str:
    """``signature`` as a short digest (names, sizes, mtimes; order-independent): what a folder
    refused for its files is compared by, to be judged again only once it changed. "" when it
    cannot be read (compares unequal to any)."""
    return _digest(signature(folder))


def _digest(sig: tuple[object, ...]) -> str:
    if len(sig) % 3:  # ("unreadable", time): not a folder's entries
        return ""
    triples = sorted(zip(sig[0::3], sig[1::3], sig[2::3], strict=True), key=repr)
    return hashlib.sha256(repr(triples).encode()).hexdigest()[:32]


def looks_incomplete(exc: TtsdError) -> bool:
    """A failure a copy still in progress would cause: no manifest yet, files missing or short,
    or hidden temp files (rsync writes ``.name.XXXXXX`` and renames)."""
    if isinstance(exc, ManifestError):
        return "no ttsd.json" in str(exc)
    return isinstance(exc, VerifyError) and exc.looks_incomplete()


class LocalFolderSource:
    """The folders of a models dir (see the module docstring)."""

    def __init__(self, models_dir: Path, *, settle: float = 1.0, incomplete_timeout: float = 60.0) -> None:
        self.models_dir = models_dir
        self.incomplete_timeout = incomplete_timeout
        self._settle: Settle[Path] = Settle(settle)
        self._verdicts: dict[Path, Candidate] = {}
        self._waiting = False

    def scan(self, now: float | None = None) -> list[Candidate]:
        now = time.monotonic() if now is None else now
        found: list[Candidate] = []
        waiting = False
        present = candidate_folders(self.models_dir)
        for path in present:
            sig = signature(path)
            age = max(0.0, time.time() - _newest_mtime(sig))  # a folder there at start-up settled long ago
            seen, changed = self._settle.update(path, sig, now, age=age)
            if changed:
                self._verdicts.pop(path, None)
            if not self._settle.settled(path, now):
                waiting = True
                continue
            held = self._verdicts.get(path)
            timed_out = now - seen.observed_at >= self.incomplete_timeout
            if held is not None:
                if held.verdict is not Verdict.INCOMPLETE:
                    continue  # handed over for this content already
                waiting = True  # may still time out
                if not timed_out:
                    continue
            candidate = self._judge(path, timed_out)
            if candidate is None:
                continue
            candidate = replace(candidate, fingerprint=_digest(sig))  # as judged: a change after it counts
            self._verdicts[path] = candidate
            waiting = waiting or candidate.verdict is Verdict.INCOMPLETE
            found.append(candidate)
        self._settle.keep_only(present)
        for gone in set(self._verdicts) - set(present):
            del self._verdicts[gone]
        self._waiting = waiting
        return found

    def _judge(self, path: Path, timed_out: bool) -> Candidate | None:
        """The verdict on one settled folder; None when it could not be judged for the box's
        reasons (it is looked at again at the next scan)."""
        manifest: Manifest | None = None
        try:
            manifest, problems = inspect_folder(path)
            if problems:
                raise problems_error(path, problems)
        except TtsdError as exc:
            if manifest is None and not isinstance(exc, ManifestError):
                manifest = _manifest_or_none(path)  # e.g. too many files: still say which version it is
            if looks_incomplete(exc) and not timed_out:
                return Candidate(path, Verdict.INCOMPLETE, manifest, str(exc))
            reason = str(exc)
            if looks_incomplete(exc):
                reason = f"still incomplete after {self.incomplete_timeout:.0f} s unchanged: {exc}"
            log.warning("refused %s: %s", path, reason)
            return Candidate(path, Verdict.REFUSED, manifest, reason)
        except Exception as exc:  # e.g. an I/O error, or a folder deleted while it was looked at
            if is_system_oserror(exc) or isinstance(exc, (FileNotFoundError, MemoryError)):
                log.error("checking %s failed (%s); it is looked at again at the next scan", path, exc)
                self.again(path)
                return None
            # a bug, or input no check foresaw: the folder (not the version it may name) is refused
            # until it changes, logged once
            log.exception("checking %s failed; refused until it changes", path)
            return Candidate(path, Verdict.REFUSED, None, f"could not be checked: {type(exc).__name__}: {exc}"[:500])
        return Candidate(path, Verdict.READY, manifest)

    def folders(self) -> list[Candidate]:
        return [c for c in self._verdicts.values() if c.verdict is not Verdict.READY]

    def present(self) -> set[Path]:
        return set(self._settle.seen)

    def waiting(self) -> bool:
        return self._waiting

    def again(self, path: Path) -> None:
        self._settle.forget(path)
        self._verdicts.pop(path, None)
        self._waiting = True


def _manifest_or_none(path: Path) -> Manifest | None:
    try:
        return read_manifest(path)
    except TtsdError:
        return None


def _newest_mtime(sig: tuple[object, ...]) -> float:
    mtimes = [v for i, v in enumerate(sig) if i % 3 == 2 and isinstance(v, int)]
    return max(mtimes) / 1e9 if mtimes else time.time()
