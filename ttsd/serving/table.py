"""The version table: every version of every voice the manager knows, and its view of each folder.

The one place records live and change. Every read that walks the table and every change to a
record happens under the table's lock, held only for the change itself: slow work (hashing,
copying, loading, warming up) runs outside it and commits here at the end. Readers on the event
loop (``/v1/voices``, ``/v1/status``, Wyoming's describe) get consistent copies.

Lock order: the table's lock, then the serving map's. The map calls ``coming_up`` under its own
lock, so that one reads without ours (a copy CPython makes without giving up the GIL).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .pacing import Guard
from .versions import COMING_UP, Key, ModelVersion, norm


class VersionTable:
    def __init__(self) -> None:
        self._lock = Guard(threading.RLock())
        self._versions: dict[Key, ModelVersion] = {}
        self._folders: dict[Path, tuple[str, str]] = {}  # folder -> (state, reason) as the manager sees it

    @contextmanager
    def locked(self) -> Iterator[VersionTable]:
        """Hold the lock for a read-modify-write of several records (a transition). Keep it short:
        no I/O beyond the serving map inside."""
        with self._lock:
            yield self

    # -- records -------------------------------------------------------------------------------
    def get(self, name: str, version: str) -> ModelVersion | None:
        with self._lock:
            return self._versions.get((name, norm(version)))

    def by_key(self, key: Key | None) -> ModelVersion | None:
        if key is None:
            return None
        with self._lock:
            return self._versions.get(key)

    def add(self, model: ModelVersion) -> ModelVersion:
        """``model``, or the record already held under its key."""
        with self._lock:
            return self._versions.setdefault(model.key, model)

    def drop(self, model: ModelVersion) -> None:
        with self._lock:
            if self._versions.get(model.key) is model:
                del self._versions[model.key]

    def change(self, model: ModelVersion, **fields: Any) -> None:
        """Change fields of one record (the usual way to change one)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(model)}
        if unknown:  # setattr would add them silently
            raise AttributeError(f"ModelVersion has no field {', '.join(sorted(unknown))}")
        with self._lock:
            for name, value in fields.items():
                setattr(model, name, value)

    def all(self) -> list[ModelVersion]:
        with self._lock:
            return list(self._versions.values())

    def of(self, name: str) -> list[ModelVersion]:
        with self._lock:
            return [m for m in self._versions.values() if m.name == name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted({m.name for m in self._versions.values()})

    def coming_up(self) -> set[str]:
        """Voices with a version being verified, loaded or warmed up (for the map: 503, not 404)."""
        return {m.name for m in list(self._versions.values()) if m.state in COMING_UP}

    def __len__(self) -> int:
        return len(self._versions)

    # -- folders -------------------------------------------------------------------------------
    def see_folder(self, path: Path, state: str, reason: str = "") -> None:
        with self._lock:
            self._folders[path] = (state, reason)

    def folders(self) -> dict[Path, tuple[str, str]]:
        with self._lock:
            return dict(self._folders)

    def keep_folders(self, present: set[Path]) -> None:
        with self._lock:
            for path in set(self._folders) - present:
                del self._folders[path]
