"""``ttsd.gil.yielding_gil``: a loader thread running pure Python must not make a worker thread,
which drops the GIL around each (here simulated) torch op, wait a switch interval per op."""

from __future__ import annotations

import statistics
import sys
import threading
import time

from ttsd.gil import yielding_gil


def _python_work() -> int:
    return sum(_step(i) for i in range(200))


def _step(i: int) -> int:
    return i * i


def _worker_waits(loader_yields: bool, busy: bool = True, seconds: float = 0.6) -> tuple[list[float], int]:
    """Per-op GIL wait of a worker (sleep 0.2 ms without the GIL, then measure how long until its
    next bytecode runs) while a loader thread runs Python; and the loader's work done."""
    stop = threading.Event()
    done = [0]

    def loader() -> None:
        if loader_yields:
            with yielding_gil(lambda: busy):
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
            before = time.perf_counter()
            time.sleep(0.0002)  # the GIL is free here, as during a torch op
            waits.append(time.perf_counter() - before - 0.0002)
    finally:
        stop.set()
        thread.join()
    return waits, done[0]


def test_workers_get_the_gil_back_quickly_while_the_loader_yields() -> None:
    assert sys.getswitchinterval() >= 0.004
    plain, _ = _worker_waits(loader_yields=False)
    yielding, loader_work = _worker_waits(loader_yields=True)
    # Without yielding every op waits about a switch interval (5 ms); with it, a fraction of the slice.
    assert statistics.median(plain) > 0.003, statistics.median(plain)
    assert statistics.median(yielding) < 0.0015, statistics.median(yielding)
    assert loader_work > 0  # the loader still makes progress


def test_no_pauses_when_nothing_is_served() -> None:
    _, idle_work = _worker_waits(loader_yields=True, busy=False, seconds=0.4)
    _, busy_work = _worker_waits(loader_yields=True, busy=True, seconds=0.4)
    assert idle_work > 2 * busy_work, (idle_work, busy_work)


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
