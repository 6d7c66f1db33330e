"""Watches the models dir and says when to look again. It never loads anything.

A watchdog observer (inotify on Linux) reports changes anywhere under the models dir (a slow
``cp -r`` fires events inside the new folder); events are debounced, and a periodic tick catches
what the observer misses (lost events, network filesystems that send none). The callback is the
daemon's "reconcile now" and is called from the observer's or the timer's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ttsd.reloader")


def is_candidate(path: Path, models_dir: Path) -> bool:
    """Top-level folders only; dot-folders and ``*.partial`` are someone's work in progress."""
    try:
        top = path.relative_to(models_dir).parts[0]
    except (ValueError, IndexError):
        return False
    return not top.startswith(".") and not top.endswith(".partial")


class ModelWatcher:
    def __init__(self, models_dir: Path, on_change: Callable[[], None], *, debounce: float = 0.5,
                 interval: float = 5.0) -> None:
        self.models_dir = models_dir
        self.on_change = on_change
        self.debounce = debounce
        self.interval = interval
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = None
        self._ticker = threading.Thread(target=self._tick, name="ttsd-rescan", daemon=True)

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = [event.src_path, getattr(event, "dest_path", "") or ""]
                if any(p and is_candidate(Path(str(p)), watcher.models_dir) for p in paths):
                    watcher.poke()

        observer = Observer()
        observer.schedule(Handler(), str(self.models_dir), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._ticker.start()

    def poke(self) -> None:
        """Something changed: call back once things have been quiet for ``debounce`` seconds."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        if not self._stop.is_set():
            self.on_change()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.on_change()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
