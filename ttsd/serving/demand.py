"""Voices held within a memory budget: loaded on first use, unloaded when idle and least recently
used (``--max-loaded``, ``--memory-budget``; the policy itself is ``residency.py``).

A voice whose active version the budget unloaded stays the voice's active version, *parked*: out
of the ``ServingMap``'s loaded entries, so a request for it gets ``ColdVoiceError``. The front end
then calls ``wanting(voice)`` and waits on the future it gets: every request for the same cold voice
shares one load, an urgent job of that voice (``jobs.py``: it never waits behind another voice's
background work, and it makes a job already running for its voice urgent), and the voice cannot be
unloaded while any of them waits. A load makes room first: idle versions are unloaded, rollback
targets before active versions, least recently used first. When what is loaded is busy with
requests the load waits for one to end, up to the request's bound, then fails with ``BusyError``
(503 + Retry-After); when the voice cannot fit even then (the preloaded voices alone fill the
budget) it fails with ``ResourceError`` at once, saying so: a retry would fail the same way. A
version that fails to load is refused (the model's fault: ``LoadError``, 500) and the voice falls
back to the newest version that loads, as at start-up.

Memory is measured, not guessed: the process's RSS (``/proc/self/statm``) before and after each
load gives that version's cost, which the policy uses next time.

``OnDemand`` is handed what it needs as callables (``bring_up``, ``ensure_stored``, ``fall_back``)
and never reaches into the manager. Threads: ``wanting``, ``used`` and ``room_changed`` run on any
thread; the rest on job threads. Lock order: the table's, then ``_lock``, then the map's. Without a
budget none of it acts: every voice stays loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from ..errors import BusyError, LoadError, ResourceError, TtsdError, UnknownVoiceError
from ..malloc import resident_bytes
from . import residency
from .jobs import Jobs
from .lifecycle import Lifecycle
from .pacing import Guard
from .serving_map import default_of
from .table import VersionTable
from .versions import COMING_UP, NOT_ON_TRIAL, Listener, ModelVersion, State

log = logging.getLogger("ttsd.manager")
ROOM_WAIT_SHARE = 0.75  # a load gives up waiting for room before its requests stop waiting, so they hear why


class OnDemand:
    def __init__(
        self,
        table: VersionTable,
        lifecycle: Lifecycle,
        jobs: Jobs,
        budget: residency.Budget,
        *,
        bring_up: Callable[[ModelVersion, str], bool],
        ensure_stored: Callable[[ModelVersion], None],
        fall_back: Callable[[str], None],
        listener: Listener,
    ) -> None:
        self.table, self.lifecycle, self.jobs, self.budget = table, lifecycle, jobs, budget
        self.map = lifecycle.map
        self._bring_up, self._ensure_stored, self._fall_back = bring_up, ensure_stored, fall_back
        self._listener = listener
        self._lock = Guard()
        self._waiters: Counter[str] = Counter()  # requests waiting for each voice's load
        self._wanted: dict[str, Future[None]] = {}  # the one load in progress per cold voice
        self._last_used: dict[str, tuple[float, float]] = {}  # voice -> (monotonic, wall clock)
        self._room = threading.Condition()  # notified whenever a request ends

    # == requests (any thread) ==================================================================
    @contextmanager
    def wanting(self, name: str) -> Iterator[Future[None]]:
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
                self._start_load(name, future)
            yield future
        finally:
            with self._lock:
                self._waiters[name] -= 1
                if not self._waiters[name]:
                    del self._waiters[name]

    def used(self, name: str) -> None:
        """A request on ``name`` ended (the map's release callback)."""
        with self._lock:
            self._last_used[name] = (time.monotonic(), time.time())

    def forget(self, name: str) -> None:
        """Voice ``name`` was removed: when it was last used is not kept."""
        with self._lock:
            self._last_used.pop(name, None)

    def room_changed(self) -> None:
        with self._room:
            self._room.notify_all()

    def waiting_for(self, name: str) -> int:
        with self._lock:
            return self._waiters[name]

    # == loading for requests (an urgent job) ===================================================
    def _start_load(self, name: str, future: Future[None]) -> None:
        self.jobs.hurry(name)  # a job already running for this voice (an upgrade) is what the requests wait for
        job = self.jobs.start(
            name, f"load of {name} for a request", lambda _t: self._load_for_requests(name), urgent=True
        )

        def finished(done: Future[None]) -> None:
            with self._lock:
                self._wanted.pop(name, None)
            error = done.exception()
            if error is not None and not isinstance(error, TtsdError):
                log.error("loading voice %s for a request failed", name, exc_info=error)
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        job.add_done_callback(finished)

    def _load_for_requests(self, name: str) -> None:
        deadline = time.monotonic() + ROOM_WAIT_SHARE * self.budget.wait
        while True:
            model = self.lifecycle.active(name)
            if model is None:
                raise UnknownVoiceError(f"voice {name!r} has no active version any more")
            if self.map.loaded(model.key):  # loaded meanwhile (an upgrade, a rollback)
                return
            # a running canary of this voice holds its place in the budget and is never unloaded:
            # its active version loads beside it even over the budget, as an upgrade does (the
            # voice's other users waited out --load-wait for room that could not come, then 503)
            canary = self.lifecycle.canary(name)
            beside = canary is not None and canary is not model and self.map.loaded(canary.key)
            if self.make_room(model, strict=not beside) or beside:
                if self._bring_back(model):
                    return
                continue  # the voice moved on while it loaded (a rollback, an upgrade): look again
            with self.table.locked():
                residents = self._residents(loading=name)
            if not any(r.busy for r in residents):  # only pinned voices are loaded: waiting cannot help
                raise ResourceError(
                    f"voice {name} does not fit in the memory budget beside the preloaded voices "
                    f"({', '.join(sorted(self.pinned())) or 'none'}; this process uses "
                    f"{resident_bytes() / 2**20:.0f} MB): raise --memory-budget or --max-loaded",
                    retry_after=60,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusyError(
                    f"voice {name} cannot be loaded now: every loaded voice is busy and the memory "
                    "budget holds no more; retry shortly",
                    retry_after=2,
                )
            with self._room:
                self._room.wait(min(remaining, 0.5))

    def _bring_back(self, model: ModelVersion) -> bool:
        """Load a parked active version. If it is refused, the voice falls back to the newest
        version that loads; if none does, the requests hear why. False when the voice made another
        version active meanwhile (an operator's rollback, an upgrade): what was loaded goes."""
        name = model.name
        try:
            self._ensure_stored(model)
        except TtsdError as exc:
            raise ResourceError(f"voice {name} cannot be loaded now: {exc}", retry_after=10) from exc
        if self._bring_up(model, "a request needs it"):
            if not self.lifecycle.unpark(model):
                return False
            self.used(name)
            self._listener("loaded-for-request", model)
            # the measured cost may be more than was expected; what was loaded for the requests stays
            # (loaded beside its canary, over the budget, it was the only version that could go,
            # and requests that gave up waiting left it idle: each next one loaded it again)
            self.fit_budget(keep=model.key)
            return True
        if self.lifecycle.active(name) is not model:  # moved on: its failure takes nothing down
            return False
        if model.state is not State.REFUSED:  # the box's reason (out of memory, a damaged copy): retried
            raise ResourceError(f"voice {name} cannot be loaded now: {model.reason}", retry_after=10)
        reason = model.reason
        with self.lifecycle.commit, self.table.locked():
            if self.map.active(name) != model.key:  # a rollback swapped in just now
                return False
            self.map.deactivate(name)
        self._fall_back(name)
        fallback = self.lifecycle.active(name)
        if fallback is None or not self.map.loaded(fallback.key):
            raise LoadError(f"voice {name} {model.version} failed to load: {reason}")
        return True

    # == the budget (job threads) ===============================================================
    def pinned(self, names: list[str] | None = None) -> set[str]:
        """Voices never unloaded by the budget: ``--preload``, else the default voice (chosen of
        ``names`` by ``default_of`` when none is set and the map knows none yet)."""
        if self.budget.preload:
            return set(self.budget.preload)
        default = self.map.default_voice or (default_of(None, names) if names else self.map.default_name())
        return {default} if default else set()

    def _residents(self, loading: str | None = None) -> list[residency.Resident]:
        """What is loaded and unloadable in principle (under the table's lock). ``loading``: the
        voice a load is for, whose active version must stay (an upgrade loads beside it)."""
        pinned = self.pinned()
        versions = self.table.all()
        guess = residency.estimate(m.rss for m in versions)
        residents = []
        with self._lock:
            for m in versions:
                if (
                    m.engine is None
                    or m.state not in (State.ACTIVE, State.STANDBY, State.CANARY)
                    or not self.map.loaded(m.key)
                ):
                    continue
                active = m.state is State.ACTIVE
                busy = (
                    self.map.in_flight(m.key) > 0
                    or m.state is State.CANARY
                    or (active and (m.name == loading or self._waiters[m.name] > 0))
                )
                residents.append(
                    residency.Resident(
                        m.key,
                        active,
                        busy,
                        self._last_used.get(m.name, (0.0, 0.0))[0],
                        m.rss or guess,
                        pinned=active and m.name in pinned,
                    )
                )
        return residents

    def make_room(self, model: ModelVersion, *, strict: bool = False) -> bool:
        """Before ``model`` loads: unload idle versions until one more fits the budget. False when
        it cannot fit; with ``strict`` (a request's load) nothing is unloaded then, otherwise (an
        upgrade, a rollback, start-up) what can go goes and the load goes ahead anyway, and the
        budget is met again after the swap (the replaced version is the first to go)."""
        if not self.budget.limited:
            return True
        for _ in range(2 * len(self.table) + 2):
            with self.table.locked():
                residents = self._residents(loading=model.name)
                guess = model.rss or residency.estimate(m.rss for m in self.table.all())
            plan = residency.plan(residents, self.budget, rss=resident_bytes(), adding=1, adding_bytes=guess)
            if (strict and not plan.fits) or not plan.unload:
                if not plan.fits and not strict:
                    log.warning(
                        "loading %s %s goes over the memory budget: %s",
                        model.name,
                        model.version,
                        "nothing else loaded may be unloaded now"
                        if residents
                        else f"the process uses {resident_bytes() / 2**20:.0f} MB before it",
                    )
                return plan.fits
            self._evict(self.table.by_key(plan.unload[0]))
        return False

    def fit_budget(self, keep: residency.Key | None = None) -> None:
        """Unload idle versions, rollback targets first, until what is loaded fits the budget (or
        nothing but ``keep`` could go)."""
        if not self.budget.limited:
            return
        for _ in range(2 * len(self.table) + 2):
            with self.table.locked():
                residents = [replace(r, busy=True) if r.key == keep else r for r in self._residents()]
            plan = residency.plan(residents, self.budget, rss=resident_bytes())
            if not plan.unload:
                return
            self._evict(self.table.by_key(plan.unload[0]))

    def _evict(self, model: ModelVersion | None, event: str = "evicted") -> bool:
        """Unload an idle loaded version for the budget: an active one is parked (the voice keeps
        it, unloaded), a rollback target becomes available. False if it is busy now."""
        if model is None:
            return True
        # under ``commit`` too: a swap in progress (a rollback to this standby, between writing
        # state.json and serving it) must not find its engine gone
        with self.lifecycle.commit, self.table.locked():
            if model.engine is None:
                return True
            if model.state is State.ACTIVE:
                # chosen as a standby, it may have been swapped in since (a rollback): a pinned
                # voice's active version is never parked
                pinned = event == "evicted" and model.name in self.pinned()
                if pinned or self.waiting_for(model.name) or not self.map.park(model.key):
                    return False
            elif model.state is State.STANDBY:
                if not self.map.remove(model.key):
                    return False
                model.state = State.AVAILABLE
            else:
                return False
            engine, model.engine = model.engine, None
            freed = self.lifecycle.freeing(model.key)  # (a memory-policy swap of it waits for this)
        self.lifecycle.free(model.key, engine, freed)
        log.info(
            "%s %s unloaded (%s; it had cost %.0f MB)",
            model.name,
            model.version,
            "least recently used, to stay within the memory budget"
            if event == "evicted"
            else "verified and warmed; its voice is not in use",
            model.rss / 2**20,
        )
        self._listener(event, model)
        return True

    def park_if_cold(self, model: ModelVersion, was_loaded: bool) -> None:
        """After a new version of a voice that was not loaded became active (a hot upgrade of a
        cold voice, a new voice): it was verified and warmed, so a bad folder is refused at drop
        time; now it is unloaded again unless its voice is preloaded."""
        if self.budget.limited and not was_loaded and model.state is State.ACTIVE and model.name not in self.pinned():
            self._evict(model, event="parked")

    def activate_cold(self, model: ModelVersion) -> None:
        """At start-up, within a budget: a voice that is not preloaded comes back as its saved
        active version, parked (it is verified and loaded on first use)."""
        with self.table.locked():
            model.state, model.requests, model.failures = State.ACTIVE, NOT_ON_TRIAL, 0
            self.map.park(model.key)
        log.info("%s %s is active, not loaded (the memory budget loads it on first use)", model.name, model.version)

    # == what is visible (any thread) ===========================================================
    def residency(self, name: str, active: ModelVersion | None) -> dict[str, Any]:
        """A voice's ``residency`` (loaded, unloaded, loading) and ``last_used`` (Unix time), for
        the snapshot (called under the table's lock)."""
        with self._lock:
            wanted, used = name in self._wanted, self._last_used.get(name)
        if active is None:
            state = None
        elif wanted or active.state in COMING_UP:
            state = "loading"
        else:
            state = "loaded" if self.map.loaded(active.key) else "unloaded"
        return {"residency": state, "last_used": round(used[1], 3) if used else None}

    def memory(self) -> dict[str, Any]:
        """The budget and what is loaded against it, for ``/v1/status``."""
        loaded = sum(1 for m in self.table.all() if m.engine is not None)
        return {
            "max_loaded": self.budget.max_loaded,
            "budget_bytes": self.budget.memory,
            "preload": sorted(self.pinned()) if self.budget.limited else None,
            "loaded_versions": loaded,
            "rss_bytes": resident_bytes(),
        }
