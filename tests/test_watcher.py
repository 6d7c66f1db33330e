"""The watcher: the one clock that decides when the models dir is looked at again. Its rules are
tested on a clock the test moves (``ModelWatcher.due``); its thread, once, for real."""

from __future__ import annotations

import threading
from pathlib import Path

from ttsd.reloader import ModelWatcher


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _watcher(tmp_path: Path, clock: Clock, **timing: float) -> ModelWatcher:
    return ModelWatcher(tmp_path, lambda: None, clock=clock, **timing)


def test_a_look_asked_for_soon_is_not_pushed_back_by_events(tmp_path: Path) -> None:
    """A folder still settling asks for a look in 0.3 s; file events every 0.1 s (a copy in
    progress elsewhere) debounce each other but must not delay that look past 0.3 s."""
    clock = Clock()
    watcher = _watcher(tmp_path, clock, debounce=0.5, interval=60.0)
    watcher.soon(0.3)
    start, looks = clock.now, []
    for tenths in range(6):  # 0.0 .. 0.5 s
        clock.now = start + tenths / 10
        watcher.poke(0.5)
        looks.append(watcher.due(clock.now))
    assert looks == [False, False, False, True, False, False]  # at 0.3 s, and the events still wait
    assert not watcher.due(start + 0.99)
    assert watcher.due(start + 1.0)  # the last event's debounce ran out (0.5 s after it)


def test_events_are_debounced_into_one_look_and_the_tick_restarts_after_it(tmp_path: Path) -> None:
    clock = Clock()
    watcher = _watcher(tmp_path, clock, debounce=0.2, interval=60.0)
    for _ in range(5):
        watcher.poke(0.2)
    assert not watcher.due(clock.now + 0.19)
    assert watcher.due(clock.now + 0.2)  # five events, one look
    assert not watcher.due(clock.now + 0.3)
    assert not watcher.due(clock.now + 60.1)  # the periodic look: 60 s after the last look
    assert watcher.due(clock.now + 60.2)


def test_the_thread_looks_when_poked_and_stop_ends_it(tmp_path: Path) -> None:
    calls: list[int] = []
    looked = threading.Event()
    watcher = ModelWatcher(tmp_path, lambda: (calls.append(1), looked.set()), debounce=0.0, interval=60.0)
    watcher.start()
    try:
        watcher.poke(0.0)
        assert looked.wait(5.0)
    finally:
        watcher.stop()
    watcher._thread.join(5.0)
    assert not watcher._thread.is_alive()
    watcher.poke(0.0)
    assert len(calls) == 1  # nothing after stop (the thread is gone)
