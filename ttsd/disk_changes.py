"""Noticing changes on disk: one watchdog set-up and one settle rule, shared by the model source
and the spool.

``observe(path, callback)`` runs a watchdog observer (inotify on Linux) that calls ``callback``
with each event's path(s) from the observer's thread. Events are only a hint: both users also look
on a timer, because events can be lost or never sent (network filesystems).

``Settle`` answers "has this thing stopped changing?": a file or folder is taken only once its
signature (sizes and mtimes) has stayed the same for ``seconds``, so a copy is never taken half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Observer:
    """A running watchdog observer; ``stop()`` ends it."""

    def __init__(self, observer: Any) -> None:
        self._observer = observer

    def stop(self) -> None:
        self._observer.stop()


def observe(path: Path, callback: Callable[[list[str]], object], *, recursive: bool) -> Observer:
    """Watch ``path`` and call ``callback(paths)`` (an event's source and, for a move, its
    destination) on the observer's thread for every event. watchdog is imported here only."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer as WatchdogObserver

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
            callback([p for p in paths if p])

    observer = WatchdogObserver()
    observer.schedule(Handler(), str(path), recursive=recursive)
    observer.daemon = True
    observer.start()
    return Observer(observer)


@dataclass
class Seen:
    signature: object
    changed_at: float  # when its contents last changed (estimated from mtimes when first seen)
    observed_at: float  # when we last saw it change


class Settle(Generic[K]):
    """Signatures of things being watched, and whether each has settled. Not thread-safe: one
    owner calls it (the source's loader thread, the spool's event loop)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.seen: dict[K, Seen] = {}

    def update(self, key: K, signature: object, now: float, *, age: float = 0.0) -> tuple[Seen, bool]:
        """Record ``key``'s current signature; returns its record and whether it changed since the
        last call (a first sighting is a change). ``age``: how long ago a first-seen thing last
        changed, when that is known (a folder already there at start-up has settled long ago)."""
        seen = self.seen.get(key)
        if seen is not None and seen.signature == signature:
            return seen, False
        changed_at = now - age if seen is None else now
        self.seen[key] = seen = Seen(signature, changed_at, now)
        return seen, True

    def settled(self, key: K, now: float) -> bool:
        seen = self.seen.get(key)
        return seen is not None and now - seen.changed_at >= self.seconds

    def forget(self, key: K) -> None:
        self.seen.pop(key, None)

    def keep_only(self, present: Iterable[K]) -> None:
        """Forget everything not in ``present`` (it went away)."""
        keep = set(present)
        for key in [k for k in self.seen if k not in keep]:
            del self.seen[key]
