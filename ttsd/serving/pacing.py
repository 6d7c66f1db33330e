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
at no measurable cost (10,000 calls per load). Not so for an engine module's first import (torch's
makes millions of calls): that runs without the hook while nothing is served (``unpaced``). The
same hook calls the job off: when its ``Ticket`` is cancelled (a rollback, an activate, a newer
version), ``Superseded`` is raised just before the job's next call in its own code (an engine, ttsd,
a library it loads with), a ``BaseException`` so that no engine's ``except Exception`` swallows it.
Not at a call that begins or ends something (``__enter__``, ``__exit__``, ``release``, ``close``),
not at a call's return (a lock it took or a file it opened would be lost), and not inside the
standard library, whose logging keeps a lock per handler: a job stopped between taking one and
letting go left it taken, and every thread that logged after waited for ever (``_safe_point``). Nor
inside an import: a module stopped half-way through its first import is gone from ``sys.modules``
with its submodules left behind, and torch's native part cannot be loaded twice in a process, so
every later load of a voice that needs it failed until a restart. A called-off job finishes the
import at the urgent pace (a job that supersedes it would need the same import) and stops at its
next safe point after; one called off just before an import stops before it. An import is importlib's
``_find_and_load`` or a loader's ``exec_module`` (a reload, a lazy module), and ``checkpoint()``
waits for its end too. An urgent job is never called off (``Ticket.make_urgent``).

Neither happens while the job holds one of the manager's locks (``Guard``): a pause there would
hold up the event loop's readers of the same lock, and an exception there would leave a
transition half made (a swap recorded but not done). The hook acts at the job's next call after.

Nor while Python runs a finalizer on the job's thread. Python drops an exception a finalizer
(``__del__``, a ``weakref.finalize``, a weakref callback) raises, reporting it as "unraisable", and
drops with it the profile hook that raised: a job called off there ran on to its end, neither
called off nor paced, and the finalizer's own clean-up was cut short. The cycle collector runs other
objects' finalizers on whatever thread sets it off, so the hook neither pauses nor raises while a
collection runs on its thread (``gc.callbacks``), and does not raise inside a ``__del__`` or a
``weakref.finalize``: the job stops at its own next call. Where one
still drops the hook's ``Superseded`` (another weakref callback), the ``sys.unraisablehook`` that
pacing chains in puts the hook back; where Python drops it without a word (an ``io`` object's
``close`` at its last reference), ``checkpoint()``, between a job's phases, still calls it off.
"""

from __future__ import annotations

import gc
import importlib._bootstrap
import sys
import threading
import time
import weakref
from collections.abc import Callable
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


class _Held(threading.local):
    """Per thread, what the hook reads at every call (class defaults: no lookup fails)."""

    depth = 0  # Guards held
    collecting = False  # the cycle collector runs
    ticket: Ticket | None = None  # the job's, while it runs paced
    hook: Callable[[FrameType, str, Any], None] | None = None  # the job's hook, while it runs
    serving: Callable[[], bool] | None = None  # the job's ``serving``, while it runs


_held = _Held()


def _collecting(phase: str, _info: dict[str, int]) -> None:
    _held.collecting = phase == "start"


gc.callbacks.append(_collecting)

_FINALIZE = weakref.finalize.__call__.__code__


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` or a ``weakref.finalize`` (looked at only once a
    job is called off)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code is _FINALIZE:
            return True
        frame = frame.f_back
    return False


_FIND_AND_LOAD = importlib._bootstrap._find_and_load.__code__  # type: ignore[attr-defined]  # every import


def _import(frame: FrameType | None) -> FrameType | None:
    """The outermost import ``frame`` runs in, if any (looked at only once a job is called off): an
    ``import`` (importlib's ``_find_and_load``), or a module's code run by its loader's
    ``exec_module`` outside one (``importlib.reload``, a lazy module's first use, a module made
    from a spec by hand)."""
    outermost = None
    while frame is not None:
        code = frame.f_code
        if code is _FIND_AND_LOAD or code.co_name == "exec_module":
            outermost = frame
        frame = frame.f_back
    return outermost


# calls that begin or end something (a ``with`` block, a lock held, a file open): never stopped
# before, so that nothing is left half begun or unended
_BRACKETS = frozenset({"release", "close", "__enter__", "__exit__", "__aenter__", "__aexit__"})


def _stdlib(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs the standard library's code, told by its module's name (a path would
    count packages installed beside it, as a system Python's are)."""
    if frame is None:
        return True  # called from C with no Python caller: not the job's own code
    if frame.f_code.co_filename.startswith("<frozen"):
        return True
    module = frame.f_globals.get("__name__")
    return isinstance(module, str) and module.partition(".")[0] in sys.stdlib_module_names


def _safe_point(frame: FrameType, event: str, arg: Any) -> bool:
    """Whether a called-off job may stop here (looked at only once it is called off): just before
    a call, in code of the job's own (an engine, ttsd, a library it loads with), that does not
    begin or end something, outside any finalizer. Not at a call's return (what it made, a lock
    taken or a file opened, would be lost), nor inside the standard library (its logging keeps a
    lock per handler: a job stopped between taking it and letting go left it taken, and every
    thread that logged after waited for ever)."""
    if event == "call":  # the callee has not begun: judged by its caller
        if frame.f_code.co_name in _BRACKETS or _stdlib(frame.f_back):
            return False
    elif event == "c_call":
        if getattr(arg, "__name__", "") in _BRACKETS or _stdlib(frame):
            return False
    else:
        return False
    return not _in_finalizer(frame)


class _Rearm:
    """A ``sys.unraisablehook`` that puts a job's hook back after Python dropped the ``Superseded``
    it raised in a finalizer (and the hook with it); anything else goes to the hook it wraps, with
    the job's hook quiet meanwhile."""

    def __init__(self, wrapped: Callable[[Any], object]) -> None:
        self.wrapped = wrapped

    def __call__(self, unraisable: Any) -> None:
        hook = _held.hook
        if hook is not None and unraisable.exc_type is not None and issubclass(unraisable.exc_type, Superseded):
            sys.setprofile(hook)  # the job is called off at its next call, outside the finalizer
            return
        _held.depth += 1  # the wrapped hook (a test runner's, a logger's) is neither paced nor cut short
        try:
            self.wrapped(unraisable)
        finally:
            _held.depth -= 1


def _chain_rearm() -> None:
    """Put ``_Rearm`` on top of ``sys.unraisablehook`` (again, if a test runner swapped it)."""
    if not isinstance(sys.unraisablehook, _Rearm):
        sys.unraisablehook = _Rearm(sys.unraisablehook)


class Guard:
    """A lock (``threading.Lock`` or ``RLock``) inside which a paced job is neither paused nor
    called off: the manager's locks are all Guards. Used as a context manager only. The depth is
    raised before the lock is taken and lowered after it is let go, so the hook cannot act between
    the two (a job called off there kept the lock for good)."""

    def __init__(self, lock: threading.Lock | threading.RLock | None = None) -> None:
        self._lock = lock if lock is not None else threading.Lock()

    def __enter__(self) -> Guard:
        _held.depth += 1
        try:
            self._lock.acquire()
        except BaseException:
            _held.depth -= 1
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()
        _held.depth -= 1


class Superseded(BaseException):  # a signal, like asyncio.CancelledError
    """The job was called off (``Ticket.cancel``); ``str()`` says by what."""


@dataclass(eq=False)
class Ticket:
    """One job's handle: whether it is wanted, and how urgent it is. Any thread may cancel it or
    make it urgent; the job's own thread reads both at every call (plain attributes: no lock)."""

    what: str  # "upgrade of voice to 3", for logs
    voice: str = ""
    urgent: bool = False  # set through make_urgent(): an urgent job is never called off
    hurried: bool = False  # a request waits for it: the urgent lane and pace, yet still called off by a rollback
    cancelled: str | None = None  # why, once called off
    target: str | None = None  # the version the job is bringing up, once it knows (normalised)
    # an operator rolled back from the version it brings up (the memory policy's upgrade, which
    # is not called off): it ends there, and the other versions it was given are not taken up
    rolled_back: bool = False
    stands_by: bool = False  # it loads rollback targets again after a restart (``Promoter.stand_by``)
    done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self, why: str) -> None:
        """Call the job off, unless it is urgent (a voice waits for it, or it unloaded the serving
        version and must bring one back)."""
        with self._lock:
            if self.cancelled is None and not self.urgent:
                self.cancelled = why

    def make_urgent(self) -> bool:
        """Urgent from now on, so never called off; False if it was called off first (one lock
        for both, so a cancel chosen before cannot land after)."""
        with self._lock:
            if self.cancelled is None:
                self.urgent = True
            return self.cancelled is None

    def check(self) -> None:
        """``Superseded`` if the job was called off: the last check before a commit."""
        if self.cancelled is not None:
            raise Superseded(self.cancelled)


def checkpoint() -> None:
    """Between a job's phases: ``Superseded`` if the job running on this thread was called off
    (where Python dropped the hook's own without a word, see the module docstring); not inside an
    import, which the hook lets finish first."""
    ticket = _held.ticket
    if ticket is not None and ticket.cancelled is not None and _import(sys._getframe(1)) is None:
        ticket.check()


class paced:  # lower case: used as ``with paced(ticket, serving):``, as it was a function
    """Run the block on this thread at the pace above, and stop it with ``Superseded`` once
    ``ticket`` is cancelled. A profiler or debugger that owns the hook is left alone (then the
    block is neither paced nor cancellable mid-way; the job still checks its ticket before it
    commits). A class rather than a generator: its exit runs on the job's thread, the hook quiet
    in it, however the block ends."""

    def __init__(self, ticket: Ticket, serving: Callable[[], bool]) -> None:
        self.ticket, self.serving = ticket, serving
        self.installed = False

    def __enter__(self) -> None:
        if sys.getprofile() is not None:
            return
        ticket, serving = self.ticket, self.serving
        clock, sleep = time.perf_counter, time.sleep
        started = clock()
        importing: FrameType | None = None  # the import a called-off job finishes before it stops

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            nonlocal started, importing
            if frame is importing and event == "return":
                importing = None  # the import a called-off job was finishing ended
            if _held.depth or _held.collecting or id(frame.f_code) in _QUIET:
                return  # inside one of the manager's locks, a collection, or pacing's own code
            if ticket.cancelled is not None and importing is None and _safe_point(frame, event, arg):
                # else at its next safe point, paced until then; never inside an import (a call
                # that would begin one has not begun it: judged by its caller)
                importing = _import(frame.f_back if event == "call" else frame)
                if importing is None:
                    raise Superseded(ticket.cancelled)
            ran = clock() - started
            run, pause = (
                (URGENT_RUN_S, URGENT_PAUSE_S)
                if ticket.urgent or ticket.hurried or importing is not None
                else (RUN_S, PAUSE_S)
            )
            if ran > run:
                if serving():
                    # in proportion to what ran: one torch op may take several ms, and a fixed pause
                    # after it would give the job a larger share than RUN : PAUSE
                    sleep(min(ran * pause / run, MAX_PAUSE_S))  # releases the GIL and the core
                started = clock()

        _chain_rearm()
        _held.ticket, _held.hook, _held.serving = ticket, hook, serving
        self.installed = True
        sys.setprofile(hook)

    def __exit__(self, *_: object) -> None:
        if self.installed:
            sys.setprofile(None)
            _held.ticket = _held.hook = _held.serving = None


class unpaced:  # lower case: used as ``with unpaced():``
    """Within the block, a paced job's thread runs without its hook, if no request is being served
    as it begins: for work of many small calls none of which is the job's own, an engine module's
    first import. torch's makes millions of calls, and under the hook took 3.0-3.9 s against
    1.3-2.0 s plain (AMD EPYC Zen 3, 2 cores): a daemon's start-up paid it before its first voice
    could serve. Nothing is paced while no request is served; the job is only not called off
    mid-block, and ``checkpoint()`` calls it off at the block's end. With a request in flight, or
    off a job's thread, the block runs as it would without it."""

    def __enter__(self) -> None:
        hook, serving = _held.hook, _held.serving
        self.hook = hook if hook is not None and sys.getprofile() is hook and not (serving and serving()) else None
        if self.hook is not None:
            sys.setprofile(None)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.hook is not None:
            sys.setprofile(self.hook)
            if kind is None:
                checkpoint()


# pacing's own code, which Python runs on the job's thread: the hook never acts inside it
_QUIET = frozenset(
    id(code)
    for code in (_collecting.__code__, _Rearm.__call__.__code__, paced.__enter__.__code__, paced.__exit__.__code__)
)
