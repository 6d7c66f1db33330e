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
        self,
        models_dir: Path,
        on_change: Callable[[], None],
        *,
        debounce: float = 0.5,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models_dir = models_dir
        self.on_change = on_change
        self.debounce = debounce
        self.interval = interval
        self._clock = clock
        self._cond = threading.Condition()
        self._tick = clock() + interval  # the periodic look
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
        with self._cond:
            self._tick = self._clock() + self.interval
        self._thread.start()

    def poke(self, delay: float = 0.0) -> None:
        """Look in ``delay`` seconds; a later poke before then pushes the look back (debounce)."""
        with self._cond:
            self._event_due = self._clock() + delay
            self._cond.notify()

    def soon(self, delay: float) -> None:
        """Look within ``delay`` seconds, whatever events come meanwhile."""
        with self._cond:
            due = self._clock() + delay
            if self._soon_due is None or due < self._soon_due:
                self._soon_due = due
                self._cond.notify()

    def due(self, now: float) -> bool:
        """Whether a look is due at ``now``; if so it is taken: one look covers every reason
        (events, ``soon``, the tick), and the next tick is ``interval`` from now. The thread asks
        this each time it wakes; tests ask it with a clock of their own."""
        with self._cond:
            if now < self._wake():
                return False
            self._event_due = self._soon_due = None
            self._tick = now + self.interval
            return True

    def _wake(self) -> float:
        return min(d for d in (self._tick, self._event_due, self._soon_due) if d is not None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self.due(self._clock()):
                    self._cond.wait(max(0.0, self._wake() - self._clock()))
                if self._stopped:
                    return
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
