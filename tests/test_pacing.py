"""``ttsd.serving.pacing``: background work yields the GIL and the cores to live requests while
they are served, runs at full speed when none is, and stops at its next call once called off."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import logging
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ttsd.serving import pacing
from ttsd.serving.pacing import RUN_S, Superseded, Ticket, paced

_progress = [0]  # calls of _step so far: the job's progress, bumped by the job, read by the worker


def _python_work() -> int:
    return sum(_step(i) for i in range(200))


def _step(i: int) -> int:
    _progress[0] += 1
    return i * i


def _worker_waits(paces: bool, busy: bool = True, seconds: float = 0.15) -> tuple[list[float], int]:
    """Per-op GIL wait of a worker (sleep 0.2 ms without the GIL, then measure how long until its
    next bytecode runs) while a job thread runs Python, and the job's work done. Only ops during
    which the job made progress count: on a busy box the OS may not run the job at all for a
    while, and an op with no job to wait for tells nothing about the GIL."""
    stop = threading.Event()
    done = [0]

    def job() -> None:
        if paces:
            with paced(Ticket("test"), lambda: busy):
                while not stop.is_set():
                    _python_work()
                    done[0] += 1
        else:
            while not stop.is_set():
                _python_work()
                done[0] += 1

    thread = threading.Thread(target=job)
    thread.start()
    waits = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            progress = _progress[0]
            before = time.perf_counter()
            time.sleep(0.0002)  # the GIL is free here, as during a torch op
            wait = time.perf_counter() - before - 0.0002
            if _progress[0] != progress:  # the job ran meanwhile: it had the GIL to give back
                waits.append(wait)
    finally:
        stop.set()
        thread.join()
    return waits, done[0]


@pytest.mark.slow
def test_workers_get_the_gil_back_quickly_while_a_job_is_paced() -> None:
    """Without pacing, a worker op that finds the job running waits for a forced switch, a whole
    switch interval (5 ms); paced, at most the rest of the job's slice (RUN_S, 1 ms). Both are
    measured in alternating rounds, so load from elsewhere hits both alike; the paced median must be
    under half the plain one. Removing the pacing makes the two equal."""
    assert sys.getswitchinterval() >= 0.004 and RUN_S < sys.getswitchinterval() / 2
    plain: list[float] = []
    paced_waits: list[float] = []
    job_work = 0
    deadline = time.monotonic() + 30
    while min(len(plain), len(paced_waits)) < 100:
        assert time.monotonic() < deadline, f"the job hardly ran: {len(plain)} and {len(paced_waits)} ops"
        plain += _worker_waits(paces=False)[0]
        waits, work = _worker_waits(paces=True)
        paced_waits += waits
        job_work += work
    assert statistics.median(paced_waits) < statistics.median(plain) / 2, (statistics.median(paced_waits),
                                                                           statistics.median(plain))
    assert job_work > 0  # the job still makes progress


def _cpu_share(busy: bool, seconds: float = 0.3, chunk: int = 256 << 10) -> float:
    """The CPU a paced job doing C-level work (sha256 of ``chunk`` bytes per call, GIL released)
    gets: its thread's CPU time over the wall time it ran."""
    share = [0.0]

    def job() -> None:
        data = b"x" * chunk
        with paced(Ticket("test"), lambda: busy):
            start, cpu = time.monotonic(), time.thread_time()
            while time.monotonic() - start < seconds:
                hashlib.sha256(data).digest()
            share[0] = (time.thread_time() - cpu) / (time.monotonic() - start)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    return share[0]


@pytest.mark.slow
def test_c_level_work_is_paced_too_and_runs_free_when_nothing_is_served() -> None:
    """Pacing is kept at C calls as well as Python ones (a torch op, a chunk hashed): while requests
    are served the job's CPU share is about RUN / (RUN + PAUSE), a twentieth; with none it runs at
    full speed. Alternating rounds; the idle share must be over twice the busy one (measured ~0.06
    and ~1.0)."""
    busy = [_cpu_share(True) for _ in range(3)]
    idle = [_cpu_share(False) for _ in range(3)]
    assert statistics.median(busy) < 0.2, busy
    assert statistics.median(idle) > 2 * statistics.median(busy), (idle, busy)


@pytest.mark.slow
def test_a_long_call_is_followed_by_a_longer_pause() -> None:
    """One call of several ms (a long torch op; here sha256 of 16 MiB, ~8 ms) runs past the
    slice: the pause after it grows with it, so the share stays about RUN : PAUSE (a fixed pause
    gave such a job 43 %)."""
    shares = [_cpu_share(True, seconds=1.0, chunk=16 << 20) for _ in range(3)]
    assert statistics.median(shares) < 0.12, shares


@pytest.mark.slow
def test_urgent_work_is_paced_lightly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ticket made urgent (a request now waits for it) switches to the light pace at once."""
    background = statistics.median(_cpu_share(True) for _ in range(3))
    monkeypatch.setattr(pacing, "RUN_S", pacing.URGENT_RUN_S)  # what ticket.urgent selects
    monkeypatch.setattr(pacing, "PAUSE_S", pacing.URGENT_PAUSE_S)
    urgent = statistics.median(_cpu_share(True) for _ in range(3))
    assert urgent > 2 * background, (urgent, background)


def test_a_cancelled_job_stops_at_its_next_call() -> None:
    """1. A job hashes in a loop. 2. Another thread cancels its ticket. 3. The job ends with
    ``Superseded`` carrying the reason, within milliseconds, whether or not requests are served."""
    for busy in (False, True):
        ticket = Ticket("test")
        outcome: list[object] = []

        def job() -> None:
            try:
                with paced(ticket, lambda: busy):
                    while True:
                        hashlib.sha256(b"y" * 4096).digest()
            except Superseded as exc:
                outcome.append((str(exc), time.monotonic()))

        thread = threading.Thread(target=job)
        thread.start()
        time.sleep(0.05)
        cancelled = time.monotonic()
        ticket.cancel("a newer version")
        thread.join(5)
        assert not thread.is_alive()
        why, stopped = outcome[0]  # type: ignore[misc]
        assert why == "a newer version" and stopped - cancelled < 0.5
        assert sys.getprofile() is None


def test_leaves_an_existing_profiler_alone() -> None:
    """A profiler or debugger that owns the hook keeps it; the job is then not paced."""
    result = {}

    def profiler(frame, event, arg):  # noqa: ANN001, ANN202
        return None

    def run() -> None:
        sys.setprofile(profiler)
        with paced(Ticket("test"), lambda: True):
            result["inside"] = sys.getprofile()
        result["after"] = sys.getprofile()
        sys.setprofile(None)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result["inside"] is profiler and result["after"] is profiler


def test_inside_a_guard_a_job_is_neither_paused_nor_called_off() -> None:
    """The manager's locks are Guards: a job holding one must not sleep there (the event loop's
    readers of that lock would wait) nor stop half-way through a transition. 1. A job called off
    while it holds a Guard runs the guarded section to its end, unpaced though requests are
    served. 2. It stops at its first call after."""
    from ttsd.serving.pacing import Guard

    ticket, guard = Ticket("test"), Guard()
    result: dict[str, object] = {}

    def job() -> None:
        try:
            with paced(ticket, lambda: True):
                with guard:
                    ticket.cancel("a newer version")
                    started = time.perf_counter()
                    for _ in range(20_000):
                        _step(1)  # Python calls: each would pause or stop outside the guard
                    result["inside"] = time.perf_counter() - started
                _step(2)
                result["after"] = "ran on"
        except Superseded as exc:
            result["stopped"] = str(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(10)
    assert result.get("stopped") == "a newer version" and "after" not in result
    assert float(result["inside"]) < 0.5  # paced, 20,000 calls would sleep for seconds  # type: ignore[arg-type]



def _called_off_job(ticket: Ticket, body: Callable[[], None]) -> dict[str, object]:
    """Run ``body`` as a paced job on a thread of its own, then a loop of Python calls for at most
    2 s: what became of it ("stopped": the reason it was called off, or "ran on")."""
    result: dict[str, object] = {}

    def job() -> None:
        try:
            with paced(ticket, lambda: False):
                body()
                spin = time.monotonic() + 2
                while time.monotonic() < spin:
                    _step(1)
                result["ran on"] = True
        except Superseded as exc:
            result["stopped"] = str(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return result


def test_a_job_called_off_while_the_cycle_collector_runs_finalizers_on_its_thread_stops_after_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's cycle collector runs whatever finalizers are due on the thread that set it off, a
    job's too, and drops an exception one raises along with the hook that raised it: a rollback
    landing then left the job running, neither paced nor called off (a flaky manager test's upgrade
    thread outlived its 10 s join). 1. A job's collection runs the finalizers of 50 objects; the
    first calls the job off. 2. Every finalizer runs to its end. 3. The job stops at its next call
    after the collection. 4. Nothing was reported as unraisable."""
    ticket = Ticket("test")
    finished: list[int] = []
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class Cyclic:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            ticket.cancel("a rollback")  # as if another thread's rollback landed now
            finished.append(_step(1))

    def collect() -> None:
        gc.disable()
        try:
            for _ in range(50):
                Cyclic()
            gc.collect()
        finally:
            gc.enable()

    result = _called_off_job(ticket, collect)
    assert result == {"stopped": "a rollback"} and len(finished) == 50 and unraisable == []


def test_finalizers_a_called_off_job_sets_off_run_to_their_end_and_the_job_stops_after() -> None:
    """A finalizer the job sets off itself (an object's last reference dropped) runs inside the
    job's own calls. 1. A called-off job drops five temporary dirs (``weakref.finalize``) and five
    objects with a ``__del__``. 2. Every one runs to its end: the dirs are gone (cut short at the
    first one, the hook cut the rest short too, and four dirs stayed on disk). 3. The job stops at
    its next call."""
    ticket = Ticket("test")
    dirs: list[str] = []
    deleted: list[int] = []

    class Finalized:
        def __del__(self) -> None:
            _step(1)
            deleted.append(1)

    def drop() -> None:
        held = [tempfile.TemporaryDirectory() for _ in range(5)]
        dirs.extend(d.name for d in held)
        objects = [Finalized() for _ in range(5)]
        ticket.cancelled = "a rollback"  # as Ticket.cancel does from another thread: no call here
        del held, objects

    assert _called_off_job(ticket, drop) == {"stopped": "a rollback"}
    assert [d for d in dirs if os.path.exists(d)] == [] and len(deleted) == 5


def test_a_superseded_python_drops_in_a_weakref_callback_puts_the_hook_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weakref callback is a finalizer the hook cannot tell from the job's own calls: its
    ``Superseded`` is dropped as unraisable, and the hook with it. 1. The job drops an object whose
    weakref callback calls it off. 2. The job still stops at its next call. 3. The dropped
    exception is not reported; another unraisable one still is, and the hook it goes to runs whole
    even when the job is called off meanwhile (it is neither paced nor cut short)."""
    ticket = Ticket("test")
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: unraisable.append(args.exc_type))

    class Referent:
        pass

    def callback(_ref: object) -> None:
        ticket.cancel("a rollback")
        _step(1)

    def drop() -> None:
        held = Referent()
        ref = weakref.ref(held, callback)
        del held
        assert ref() is None

    assert _called_off_job(ticket, drop) == {"stopped": "a rollback"} and unraisable == []

    reported: list[str] = []

    def report(args: Any) -> None:  # a logger's hook: Python calls all the way
        ticket2.cancel("a rollback")
        reported.append("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    class Broken:
        def __del__(self) -> None:
            raise ValueError("not ours")

    def broken() -> None:
        Broken()

    ticket2 = Ticket("test")
    monkeypatch.setattr(sys, "unraisablehook", report)
    assert _called_off_job(ticket2, broken) == {"stopped": "a rollback"}
    assert len(reported) == 1 and "ValueError: not ours" in reported[0]


def test_a_job_called_off_as_it_takes_or_lets_go_of_a_guard_leaves_the_lock_free() -> None:
    """1. A job waits for a Guard's lock that a rollback holds; the rollback calls it off and lets
    go. 2. A job called off inside a Guard leaves it. Either way the job stops and the lock is
    free after it (the hook acted between the lock and the depth, and the manager's lock stayed
    with a dead thread: every later rollback waited for ever)."""
    from ttsd.serving.pacing import Guard

    lock = threading.Lock()
    guard, ticket = Guard(lock), Ticket("test")

    def take() -> None:
        with guard:
            pass

    lock.acquire()
    rollback = threading.Timer(0.1, lambda: (ticket.cancel("a rollback"), lock.release()))
    rollback.start()
    assert _called_off_job(ticket, take) == {"stopped": "a rollback"} and not lock.locked()
    rollback.join()

    ticket = Ticket("test")

    def inside() -> None:
        with guard:
            ticket.cancel("a rollback")

    assert _called_off_job(ticket, inside) == {"stopped": "a rollback"} and not lock.locked()


def test_a_job_called_off_after_its_last_call_cleans_up_on_its_own_thread() -> None:
    """The block's last call done, the ticket is cancelled, and the block ends: the job is not
    stopped (it did its work), and its thread is left with no hook and no job (the exit ran
    there, not later on whichever thread dropped the exception)."""
    ticket = Ticket("test")
    seen: dict[str, object] = {}

    def job() -> None:
        with paced(ticket, lambda: False):
            ticket.cancelled = "a rollback"  # no call after this one
        seen["profile"], seen["hook"], seen["ticket"] = sys.getprofile(), pacing._held.hook, pacing._held.ticket

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(10)
    assert seen == {"profile": None, "hook": None, "ticket": None}


def test_checkpoint_calls_off_a_job_whose_hook_python_dropped_without_a_word() -> None:
    """An ``io`` object's ``close`` at its last reference: Python drops what it raises without
    reporting it, and the hook with it. 1. A called-off job drops an unclosed gzip file. 2. Its
    next checkpoint stops it. 3. Outside a job a checkpoint does nothing."""
    ticket = Ticket("test")
    dropped: list[object] = []

    def drop() -> None:
        held = gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(b"x" * 100)))
        ticket.cancelled = "a rollback"  # as Ticket.cancel does from another thread: no call here
        del held
        dropped.append(sys.getprofile())  # reached only without the hook: it would raise at this call
        pacing.checkpoint()

    assert _called_off_job(ticket, drop) == {"stopped": "a rollback"} and dropped == [None]
    pacing.checkpoint()


def test_a_called_off_job_stops_only_where_nothing_it_began_is_left_open() -> None:
    """The hook stops a called-off job just before a call in the job's own code, never at a call
    that ends something begun nor inside the standard library. 1. Called off inside a plain
    ``with lock:`` block, the job stops after the lock's exit (stopped at it, the lock stayed
    taken). 2. Called off while logging, between the handler taking its lock and letting go (a
    cancel from another thread lands at any call): the handler's lock is free after the job, and
    logging goes on (left taken, every thread that logged after would wait for ever). 3. Called
    off in a function that returns a lock it took: not stopped at the return, so the caller's
    ``try``/``finally`` lets it go. 4. Called off inside ``Queue.put``: the put wakes its reader
    before the job stops (stopped inside the standard library, the reader slept to its time-out)."""
    lock, ticket = threading.Lock(), Ticket("test")

    def locked() -> None:
        with lock:
            ticket.cancelled = "a rollback"  # as Ticket.cancel does from another thread: no call here

    assert _called_off_job(ticket, locked) == {"stopped": "a rollback"} and not lock.locked()

    class Landing(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            ticket.cancelled = "a rollback"  # lands inside the handler's lock

    handler = Landing()
    logger = logging.getLogger("ttsd.test.pacing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        ticket = Ticket("test")
        assert _called_off_job(ticket, lambda: logger.warning("loading")) == {"stopped": "a rollback"}
        assert handler.lock is not None and handler.lock.acquire(timeout=1)
        handler.lock.release()
    finally:
        logger.removeHandler(handler)

    ticket = Ticket("test")

    def take() -> None:  # returns a lock taken: stopped at its return, the caller could not let go
        lock.acquire()
        ticket.cancelled = "a rollback"

    def take_then_let_go() -> None:
        take()
        try:
            _step(1)
        finally:
            lock.release()

    assert _called_off_job(ticket, take_then_let_go) == {"stopped": "a rollback"} and not lock.locked()

    class Landing2(queue.Queue):  # type: ignore[type-arg]
        def _put(self, item: object) -> None:
            super()._put(item)
            ticket.cancelled = "a rollback"  # lands inside Queue.put, before it wakes the reader

    ticket, handoff = Ticket("test"), Landing2()
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(handoff.get(timeout=5)))
    reader.start()
    time.sleep(0.05)  # the reader waits in get()
    assert _called_off_job(ticket, lambda: handoff.put("work")) == {"stopped": "a rollback"}
    started = time.monotonic()
    reader.join(5)
    assert got == ["work"] and time.monotonic() - started < 1  # woken, not left to its time-out


def test_an_urgent_job_is_never_called_off_and_one_called_off_first_cannot_become_urgent() -> None:
    """A job that must finish (it unloaded the serving version under the memory policy) makes its
    ticket urgent; a rollback that chose the ticket a moment before must not land after. 1. A
    cancel after ``make_urgent`` is refused. 2. ``make_urgent`` after a cancel says so, and the
    ticket stays called off."""
    urgent = Ticket("test")
    assert urgent.make_urgent()
    urgent.cancel("a rollback")
    assert urgent.cancelled is None
    urgent.check()

    called_off = Ticket("test")
    called_off.cancel("a rollback")
    assert not called_off.make_urgent() and not called_off.urgent and called_off.cancelled == "a rollback"


def test_a_library_installed_beside_the_standard_library_is_still_the_jobs_own_code() -> None:
    """The standard library is told by module name, not path: a system Python keeps its packages
    (torch, an engine) under the standard library's folder, and a job running there could not be
    called off mid-way. 1. An engine's code, compiled as if installed there, loops. 2. Called off,
    it stops at once."""
    import sysconfig

    where = f"{sysconfig.get_paths()['stdlib']}/site-packages/someengine/model.py"
    scope: dict[str, Any] = {"__name__": "someengine.model", "_step": _step}
    code = "def spin():\n    end = time.monotonic() + 3\n    while time.monotonic() < end:\n        _step(1)\n"
    scope["time"] = time
    exec(compile(code, where, "exec"), scope)  # noqa: S102
    ticket = Ticket("test")
    threading.Timer(0.05, ticket.cancel, ("a rollback",)).start()
    started = time.monotonic()
    assert _called_off_job(ticket, scope["spin"]) == {"stopped": "a rollback"}
    assert time.monotonic() - started < 2.5  # its loop runs 3 s uncalled-off


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("opener", ["open_beneath", "weights"])
def test_a_load_called_off_just_after_it_opened_a_file_leaves_nothing_open(
        opener: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call-off that lands while a file is being opened stops the job at its next call: the
    descriptor is closed, not leaked for the daemon's life (opened, then handed to a check whose
    call was the stop; or opened in the weights' reader, whose clean-up caught ``Exception``
    only)."""
    from ttsd import safe_read
    from ttsd.engines.vits.weights import FileTensors

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file").write_bytes(b"x" * 16)
    ticket, real_open = Ticket("test"), os.open
    opened: list[int] = []

    def landing_open(*args: Any, **kwargs: Any) -> int:
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        if str(args[0]).endswith("file"):
            ticket.cancelled = "a rollback"  # lands as the file's open returns
        return fd

    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        monkeypatch.setattr(os, "open", landing_open)
        if opener == "open_beneath":
            result = _called_off_job(ticket, lambda: safe_read.open_beneath(root, "sub/file"))
        else:
            result = _called_off_job(ticket, lambda: FileTensors(tmp_path / "sub" / "file"))
        monkeypatch.undo()
        assert result == {"stopped": "a rollback"} and opened and not any(_is_open(fd) for fd in opened)
    finally:
        os.close(root)


def test_an_unpaced_block_runs_without_the_hook_while_nothing_is_served() -> None:
    """An engine module's first import runs ``unpaced``: with no request served, the job's thread
    runs the block without its hook (torch's import took 3.0-3.9 s under it against 1.3-2.0 s
    plain), and the hook is back after it. A job called off in the block runs the block to its
    end and stops there."""
    ticket = Ticket("test")
    seen: dict[str, object] = {}

    def job() -> None:
        try:
            with paced(ticket, lambda: False):
                hook = sys.getprofile()
                with pacing.unpaced():
                    pass
                seen["put back"] = sys.getprofile() is hook
                with pacing.unpaced():
                    seen["inside"] = sys.getprofile()
                    ticket.cancel("a rollback")
                    _python_work()  # calls at which the hook would have called the job off
                    seen["ran on"] = True
                seen["after"] = "the job went on"
        except Superseded as exc:
            seen["stopped"] = str(exc)
            seen["hook off at the end"] = hook is not None and sys.getprofile() is None  # paced's exit

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(5)
    assert seen == {"put back": True, "inside": None, "ran on": True, "stopped": "a rollback",
                    "hook off at the end": True}


def test_an_unpaced_block_is_paced_as_any_other_while_requests_are_served() -> None:
    """With a request in flight as the block begins, the hook stays: the job is paced and called
    off inside it as anywhere. Off a job's thread, or under a profiler that owns the hook, the block
    changes nothing."""
    ticket = Ticket("test")
    seen: dict[str, object] = {}

    def job() -> None:
        with paced(ticket, lambda: True):
            hook = sys.getprofile()
            try:
                with pacing.unpaced():
                    seen["inside"] = sys.getprofile() is hook
                    ticket.cancel("a rollback")
                    _python_work()
                    seen["ran on"] = True
            except Superseded as exc:
                seen["stopped"] = str(exc)

    def profiled() -> None:
        def profiler(frame, event, arg):  # noqa: ANN001, ANN202
            return None

        sys.setprofile(profiler)
        with paced(Ticket("test"), lambda: False), pacing.unpaced():
            seen["profiler kept"] = sys.getprofile() is profiler
        sys.setprofile(None)

    for target in (job, profiled):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join(5)
    with pacing.unpaced():
        seen["no job"] = sys.getprofile() is None
    assert seen == {"inside": True, "stopped": "a rollback", "profiler kept": True, "no job": True}


# A module whose code calls the job off half-way through its own first run, then does the work at
# which the hook calls a job off (and, in one case, ttsd's own checkpoint between phases).
_CALLS_OFF_MIDWAY = """
import {registry} as registry
registry.seen.append("begun")
registry.ticket.cancel("a rollback")
{between}
sum(registry.step(i) for i in range(200))
registry.seen.append("done")
"""


def _module_run_in_a_job(tmp_path: Path, how: str, between: str = "") -> list[str]:
    """What the module's code and the job did: ``how`` runs the module (first import, reload, or
    ``exec_module`` of a module made from its spec, as torch's ``try_import`` does) in a job
    (``_called_off_job``) whose ticket the module's own code cancels half-way."""
    import importlib
    import importlib.util
    import types

    tag = f"{how.replace(' ', '_')}_{len(between)}_{threading.get_ident()}"
    registry = types.ModuleType(f"_ttsd_registry_{tag}")
    registry.seen, registry.ticket = [], Ticket("test")  # type: ignore[attr-defined]
    registry.step = _step  # type: ignore[attr-defined]
    sys.modules[registry.__name__] = registry
    name = f"_ttsd_midway_{tag}"
    path = tmp_path / f"{name}.py"
    path.write_text(_CALLS_OFF_MIDWAY.format(registry=registry.__name__, between=between))
    sys.path.insert(0, str(tmp_path))
    if how == "reload":
        importlib.import_module(name)  # a first run outside any job; the reload runs in one
        registry.seen.clear()  # type: ignore[attr-defined]
        registry.ticket = Ticket("test")  # type: ignore[attr-defined]
    seen: list[str] = registry.seen  # type: ignore[attr-defined]

    def body() -> None:
        if how == "import":
            importlib.import_module(name)
        elif how == "reload":
            importlib.reload(sys.modules[name])
        else:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)

    try:
        result = _called_off_job(registry.ticket, body)  # type: ignore[attr-defined]
        seen.extend(f"{what}: {why}" if what == "stopped" else what for what, why in result.items())
        if how != "exec_module":
            assert getattr(sys.modules.get(name), "__name__", None) == name  # not dropped half-made
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        sys.modules.pop(registry.__name__, None)
    return seen


@pytest.mark.parametrize("how", ["import", "reload", "exec_module"])
def test_a_job_called_off_during_an_import_finishes_it_then_stops(tmp_path: Path, how: str) -> None:
    """Stopped half-way through a module's first run, the module was dropped from sys.modules with
    whatever it had begun (torch's native part cannot load twice: every later VITS load failed).
    The job finishes the import, whichever way the module's code runs, and stops at its next call
    after; ttsd's own checkpoint inside an import waits for its end too."""
    done = ["begun", "done", "stopped: a rollback"]
    assert _module_run_in_a_job(tmp_path, how) == done
    assert _module_run_in_a_job(tmp_path, how, "from ttsd.serving.pacing import checkpoint; checkpoint()") == done


def test_a_job_called_off_just_before_an_import_does_not_begin_it(tmp_path: Path) -> None:
    """Called off before the ``import`` statement: the job stops at it, nothing of the module runs
    (the import's own first call is judged by the job's code that makes it)."""
    (tmp_path / "_ttsd_never_begun.py").write_text("import sys\nsys.modules['_ttsd_never_begun'].RAN = True\n")
    sys.path.insert(0, str(tmp_path))
    ticket = Ticket("test")

    def body() -> None:
        ticket.cancel("a newer version")
        import _ttsd_never_begun  # noqa: F401  # (a statement: importlib's own first call is the import's)

    try:
        result = _called_off_job(ticket, body)
        begun = "_ttsd_never_begun" in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("_ttsd_never_begun", None)
    assert result == {"stopped": "a newer version"} and not begun
