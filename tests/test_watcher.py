"""The watcher: the one clock that decides when the models dir is looked at again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ttsd.reloader import ModelWatcher


def test_a_look_asked_for_soon_is_not_pushed_back_by_events(tmp_path: Path) -> None:
    """A folder still settling asks for a look in 0.3 s; file events every 0.1 s (a copy in
    progress elsewhere) debounce each other but must not delay that look to the next tick."""
    looked = threading.Event()
    watcher = ModelWatcher(tmp_path, looked.set, debounce=0.5, interval=60.0)
    watcher.start()
    try:
        started = time.monotonic()
        watcher.soon(0.3)
        while not looked.is_set() and time.monotonic() - started < 5.0:
            watcher.poke(0.5)
            looked.wait(0.1)
        assert looked.is_set(), "the look asked for was pushed back by events"
    finally:
        watcher.stop()


def test_events_are_debounced_and_stop_ends_the_clock(tmp_path: Path) -> None:
    calls: list[float] = []
    done = threading.Event()
    watcher = ModelWatcher(tmp_path, lambda: (calls.append(time.monotonic()), done.set()), debounce=0.2,
                           interval=60.0)
    watcher.start()
    try:
        for _ in range(5):
            watcher.poke(0.2)
        assert done.wait(5.0)
        time.sleep(0.4)
        assert len(calls) == 1  # five events, one look
    finally:
        watcher.stop()
    watcher.poke(0.0)
    time.sleep(0.2)
    assert len(calls) == 1  # nothing after stop
