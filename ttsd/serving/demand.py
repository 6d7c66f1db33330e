"""Voices held within a memory budget: loaded on first use, unloaded when idle and least recently
used (``--max-loaded``, ``--memory-budget``; the policy itself is ``residency.py``).

A voice whose active version the budget unloaded stays the voice's active version, *parked*: out
of the ``ServingMap``'s loaded entries, so a request for it gets ``ColdVoiceError``. The front end
then calls ``wanting(voice)`` and waits on the future it gets: every request for the same cold voice
shares one load, run on a fresh loader thread (serialised with the manager's other loads on
``_load_lock``), and the voice cannot be unloaded while any of them waits. A load makes room first:
idle versions are unloaded, rollback targets before active versions, least recently used first.
When everything loaded is busy the load waits for a request to end, up to the request's bound,
then fails with ``BusyError`` (503 + Retry-After: the system's fault). A version that fails to load
is refused (the model's fault: ``LoadError``, 500) and the voice falls back to the newest version
that loads, as at start-up.

Memory is measured, not guessed: the process's RSS (``/proc/self/statm``) before and after each
load gives that version's cost, which the policy uses next time.

``OnDemand`` is the ``ModelManager``'s half that does this. Threads: ``wanting`` and ``_released``
(via ``_room``) run on any thread and take ``_lock`` briefly; the rest runs on loader threads.
Without a budget none of it acts: every voice stays loaded, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import BusyError, LoadError, ResourceError, TtsdError, UnknownVoiceError
from ..malloc import resident_bytes
from . import residency
from .loader import unload_engine
from .versions import COMING_UP, ModelVersion, State

if TYPE_CHECKING:
    from .manager import ModelManager

log = logging.getLogger("ttsd.manager")
ROOM_WAIT_SHARE = 0.75  # a load gives up waiting for room before its requests stop waiting, so they hear why


class OnDemand:
    budget: residency.Budget

    def _init_demand(self, budget: residency.Budget | None) -> None:
        self.budget = budget or residency.Budget()
        self._waiters: Counter[str] = Counter()  # requests waiting for each voice's load
        self._wanted: dict[str, Future[None]] = {}  # the one load in progress per cold voice
        self._last_used: dict[str, tuple[float, float]] = {}  # voice -> (monotonic, wall clock)
        self._room = threading.Condition()  # notified whenever a request ends

    # == requests (any thread) ==================================================================
    @contextmanager
    def wanting(self: ModelManager, name: str) -> Iterator[Future[None]]:
        """A future done once voice ``name``'s active version is loaded, or failed with why it
        cannot be (``LoadError``: the model's; ``BusyError``/``ResourceError``: the box's). Starts
        the load, or joins the one in progress. The voice is not unloaded while this is held:
        take the lease inside it."""
        start = False
        with self._lock:
            self._waiters[name] += 1
            key = self.map.active(name)
            future = self._wanted.get(name)
            if key is not None and self.map.loaded(key):
                future = Future()
                future.set_result(None)
            elif future is None:
                future = self._wanted[name] = Future()
                future.set_running_or_notify_cancel()  # shared: one waiter giving up must not cancel it
                start = True
        try:
            if start:
                self._spawn(lambda: self._serve_wanted(name, future))
            yield future
        finally:
            with self._lock:
                self._waiters[name] -= 1
                if not self._waiters[name]:
                    del self._waiters[name]

    def _used(self: ModelManager, name: str) -> None:
        """A request on ``name`` ended (the map's release callback, under ``_lock``)."""
        self._last_used[name] = (time.monotonic(), time.time())

    def _room_changed(self) -> None:
        with self._room:
            self._room.notify_all()

    # == loading for requests (a loader thread) =================================================
    def _serve_wanted(self: ModelManager, name: str, future: Future[None]) -> None:
        error: BaseException | None = None
        try:
            self._load_for_requests(name)
        except BaseException as exc:  # handed to every waiting request
            error = exc
            if not isinstance(exc, TtsdError):
                log.error("loading voice %s for a request failed", name, exc_info=exc)
        finally:
            with self._lock:
                self._wanted.pop(name, None)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _load_for_requests(self: ModelManager, name: str) -> None:
        deadline = time.monotonic() + ROOM_WAIT_SHARE * self.budget.wait
        while True:
            with self._load_lock:
                model = self._active(name)
                if model is None:
                    raise UnknownVoiceError(f"voice {name!r} has no active version any more")
                if self.map.loaded(model.key):  # loaded meanwhile (an upgrade, a rollback)
                    return
                if self._make_room(model, strict=True):
                    self._bring_back(model)
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusyError(f"voice {name} cannot be loaded now: every loaded voice is busy and the memory "
                                "budget holds no more; retry shortly", retry_after=2)
            with self._room:
                self._room.wait(min(remaining, 0.5))

    def _bring_back(self: ModelManager, model: ModelVersion) -> None:
        """Load a parked active version (under ``_load_lock``). If it is refused, the voice falls
        back to the newest version that loads; if none does, the requests hear why."""
        name = model.name
        try:
            self._ensure_stored(model)
        except TtsdError as exc:
            raise ResourceError(f"voice {name} cannot be loaded now: {exc}", retry_after=10) from exc
        # a request waits: the load keeps normal CPU priority (a nice-10 load behind busy workers
        # makes that request, too, wait for the CPU time nobody else wants)
        if self._bring_up(model, "a request needs it", urgent=True):
            with self._lock:
                model.state = State.ACTIVE
                self.map.add(model.key, self._served(model), model.engine)  # type: ignore[arg-type]
                self._used(name)
            self._listener("loaded-for-request", model)
            self._fit_budget()  # the measured cost may be more than was expected
            return
        if model.state is not State.REFUSED:  # the box's reason (out of memory, a damaged copy): retried
            raise ResourceError(f"voice {name} cannot be loaded now: {model.reason}", retry_after=10)
        reason = model.reason
        with self._lock:
            self.map.deactivate(name)
        self._fall_back(name, for_request=True)
        fallback = self._active(name)
        if fallback is None or not self.map.loaded(fallback.key):
            raise LoadError(f"voice {name} {model.version} failed to load: {reason}")

    # == the budget (loader threads) ============================================================
    def _pinned(self: ModelManager, names: list[str] | None = None) -> set[str]:
        """Voices never unloaded by the budget: ``--preload``, else the default voice (the first
        of ``names`` when no default is set and the map knows none yet)."""
        if self.budget.preload:
            return set(self.budget.preload)
        default = self.map.default_voice or (min(names) if names else self.map.default_name())
        return {default} if default else set()

    def _residents(self: ModelManager, loading: str | None = None) -> list[residency.Resident]:
        """What is loaded and unloadable in principle (under ``_lock``). ``loading``: the voice a
        load is for, whose active version must stay (an upgrade loads beside it)."""
        pinned = self._pinned()
        guess = residency.estimate(m.rss for m in self._versions.values())
        residents = []
        for m in self._versions.values():
            if m.engine is None or m.state not in (State.ACTIVE, State.STANDBY, State.CANARY) \
                    or not self.map.loaded(m.key):
                continue
            active = m.state is State.ACTIVE
            busy = (self.map.in_flight(m.key) > 0 or m.state is State.CANARY
                    or (active and (m.name in pinned or m.name == loading or self._waiters[m.name] > 0)))
            residents.append(residency.Resident(m.key, active, busy, self._last_used.get(m.name, (0.0, 0.0))[0],
                                                m.rss or guess))
        return residents

    def _make_room(self: ModelManager, model: ModelVersion, *, strict: bool = False) -> bool:
        """Before ``model`` loads: unload idle versions until one more fits the budget. False when
        it cannot fit; with ``strict`` (a request's load) nothing is unloaded then, otherwise (an
        upgrade, a rollback, start-up) what can go goes and the load goes ahead anyway, and the
        budget is met again after the swap (the replaced version is the first to go)."""
        if not self.budget.limited:
            return True
        for _ in range(2 * len(self._versions) + 2):
            with self._lock:
                residents = self._residents(loading=model.name)
                guess = model.rss or residency.estimate(m.rss for m in self._versions.values())
            plan = residency.plan(residents, self.budget, rss=resident_bytes(), adding=1, adding_bytes=guess)
            if (strict and not plan.fits) or not plan.unload:
                if not plan.fits and not strict:
                    log.warning("loading %s %s goes over the memory budget: everything else loaded is busy",
                                model.name, model.version)
                return plan.fits
            self._evict(self._versions[plan.unload[0]])
        return False

    def _fit_budget(self: ModelManager) -> None:
        """Unload idle versions, rollback targets first, until what is loaded fits the budget."""
        if not self.budget.limited:
            return
        for _ in range(2 * len(self._versions) + 2):
            with self._lock:
                residents = self._residents()
            plan = residency.plan(residents, self.budget, rss=resident_bytes())
            if not plan.unload:
                return
            self._evict(self._versions[plan.unload[0]])

    def _evict(self: ModelManager, model: ModelVersion, event: str = "evicted") -> bool:
        """Unload an idle loaded version for the budget: an active one is parked (the voice keeps
        it, unloaded), a rollback target becomes available. False if it is busy now."""
        with self._lock:
            if model.engine is None:
                return True
            if model.state is State.ACTIVE:
                if self._waiters[model.name] or not self.map.park(model.key):
                    return False
            elif model.state is State.STANDBY:
                if not self.map.remove(model.key):
                    return False
                model.state = State.AVAILABLE
            else:
                return False
            engine, model.engine = model.engine, None
        unload_engine(engine)
        log.info("%s %s unloaded (%s; it had cost %.0f MB)", model.name, model.version,
                 "least recently used, to stay within the memory budget" if event == "evicted"
                 else "verified and warmed; its voice is not in use", model.rss / 2**20)
        self._listener(event, model)
        return True

    def _park_if_cold(self: ModelManager, model: ModelVersion, was_loaded: bool) -> None:
        """After a new version of a voice that was not loaded became active (a hot upgrade of a
        cold voice, a new voice): it was verified and warmed, so a bad folder is refused at drop
        time; now it is unloaded again unless its voice is preloaded."""
        if self.budget.limited and not was_loaded and model.state is State.ACTIVE \
                and model.name not in self._pinned():
            self._evict(model, event="parked")

    def _activate_cold(self: ModelManager, model: ModelVersion) -> None:
        """At start-up, within a budget: a voice that is not preloaded comes back as its saved
        active version, parked (it is verified and loaded on first use)."""
        with self._lock:
            model.state, model.requests, model.failures = State.ACTIVE, 0, 0
            self.map.park(model.key)
        log.info("%s %s is active, not loaded (the memory budget loads it on first use)", model.name, model.version)

    # == what is visible (any thread) ===========================================================
    def _residency(self: ModelManager, name: str, active: ModelVersion | None) -> dict[str, Any]:
        """A voice's ``residency`` (loaded, unloaded, loading) and ``last_used`` (Unix time), for
        the snapshot (called under ``_lock``)."""
        if active is None:
            state = None
        elif name in self._wanted or active.state in COMING_UP:
            state = "loading"
        else:
            state = "loaded" if self.map.loaded(active.key) else "unloaded"
        used = self._last_used.get(name)
        return {"residency": state, "last_used": round(used[1], 3) if used else None}

    def memory(self: ModelManager) -> dict[str, Any]:
        """The budget and what is loaded against it, for ``/v1/status``."""
        with self._lock:
            loaded = sum(1 for m in self._versions.values() if m.engine is not None)
        return {"max_loaded": self.budget.max_loaded, "budget_bytes": self.budget.memory,
                "preload": sorted(self._pinned()) if self.budget.limited else None,
                "loaded_versions": loaded, "rss_bytes": resident_bytes()}
