"""``ttsd.gil.yielding_gil``: a loader thread running pure Python must not make a worker thread,
which drops the GIL around each (here simulated) torch op, wait a switch interval per op."""

from __future__ import annotations

import statistics
import sys
import threading
import time

from ttsd.gil import PAUSE_S, RUN_S, yielding_gil

_progress = [0]  # calls of _step so far: the loader's progress, bumped by the loader, read by the worker


def _python_work() -> int:
    return sum(_step(i) for i in range(200))


def _step(i: int) -> int:
    _progress[0] += 1
    return i * i


def _worker_waits(loader_yields: bool, busy: bool = True, seconds: float = 0.15,
                  pause: float = PAUSE_S) -> tuple[list[float], int]:
    """Per-op GIL wait of a worker (sleep 0.2 ms without the GIL, then measure how long until its
    next bytecode runs) while a loader thread runs Python, and the loader's work done. Only ops
    during which the loader made progress count: on a busy box the OS may not run the loader at
    all for a while, and an op with no loader to wait for tells nothing about the GIL."""
    stop = threading.Event()
    done = [0]

    def loader() -> None:
        if loader_yields:
            with yielding_gil(lambda: busy, pause=pause):
                while not stop.is_set():
                    _python_work()
                    done[0] += 1
        else:
            while not stop.is_set():
                _python_work()
                done[0] += 1

    thread = threading.Thread(target=loader)
    thread.start()
    waits = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            progress = _progress[0]
            before = time.perf_counter()
            time.sleep(0.0002)  # the GIL is free here, as during a torch op
            wait = time.perf_counter() - before - 0.0002
            if _progress[0] != progress:  # the loader ran meanwhile: it had the GIL to give back
                waits.append(wait)
    finally:
        stop.set()
        thread.join()
    return waits, done[0]


def test_workers_get_the_gil_back_quickly_while_the_loader_yields() -> None:
    """Without yielding, a worker op that finds the loader running waits for a forced switch, a
    whole switch interval (5 ms); with it, at most the rest of the loader's slice (RUN_S, 1 ms).
    Both are measured here, in alternating rounds, so load from elsewhere hits both alike; the
    yielding median must be under half the plain one (measured: a fifth, also on a loaded box).
    Removing the yielding makes the two equal."""
    assert sys.getswitchinterval() >= 0.004 and RUN_S < sys.getswitchinterval() / 2
    plain: list[float] = []
    yielding: list[float] = []
    loader_work = 0
    deadline = time.monotonic() + 30
    while min(len(plain), len(yielding)) < 100:
        assert time.monotonic() < deadline, f"the loader hardly ran: {len(plain)} and {len(yielding)} ops"
        plain += _worker_waits(loader_yields=False)[0]
        waits, work = _worker_waits(loader_yields=True)
        yielding += waits
        loader_work += work
    assert statistics.median(yielding) < statistics.median(plain) / 2, (statistics.median(yielding),
                                                                       statistics.median(plain))
    assert loader_work > 0  # the loader still makes progress


def test_no_pauses_when_nothing_is_served() -> None:
    """With ``busy()`` false the loader runs at full speed; with it true, it pauses. A long pause
    (50 ms per 1 ms slice) makes the difference far larger than anything the box's load does to
    the two; rounds alternate so that load hits both alike."""
    idle_work = busy_work = 0
    for _ in range(3):
        idle_work += _worker_waits(loader_yields=True, busy=False, pause=0.05)[1]
        busy_work += _worker_waits(loader_yields=True, busy=True, pause=0.05)[1]
    assert idle_work > 4 * busy_work, (idle_work, busy_work)


def test_leaves_an_existing_tracer_alone() -> None:
    calls = []

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202
        calls.append(event)

    result = {}

    def run() -> None:
        sys.settrace(tracer)
        with yielding_gil(lambda: True):
            result["inside"] = sys.gettrace()
        result["after"] = sys.gettrace()
        sys.settrace(None)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result["inside"] is tracer and result["after"] is tracer
