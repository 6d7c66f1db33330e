"""The model manager: decides which version of each voice serves, from parts it holds.

Shape from TF Serving's core, where a manager *holds* its parts rather than inheriting them:

* ``source`` (``source.py``) says which folders exist, with a verdict on each;
* ``table`` (``table.py``) holds every version's record, the only place records change;
* ``intake`` (``intake.py``) says what each folder is: a new version, a known one, a refused one;
* ``jobs`` (``jobs.py``) run the slow work, one job per voice at a time, paced (``pacing.py``) and
  called off when superseded; ``promoter`` (``promote.py``) is what they do: upgrades, fall-backs,
  retries, resumes, through ``bringup`` (``bringup.py``: copy, verify, check, load, warm);
* ``lifecycle`` (``lifecycle.py``) commits: the swap, canaries, verdicts, unloads;
* ``demand`` (``demand.py``) keeps voices within a memory budget (its policy: ``residency.py``);
* ``control`` (``actions.py``) is the operator's rollback and activate; ``removal``
  (``removal.py``) takes a voice out of the daemon;
* the pure rules are in ``policy.py``; what serves is the ``ServingMap`` (``serving_map.py``).

This module wires them, runs a reconcile (scan, take, start jobs) and answers what serves.

Threads: ``reconcile`` runs on the daemon's rescan thread (its scan serialized on ``_scan_lock``;
the jobs it starts run on their own threads); ``start`` on a start-up thread; ``rollback`` and
``activate`` on the caller's thread, returning at once for a loaded target; ``snapshot``,
``folders``, ``history`` and the map's release callback on any thread, event loop included, taking
only short locks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import TtsdError
from ..signing import TrustedKeys
from . import listing
from .actions import Control
from .bringup import BringUp
from .demand import OnDemand
from .intake import Intake
from .jobs import Jobs
from .lifecycle import Lifecycle
from .pacing import Superseded, Ticket
from .policy import Outcome, judge, retry_due
from .promote import Promoter
from .removal import Removal
from .residency import Budget
from .restore import restore
from .serving_map import Lease, ServingMap
from .source import Source
from .state import ServingState
from .store import ModelStore
from .table import VersionTable
from .versions import COMING_UP, Key, Listener, ModelVersion, Policy, State

log = logging.getLogger("ttsd.manager")


def _thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, daemon=True).start()


class ModelManager:
    def __init__(
        self,
        source: Source,
        *,
        state_dir: Path,
        policy: Policy | None = None,
        engine_options: dict[str, Any] | None = None,
        default_voice: str | None = None,
        listener: Listener | None = None,
        spawn: Callable[[Callable[[], None]], None] | None = None,
        trust: TrustedKeys | None = None,
        budget: Budget | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """``trust``: only folders signed by a key in its dir load (the dir is read again at each
        load); ``spawn`` runs follow-up work (unloads, automatic rollbacks, canary results) off the
        caller's thread; ``wake`` asks for a rescan soon (a job found a folder still changing)."""
        self.source = source
        self.policy = policy or Policy()
        self._listener = listener or (lambda _e, _m: None)
        self._spawn = spawn or _thread
        self._wake = wake or (lambda: None)

        def events(event: str, model: ModelVersion) -> None:  # late-bound: tests replace _listener
            self._listener(event, model)

        self.store = ModelStore(state_dir / "store")
        self.state = ServingState(state_dir)
        self.table = VersionTable()
        self.map = ServingMap(
            on_release=self._released,
            upgrading=self.table.coming_up,
            canary_share=self.policy.canary_share,
            default_voice=default_voice,
        )
        self.budget = budget or Budget()
        # within a memory budget an operator's load waits its turn among the urgent ones: each
        # load makes room for itself only, so three at once could overshoot the budget
        self.jobs = Jobs(serving=self.map.serving, operator_lane=not self.budget.limited)
        self.lifecycle = Lifecycle(
            self.table,
            self.map,
            self.state,
            self.store,
            self.policy,
            events,
            self._spawn,
            fit_budget=self._fit_budget_later,
        )
        self.bringup = BringUp(
            self.table,
            self.store,
            self.lifecycle,
            engine_options=engine_options or {},
            listener=events,
            trusted_keys=trust.where if trust is not None else None,
            make_room=lambda model: self.demand.make_room(model),
            live=lambda: self.map.ready() or self.map.serving(),
        )
        self.demand = OnDemand(
            self.table,
            self.lifecycle,
            self.jobs,
            self.budget,
            bring_up=lambda model, why: self.bringup.bring_up(model, why),
            ensure_stored=self.bringup.ensure_stored,
            fall_back=lambda name: self.promoter.fall_back(name, for_request=True),
            listener=events,
        )
        self.promoter = Promoter(
            self.table,
            self.lifecycle,
            self.bringup,
            self.demand,
            self.state,
            self.policy,
            again=self._again,
            requeue=self._upgrade,
        )
        self.intake = Intake(self.table, self.lifecycle, self.state, events)
        self.control = Control(
            self.table, self.lifecycle, self.bringup, self.jobs, self.state, events, restore=self.promoter.restore
        )
        self.removal = Removal(
            self.table,
            self.lifecycle,
            self.jobs,
            self.state,
            self.store,
            events,
            forget_use=self.demand.forget,
            wake=lambda: self._wake(),
        )
        self._scan_lock = threading.Lock()
        self._first_scan = True

    # == requests (any thread) ==================================================================
    def acquire(self, voice: str | None = None, version: str | None = None, *, user: str | None = None) -> Lease:
        """A lease from the serving map (front ends get ``map.acquire`` itself)."""
        return self.map.acquire(voice, version, user=user)

    def wanting(self, name: str) -> AbstractContextManager[Future[None]]:
        return self.demand.wanting(name)

    def _released(self, key: Key, ok: bool | None) -> None:
        """The map's callback when a request ends (on the request's thread: a worker, or the event
        loop for a request cancelled while queued): judge a new version by it, and unload a
        replaced version once its last request is done. Nothing slow runs here."""
        self.demand.used(key[0])
        outcome = Outcome.NONE
        with self.table.locked():
            model = self.table.by_key(key)
            if model is None:
                return
            if ok is not None:  # None: the request's or the box's fault, never counted against a model
                model.served_since_load += ok
                model.model_failures += not ok
                outcome, model.requests, model.failures = judge(
                    model.state, model.requests, model.failures, ok, self.policy
                )
            idle = model.state in (State.RETIRED, State.ROLLED_BACK)
        self.demand.room_changed()  # a load waiting for an idle voice to unload may go on
        if idle:
            self.lifecycle.unload_later(model)
        if outcome is Outcome.ROLLBACK:
            why = f"auto-rollback: {model.failures} of its first {model.requests} requests failed"
            self._spawn(lambda: self.control.auto_rollback(model, why))
        elif outcome is not Outcome.NONE:
            self._spawn(lambda: self.lifecycle.end_canary(model, promote=outcome is Outcome.PROMOTE))

    # == what serves (any thread) ===============================================================
    def ready(self) -> bool:
        return self.map.ready()

    def serving(self) -> bool:
        return self.map.serving()

    @property
    def waiting(self) -> bool:
        """A folder is settling or incomplete: reconcile again soon."""
        return self.source.waiting()

    def version(self, name: str, version: str) -> ModelVersion | None:
        """The record of one version (for tests and tools)."""
        return self.table.get(name, version)

    def snapshot(self) -> list[dict[str, Any]]:
        previous = {name: record.previous for name, record in self.state.voices().items()}
        return listing.voices(self.table, self.map, self.demand.residency, previous)

    def folders(self) -> list[dict[str, Any]]:
        """Folders in the models dir that are not (yet) a version: incomplete or refused (the
        folder of a version shown as refused is not listed again here)."""
        present = self.source.present()
        refused = {m.folder for m in self.table.all() if m.folder is not None and m.state is State.REFUSED}
        return [
            {"folder": str(path), "state": state, "reason": reason}
            for path, (state, reason) in sorted(self.table.folders().items())
            if path in present and path not in refused and state in ("incomplete", "refused")
        ]

    def history(self, count: int = 20) -> list[dict[str, Any]]:
        return self.state.history(count)

    def memory(self) -> dict[str, Any]:
        return self.demand.memory()

    # == operator actions (the caller's thread) =================================================
    def rollback(
        self, voice: str, to: str | None = None, why: str = "rollback requested", *, durable: bool = True
    ) -> dict[str, Any]:
        return self.control.rollback(voice, to, why, durable=durable)

    def activate(self, voice: str, version: str, why: str = "activate requested") -> dict[str, Any]:
        return self.control.activate(voice, version, why)

    def withdraw(self, voice: str, version: str, why: str, to: str | None = None) -> dict[str, Any]:
        return self.control.withdraw(voice, version, why, to)

    def remove(self, voice: str, why: str = "removed") -> dict[str, Any]:
        return self.removal.remove(voice, why)

    # == deciding ===============================================================================
    def start(self) -> None:
        """Restore what is known (saved state, then the store), look at the models dir, and bring
        every voice up: its saved active version (and canary), else the newest version that
        verifies. Returns when that is done. Folders still settling or incomplete (a voice
        converted or copied in just now) are waited for, briefly, so the daemon does not announce
        "no voice" a second before one serves."""
        for model in restore(self.state, self.store):
            self.table.add(model)
        self.lifecycle.marks.read()
        self.reconcile()
        deadline = time.monotonic() + 3 * self.policy.settle + 1.0
        while self.source.waiting() and time.monotonic() < deadline:
            time.sleep(min(0.2, max(self.policy.settle / 4, 0.02)))
            self.reconcile()
        for name in self.table.names():  # each voice had its chance to come back: one with nothing left goes
            if not self.jobs.busy(name) and self.map.active(name) is None and not self.source.waiting():
                self.lifecycle.forget_voice(name)  # (not while a folder still arrives: it may be this voice's)
        self.map.announce_default()
        for name in self.table.names():  # after every voice serves: not waited for
            if self.map.active(name) is not None and self.state.voice(name).previous:
                self._job(name, f"rollback targets of {name}", partial(self.promoter.stand_by, name))

    def retry_now(self) -> None:
        """Versions waiting after a system failure are retried at the next reconcile (SIGHUP), with
        their tries for lack of memory given back."""
        with self.table.locked():
            for model in self.table.all():
                model.retry_at, model.short_of_memory = 0.0, 0

    def reconcile(self, *, wait: bool = True) -> None:
        """Take the source's new verdicts and start the jobs they call for: the newest good new
        version of each voice (calling off an older upgrade still in progress), a retry of a
        deferred one, a fall-back for a voice with nothing serving. ``wait``: return when those
        jobs are done (start-up, tests); the daemon's rescans do not wait, so a newer folder can
        supersede an upgrade in progress. No one folder or version can stop the rest."""
        started: list[Future[None]] = []
        with self._scan_lock:
            ready: dict[str, list[tuple[ModelVersion, Path]]] = {}
            for candidate in self.source.scan():
                try:
                    model = self.intake.take(candidate, first_scan=self._first_scan)
                except Exception as exc:  # no one folder may stop the rest
                    self.lifecycle.unforeseen(candidate.path, exc)
                    continue
                if model is not None:
                    ready.setdefault(model.name, []).append((model, candidate.path))
            first, self._first_scan = self._first_scan, False
            if first:
                started += self._resume_saved()
            for name, found in sorted(ready.items()):
                started.append(self._upgrade(name, found, supersede=True))
            self._forget_vanished()
            now = time.monotonic()
            for name in self.table.names():
                if self.jobs.busy(name):
                    continue
                active = self.lifecycle.active(name)
                due = retry_due(self.table.of(name), active, now)
                if due is not None:
                    started.append(self._job(name, f"retry of {name} {due.version}", partial(self.promoter.retry, due)))
                elif self.map.active(name) is None and not any(m.state in COMING_UP for m in self.table.of(name)):
                    # (a voice parked by the memory budget is active: it loads on its next request)
                    started.append(self._job(name, f"fall-back of {name}", partial(self._fall_back, name)))
            self.lifecycle.save()
        if wait:
            for future in started:
                future.exception()  # each job logs its own failures

    def _resume_saved(self) -> list[Future[None]]:
        """At start-up: a job per voice whose saved active version (and canary) comes back."""
        saved = self.state.voices()
        pinned = self.demand.pinned([name for name, voice in saved.items() if voice.active])
        jobs = []
        for name, voice in sorted(saved.items()):
            if voice.active is None:
                continue
            model = self.table.get(name, voice.active)
            canary = self.table.get(name, voice.canary) if voice.canary else None
            if voice.canary and (
                canary is None
                or canary.state in (State.REFUSED, State.ROLLED_BACK)
                or self.lifecycle.marked(canary)
                or canary is model
            ):  # (a hand-edited or damaged state.json: none is saved so) ended, and said
                why = (
                    "unknown"
                    if canary is None
                    else "the active version"
                    if canary is model
                    else "rolled back"
                    if self.lifecycle.marked(canary)
                    else canary.state.value
                )
                log.warning("%s: the saved canary %s cannot resume (%s); it is ended", name, voice.canary, why)
                self.state.put(name, voice.but(canary=None))
                canary = None
            jobs.append(
                self._job(
                    name,
                    f"resume of {name}",
                    partial(self._resume, name, model, canary, pinned),
                )
            )
        return jobs

    # a job's work is called with its ticket; these two have no use for it
    def _fall_back(self, name: str, _ticket: Ticket) -> None:
        self.promoter.fall_back(name)

    def _resume(
        self, name: str, model: ModelVersion | None, canary: ModelVersion | None, pinned: set[str], _ticket: Ticket
    ) -> None:
        self.promoter.resume(name, model, canary, pinned)

    def _job(
        self,
        name: str,
        what: str,
        work: Callable[[Ticket], None],
        *,
        supersede: bool = False,
        on_skip: Callable[[], None] | None = None,
    ) -> Future[None]:
        """Start a job for voice ``name``: urgent when the voice has nothing serving."""
        future = self.jobs.start(
            name, what, work, urgent=self.map.active(name) is None, supersede=supersede, on_skip=on_skip
        )
        future.add_done_callback(lambda done: self._job_done(what, done))
        return future

    def _upgrade(self, name: str, found: list[tuple[ModelVersion, Path]], *, supersede: bool = False) -> Future[None]:
        """A job bringing up the newest of ``found`` that comes up (``Promoter.upgrade``)."""
        return self._job(
            name,
            f"upgrade of {name}",
            partial(self.promoter.upgrade, name, found),
            supersede=supersede,
            # called off before it ran (or at its first call): its versions leave "verifying"
            on_skip=partial(self.promoter.settle, found),
        )

    def _job_done(self, what: str, done: Future[None]) -> None:
        error = done.exception()
        if isinstance(error, Superseded):
            log.info("%s called off: %s", what, error)
        elif isinstance(error, TtsdError):
            log.error("%s failed: %s", what, error)
        elif error is not None:
            log.error("%s failed", what, exc_info=error)
        if self.source.waiting():  # a folder it met is still being copied in: look again soon
            self._wake()

    def _again(self, folder: Path) -> None:
        """A job could not act on ``folder`` (it changed, or vanished): the source looks again."""
        with self._scan_lock:
            self.source.again(folder)

    def _forget_vanished(self) -> None:
        """Versions seen only as a folder that is gone, and never stored, are forgotten; a version
        caught mid-check by its folder's deletion goes back to what it was. A voice with a job in
        progress is left to it (a copy made before the folder went still serves)."""
        present = self.source.present()
        self.table.keep_folders(present)
        for model in self.table.all():
            if model.folder is not None and model.folder not in present and not self.jobs.busy(model.name):
                self.lifecycle.forget_folder(model.folder)

    def _fit_budget_later(self) -> None:
        if self.budget.limited:
            self._spawn(self.demand.fit_budget)

    def stopping(self) -> None:
        """An orderly stop: a load it cuts short did not kill the process (``LoadMarks``)."""
        self.lifecycle.marks.clear()

    def close(self) -> None:
        """Unload everything (shutdown). Jobs still running are called off first."""
        for name in self.table.names():
            self.jobs.cancel(name, "shutting down")
        self.jobs.wait(timeout=10.0)
        self.stopping()
        self.lifecycle.close()
        self.state.trail.flush()  # what the last swaps left to write
        self.lifecycle.save()
