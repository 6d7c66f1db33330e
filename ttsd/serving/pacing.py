"""How background work shares a busy box: it paces itself against ttsd's own requests, and it can
be called off.

The problem has two sides. ttsd's own live requests must not slow down while a new version is
hashed, copied, loaded and warmed up (on 2 cores a load competes with the synthesis workers' torch
threads, whose parallel regions then wait at their barriers). And the work must not starve beside
*other* programs: an edge box runs object detection, a recorder, backups.

Lowering the loader's scheduling priority serves the first side only. ``SCHED_IDLE`` (weight 3
against nice 0's 1024) gives it a fraction of a percent of a core beside two busy programs: a
start-up that takes 1.6 s took over 11 minutes. Worse, a thread starved by the kernel while it
holds Python's GIL stalls every other thread of the process, the event loop included (a priority
inversion the kernel cannot see). Nice levels have the same shape, less sharply.

So loaders run at the process's own priority, and pace themselves instead:

* while any request is being served (``serving()``), a background job works at most ``RUN_S`` out
  of every ``RUN_S + PAUSE_S`` seconds (1 ms of 20) and sleeps the rest, with the GIL released (a
  call that ran longer than ``RUN_S``, one long torch op, is followed by a pause as much longer);
  the live requests keep the cores, and the job still progresses at a fixed share however busy
  ttsd is. The share was chosen by ``bench/hotswap.py`` with four clients keeping the daemon
  saturated (Intel Xeon with AMX, 2 cores): a fifth of a core made requests overlapping the
  upgrade 1.4-3x slower at p99, most in the default layout (one worker of two threads, whose
  parallel regions wait at their barriers for a preempted thread); a twentieth, 1.0-1.4x,
  with drop -> active about 10 s instead of 4;
* when no request is in flight it runs at full speed, and competes with other programs as an
  equal;
* urgent work (a voice with nothing serving, a request or an operator waiting) uses a light pace
  that only hands the GIL over regularly.

The pace is kept by a profile hook (``sys.setprofile``) on the job's own thread, called at every
Python and C function call (every torch op, every chunk hashed): about every 5 ms at worst
(measured: the longest single call of a load of the built-in voice, ``get_tensors``, 5.5 ms), and
at no measurable cost (10,000 calls per load). The same hook calls the job off: when its
``Ticket`` is cancelled (a rollback, an activate, a newer version), the next call raises
``Superseded``, a ``BaseException`` so that no engine's ``except Exception`` swallows it.

Neither happens while the job holds one of the manager's locks (``Guard``): a pause there would
hold up the event loop's readers of the same lock, and an exception there would leave a
transition half made (a swap recorded but not done). The hook acts at the job's next call after.

Nor while Python's cycle collector runs on the job's thread (``gc.callbacks``): it runs other
objects' finalizers there, whatever thread made them. Python drops an exception a finalizer or a
weakref callback raises (it reports it as "unraisable"), and it drops a profile hook that raised
with it: a job called off inside one ran on to its end, neither called off nor paced. A finalizer
the job itself sets off (an object's last reference dropped) can still be cut short; then the
``sys.unraisablehook`` that pacing chains in puts the hook back, and the job is called off at its
next call.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

# Background work while requests run: 1 ms of work, then 19 ms of sleep (a twentieth of a core).
RUN_S = 0.001
PAUSE_S = 0.019
# Urgent work while requests run: hand the GIL over every 4 ms, for 1 ms.
URGENT_RUN_S = 0.004
URGENT_PAUSE_S = 0.001
MAX_PAUSE_S = 0.25  # however long the last call ran: a job still looks at its ticket this often


# per thread: how many Guards it holds (depth), whether the cycle collector runs on it
# (collecting), its job's hook (hook)
_held = threading.local()


def _collecting(phase: str, _info: dict[str, int]) -> None:
    _held.collecting = phase == "start"


gc.callbacks.append(_collecting)


class _Rearm:
    """A ``sys.unraisablehook`` that puts a job's hook back after Python dropped the ``Superseded``
    it raised in a finalizer (and the hook with it); anything else goes to the hook it wraps."""

    def __init__(self, wrapped: Callable[[Any], object]) -> None:
        self.wrapped = wrapped

    def __call__(self, unraisable: Any) -> None:
        hook = getattr(_held, "hook", None)
        if hook is not None and unraisable.exc_type is not None and issubclass(unraisable.exc_type, Superseded):
            sys.setprofile(hook)  # the job is called off at its next call, outside the finalizer
            return
        self.wrapped(unraisable)


# the hook's own helpers, which Python calls on the job's thread: the hook never acts inside them
_QUIET = frozenset({id(_collecting.__code__), id(_Rearm.__call__.__code__)})


def _chain_rearm() -> None:
    """Put ``_Rearm`` on top of ``sys.unraisablehook`` (again, if a test runner swapped it)."""
    if not isinstance(sys.unraisablehook, _Rearm):
        sys.unraisablehook = _Rearm(sys.unraisablehook)


class Guard:
    """A lock (``threading.Lock`` or ``RLock``) inside which a paced job is neither paused nor
    called off: the manager's locks are all Guards. Used as a context manager only."""

    def __init__(self, lock: threading.Lock | threading.RLock | None = None) -> None:
        self._lock = lock if lock is not None else threading.Lock()

    def __enter__(self) -> Guard:
        self._lock.acquire()
        _held.depth = getattr(_held, "depth", 0) + 1
        return self

    def __exit__(self, *_: object) -> None:
        _held.depth -= 1
        self._lock.release()


class Superseded(BaseException):  # a signal, like asyncio.CancelledError
    """The job was called off (``Ticket.cancel``); ``str()`` says by what."""


@dataclass(eq=False)
class Ticket:
    """One job's handle: whether it is wanted, and how urgent it is. Any thread may cancel it or
    make it urgent; the job's own thread reads both at every call (plain attributes: no lock)."""

    what: str  # "upgrade of voice to 3", for logs
    voice: str = ""
    urgent: bool = False
    cancelled: str | None = None  # why, once called off
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self, why: str) -> None:
        if self.cancelled is None:
            self.cancelled = why

    def check(self) -> None:
        """``Superseded`` if the job was called off: the last check before a commit."""
        if self.cancelled is not None:
            raise Superseded(self.cancelled)


@contextmanager
def paced(ticket: Ticket, serving: Callable[[], bool]) -> Iterator[None]:
    """Run the block on this thread at the pace above, and stop it with ``Superseded`` once
    ``ticket`` is cancelled. A profiler or debugger that owns the hook is left alone (then the
    block is neither paced nor cancellable mid-way; the job still checks its ticket before it
    commits)."""
    if sys.getprofile() is not None:
        yield
        return
    clock, sleep = time.perf_counter, time.sleep
    started = clock()

    def hook(_frame: FrameType, _event: str, _arg: Any) -> None:
        nonlocal started
        if getattr(_held, "depth", 0) or getattr(_held, "collecting", False) or id(_frame.f_code) in _QUIET:
            return  # inside one of the manager's locks, or the cycle collector: see the module docstring
        if ticket.cancelled is not None:
            raise Superseded(ticket.cancelled)
        ran = clock() - started
        run, pause = (URGENT_RUN_S, URGENT_PAUSE_S) if ticket.urgent else (RUN_S, PAUSE_S)
        if ran > run:
            if serving():
                # in proportion to what ran: one torch op may take several ms, and a fixed pause
                # after it would give the job a larger share than RUN : PAUSE
                sleep(min(ran * pause / run, MAX_PAUSE_S))  # releases the GIL and the core
            started = clock()

    _chain_rearm()
    _held.hook = hook
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(None)
        _held.hook = None
