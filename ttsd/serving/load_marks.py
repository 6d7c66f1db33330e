"""Loads the daemon did not live through. A load that runs the box out of memory may not get
torch's error: the kernel's OOM killer ends the process, systemd starts it again, and the same
upgrade is tried again, killing it again, until the unit's start limit leaves the box with no
daemon at all. So each load is written down (``loading.json`` in the state dir) before it
begins and struck off when it ends; one found there at start-up died with the process. Such
deaths count as loads in a row that ran out of memory (``ModelVersion.short_of_memory``): after
``MEMORY_TRIES`` of them a version waits for SIGHUP, ``ttsd activate`` or a changed folder while
another version of its voice serves, as it does after torch's own out-of-memory errors.

Best effort: a state dir that cannot take the file costs the count, never the load. The file is
ttsd's own but read as hostile (size, shape, types); a damaged one is ignored.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from ..fsutil import atomic_write_text
from ..safe_read import read_small
from .versions import Key, ModelVersion, norm

log = logging.getLogger("ttsd.manager")

MAX_BYTES = 64 * 1024


class LoadMarks:
    def __init__(self, root: Path) -> None:
        self.path = root / "loading.json"
        self._lock = threading.Lock()
        self._marks: dict[str, dict[str, object]] = {}  # "name/version": {"content", "tries"}
        self._died: dict[Key, tuple[str, int]] = {}  # read at start-up: (content, tries)
        self._warned = False

    def read(self) -> None:
        """At start-up, before any load: the loads the last process did not live through."""
        self._died = {}
        try:
            if self.path.is_symlink():
                raise ValueError("not a regular file")
            data = json.loads(read_small(self.path, MAX_BYTES, wait=0.0))
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("%s is damaged (%s): the loads it recorded are not counted", self.path, exc)
            return
        for key, mark in data.items() if isinstance(data, dict) else ():
            name, _, version = key.rpartition("/")
            content, tries = (mark.get("content"), mark.get("tries")) if isinstance(mark, dict) else (None, None)
            if name and version and isinstance(content, str) and type(tries) is int and 0 < tries < 1000:
                self._died[(name, norm(version))] = (content, tries)
                log.warning(
                    "%s %s: the daemon stopped while loading it (killed: out of memory?); %d such load(s) in a row",
                    name,
                    version,
                    tries,
                )

    def died(self, model: ModelVersion) -> int:
        """Loads in a row of ``model`` that the process did not live through (0 for another
        content than the one that was loading: its folder changed)."""
        content, tries = self._died.pop(model.key, ("", 0))
        return tries if content and content == model.content else 0

    def begin(self, model: ModelVersion) -> None:
        """Before ``model`` loads: found at start-up, this load died with the process."""
        with self._lock:
            self._marks[f"{model.name}/{model.version}"] = {
                "content": model.content,
                "tries": model.short_of_memory + 1,
            }
            self._write()

    def end(self, model: ModelVersion) -> None:
        """The load is over, whatever its outcome (the process lived through it)."""
        with self._lock:
            if self._marks.pop(f"{model.name}/{model.version}", None) is not None:
                self._write()

    def clear(self) -> None:
        """An orderly stop: a load it cut short did not kill the process."""
        with self._lock:
            self._marks.clear()
            self._write()

    def _write(self) -> None:
        try:
            if self._marks:
                atomic_write_text(self.path, json.dumps(self._marks, sort_keys=True))
            else:
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot record loads in %s (%s): a load that kills the daemon is not counted", self.path, exc
                )
