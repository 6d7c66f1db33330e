"""Slow work on voices (copying in, verifying, loading, warming up), one job per voice at a time.

Each job runs on a fresh thread that ends with it: torch keeps an OpenMP thread team per thread
that ran it, and a long-lived loader thread would keep its team spinning beside the synthesis
workers' (measured 20-35 ms slower per short request on 2 cores). The thread is paced
(``pacing.py``): background jobs yield to ttsd's live requests, urgent ones only hand the GIL over.

The rules:

* at most one job per voice runs; a new one waits for the one before it to end;
* a new job that *supersedes* (a newer version, a rollback, an activate) cancels a background job
  of its voice first, so it does not wait behind it: the old job stops at its next call and
  commits nothing;
* background jobs run one at a time across voices (a 2-core box loads one thing at a time);
  urgent jobs (nothing serving, a request waiting) one at a time among themselves, beside a
  background job, never behind it; an operator's rollback or activate has a lane of its own, so it
  never waits behind another voice's urgent load either (a new voice's first load, a request's
  load of a parked voice: seconds); within a memory budget it takes the urgent lane, since each
  load makes room only for itself.

Nothing here knows what a job does; the manager hands ``start`` a function of the job's ``Ticket``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .pacing import Guard, Superseded, Ticket, paced

log = logging.getLogger("ttsd.manager")
T = TypeVar("T")


class _NoLane:
    """The lane of a job that takes none (``Jobs.start(laned=False)``)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


_NO_LANE: Any = _NoLane()


class Jobs:
    def __init__(self, serving: Callable[[], bool], *, operator_lane: bool = True) -> None:
        self._serving, self._operator_lane = serving, operator_lane
        self._lock = Guard()
        self._current: dict[str, Ticket] = {}  # voice -> its newest job (running or waiting its turn)
        self._background = threading.Lock()
        self._urgent = threading.Lock()
        self._operator = threading.Lock()
        self._all: set[Ticket] = set()  # unfinished jobs, for ``wait``

    def start(
        self,
        voice: str,
        what: str,
        work: Callable[[Ticket], T],
        *,
        urgent: bool,
        supersede: bool = False,
        operator: bool = False,
        on_skip: Callable[[], None] | None = None,
        laned: bool = True,
    ) -> Future[T]:
        """Run ``work(ticket)`` as voice ``voice``'s next job (see the module docstring). The future
        holds its result, or ``Superseded`` when it was called off. ``operator`` (urgent too): an
        operator's action, on the operator's lane. ``on_skip``: called on the job's thread when it
        is called off, before its work began or in it (the pacing hook may raise ``Superseded``
        at the very call of ``work``, before a line of it, so its own clean-up may not have
        run): it must do no harm when that clean-up did run. ``laned=False``: work that loads
        nothing and mostly waits (a removal waiting for the voice's last requests) takes no
        lane, so no other voice's load waits behind it; it is still its voice's one job."""
        future: Future[T] = Future()
        ticket = Ticket(what, voice=voice, urgent=urgent or operator)
        operator = operator and self._operator_lane  # else on the urgent lane
        with self._lock:
            before = self._current.get(voice)
            if supersede:  # every background job of the voice, the running one and any waiting
                for other in self._of(voice):
                    if not other.urgent:
                        other.cancel(what)
            self._current[voice] = ticket
            self._all.add(ticket)

        def run() -> None:
            try:
                if before is not None:
                    before.done.wait()
                try:
                    lane = _NO_LANE if not laned else self._operator if operator else self._enter(ticket)
                except Superseded:  # (_enter checks the ticket)
                    if on_skip is not None:
                        on_skip()
                    raise
                if operator or not laned:
                    lane.acquire()
                try:
                    try:
                        ticket.check()
                    except Superseded:
                        if on_skip is not None:
                            on_skip()
                        raise
                    try:
                        with paced(ticket, self._serving):
                            result = work(ticket)
                    except Superseded:
                        if on_skip is not None:
                            on_skip()
                        raise
                finally:
                    lane.release()
            except BaseException as exc:  # handed to whoever waits; Superseded included
                if not isinstance(exc, (Superseded, Exception)):
                    log.error("%s stopped: %s", what, type(exc).__name__)
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                ticket.done.set()
                with self._lock:
                    if self._current.get(voice) is ticket:
                        del self._current[voice]
                    self._all.discard(ticket)

        future.set_running_or_notify_cancel()
        threading.Thread(target=run, name=f"ttsd-job-{voice}"[:15], daemon=True).start()
        return future

    def _enter(self, ticket: Ticket) -> threading.Lock:
        """Take the ticket's lane; one made urgent while it waits for the background lane moves
        to the urgent one."""
        while True:
            lane = self._urgent if ticket.urgent or ticket.hurried else self._background
            if lane.acquire(timeout=0.05):
                if lane is (self._urgent if ticket.urgent or ticket.hurried else self._background):
                    return lane
                lane.release()
            ticket.check()

    def current(self, voice: str) -> Ticket | None:
        """``voice``'s newest job, running or waiting its turn."""
        with self._lock:
            return self._current.get(voice)

    def busy(self, voice: str) -> bool:
        """Whether a job for ``voice`` is running or waiting its turn."""
        with self._lock:
            return voice in self._current

    def cancel(self, voice: str, why: str, version: str | None = None) -> list[Ticket]:
        """Call off ``voice``'s background jobs (urgent ones finish): they commit nothing. With
        ``version`` (normalised), only those bringing that version up."""
        with self._lock:
            # (by version: not the restart's loads of rollback targets, which leave a withdrawn one
            # out themselves and go on to the next)
            called_off = [
                t
                for t in self._of(voice)
                if not t.urgent and (version is None or (t.target == version and not t.stands_by))
            ]
        for ticket in called_off:
            ticket.cancel(why)
        return called_off

    def hurry(self, voice: str) -> None:
        """Hurry ``voice``'s jobs: a request now waits for them, so they take the urgent lane and
        pace. An operator's rollback or activate still calls them off (an upgrade a request had
        hurried was never called off, and swapped in over the rollback that had just answered)."""
        with self._lock:
            for ticket in self._of(voice):
                ticket.hurried = True

    def retiring(self, voice: str) -> Ticket | None:
        """The job of ``voice`` that unloaded its serving version to bring up ``target`` (the
        memory policy's upgrade, urgent from then on), if one is running."""
        with self._lock:
            return next((t for t in self._of(voice) if t.urgent and t.target is not None and not t.done.is_set()), None)

    def upgrading(self, voice: str) -> Ticket | None:
        """The background job of ``voice`` bringing a new version (``target``) up, if one is
        running or waiting its turn: an operator's rollback may call it off."""
        with self._lock:
            return next(
                (t for t in self._of(voice) if not t.urgent and t.target is not None and not t.done.is_set()), None
            )

    def _of(self, voice: str) -> list[Ticket]:
        """``voice``'s unfinished jobs (under ``_lock``)."""
        return [t for t in self._all if t.voice == voice]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no job is left (start-up, tests); False on time-out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = next(iter(self._all), None)
            if pending is None:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not pending.done.wait(left):
                return False
