"""The watcher: the one thing that decides when the models dir is looked at again. It never loads.

Three reasons to look, one timer: a file event under a candidate folder (debounced: a slow
``cp -r`` fires many), ``soon()`` when the last look found a folder still settling or incomplete
(the daemon asks after each reconcile), and the periodic ``interval`` that catches what events
miss (lost events, network filesystems that send none). ``poke()`` (SIGHUP) looks at once. The
callback is the daemon's "reconcile now"; it is called from the watcher's own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .disk_changes import Observer, observe
from .models_dir import is_under_candidate

log = logging.getLogger("ttsd.reloader")


class ModelWatcher:
    def __init__(
        self, models_dir: Path, on_change: Callable[[], None], *, debounce: float = 0.5, interval: float = 5.0
    ) -> None:
        self.models_dir = models_dir
        self.on_change = on_change
        self.debounce = debounce
        self.interval = interval
        self._cond = threading.Condition()
        self._event_due: float | None = None  # events, debounced: each pushes this back
        self._soon_due: float | None = None  # asked for by the daemon: never pushed back by events
        self._stopped = False
        self._observer: Observer | None = None
        self._thread = threading.Thread(target=self._run, name="ttsd-rescan", daemon=True)

    def start(self) -> None:
        def changed(paths: list[str]) -> None:
            if any(is_under_candidate(Path(p), self.models_dir) for p in paths):
                self.poke(self.debounce)

        self._observer = observe(self.models_dir, changed, recursive=True)
        self._thread.start()

    def poke(self, delay: float = 0.0) -> None:
        """Look in ``delay`` seconds; a later poke before then pushes the look back (debounce)."""
        with self._cond:
            self._event_due = time.monotonic() + delay
            self._cond.notify()

    def soon(self, delay: float) -> None:
        """Look within ``delay`` seconds, whatever events come meanwhile."""
        with self._cond:
            due = time.monotonic() + delay
            if self._soon_due is None or due < self._soon_due:
                self._soon_due = due
                self._cond.notify()

    def _run(self) -> None:
        tick = time.monotonic() + self.interval
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    wake = min(d for d in (tick, self._event_due, self._soon_due) if d is not None)
                    if now >= wake:
                        break
                    self._cond.wait(wake - now)
                if self._stopped:
                    return
                self._event_due = self._soon_due = None  # this look covers them all
            tick = time.monotonic() + self.interval
            try:
                self.on_change()
            except Exception:  # the callback only starts work; never let the timer die
                log.exception("starting a rescan failed")

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._observer is not None:
            self._observer.stop()
