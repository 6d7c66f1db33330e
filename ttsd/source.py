"""The source: which model folders in the models dir are ready to be checked.

It only looks at the disk. A folder is offered once its contents (names, sizes, mtimes) have not
changed for ``settle`` seconds, so a file-by-file copy is not checked half-way; a folder whose
check failed only because files are still missing or short is *incomplete*, and is offered again
each time it changes, until it verifies or stays unchanged past ``incomplete_timeout`` (then the
manager refuses it with the reason). Called from the manager's loader thread only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError, TtsdError, VerifyError
from .manifest import MAX_ENTRIES


@dataclass
class Folder:
    path: Path
    signature: tuple[object, ...] = ()
    changed_at: float = 0.0  # when its contents last changed (from mtimes, or when we saw it change)
    observed_at: float = 0.0  # when we last saw it change: the incomplete timeout counts from here
    settled: bool = False  # dealt with (verified, known, or refused) for this signature
    state: str = "new"  # new | incomplete | refused | known
    reason: str = ""
    voice: str | None = None
    version: str | None = None


def signature(folder: Path, limit: int = MAX_ENTRIES) -> tuple[object, ...]:
    """Cheap change detector: every entry's relative name, size and mtime, in directory order.
    At most ``limit`` + 1 entries are looked at: a folder with more is refused anyway (see
    ``manifest.MAX_ENTRIES``), and rescanning it must stay cheap (a 100,000-file folder took
    0.66 s of CPU per rescan when every entry was stat'ed)."""
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


def looks_incomplete(exc: TtsdError) -> bool:
    """A failure a copy still in progress would cause: no manifest yet, files missing or short,
    or hidden temp files (rsync writes ``.name.XXXXXX`` and renames)."""
    if isinstance(exc, ManifestError):
        return "no ttsd.json" in str(exc)
    return isinstance(exc, VerifyError) and exc.looks_incomplete()


@dataclass
class Source:
    models_dir: Path
    settle: float = 1.0
    incomplete_timeout: float = 60.0
    folders: dict[Path, Folder] = field(default_factory=dict)

    def ready(self, now: float | None = None) -> tuple[list[Folder], bool]:
        """Folders to check now, and whether any is still settling (so look again soon)."""
        now = time.monotonic() if now is None else now
        ready, waiting = [], False
        present = set()
        if self.models_dir.is_dir():
            for path in sorted(self.models_dir.iterdir()):
                if path.name.startswith(".") or path.name.endswith(".partial") or not path.is_dir():
                    continue
                present.add(path)
                folder = self.folders.setdefault(path, Folder(path))
                sig = signature(path)
                if sig != folder.signature:
                    # Files already old when first seen (a folder present at start-up) are settled.
                    age = max(0.0, time.time() - _newest_mtime(sig)) if not folder.signature else 0.0
                    folder.signature, folder.settled = sig, False
                    folder.changed_at, folder.observed_at = now - age, now
                if folder.settled:
                    if folder.state == "incomplete":
                        waiting = True  # may still time out
                        if self.timed_out(folder, now):
                            folder.settled = False
                            ready.append(folder)
                    continue
                if now - folder.changed_at < self.settle:
                    waiting = True
                    continue
                ready.append(folder)
        for gone in set(self.folders) - present:
            del self.folders[gone]
        return ready, waiting

    def timed_out(self, folder: Folder, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - folder.observed_at >= self.incomplete_timeout


def _newest_mtime(sig: tuple[object, ...]) -> float:
    mtimes = [v for i, v in enumerate(sig) if i % 3 == 2 and isinstance(v, int)]
    return max(mtimes) / 1e9 if mtimes else time.time()
