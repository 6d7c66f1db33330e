"""The transitions that change what serves: the swap, canaries, verdicts, and taking versions down.

Each is short and serialized on ``commit`` (a voice's record written to ``state.json`` and one
reference replaced in the ``ServingMap``); none hashes, copies or loads. Slow work happens before,
in a job (``jobs.py``), which calls a transition here to commit its result, passing its
``Ticket``: a job called off meanwhile (a rollback, a newer version) commits nothing.

* ``activate``: the swap. One reference replaced in the map, then what stays loaded is trimmed
  (``keep``), the replaced version becomes a rollback target, and the store is pruned;
* ``start_canary`` / ``end_canary``: a new version on a share of requests, then promoted or
  rolled back; the canary is part of the voice's saved record, so a restart resumes it;
* ``refuse`` (the version's fault) and ``defer`` (the box's: retried after a back-off);
* ``unload``: out of the map once no request holds it, then the engine is freed; never on the
  thread of the request whose release asked for it (``unload_later``).

Threads: any. Lock order: ``commit``, then the table's, then the map's.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConflictError, ResourceError
from .load_marks import LoadMarks
from .loader import unload_engine
from .pacing import Guard, Superseded, Ticket
from .policy import MEMORY_TRIES, backoff, beyond_keep
from .serving_map import ServingMap, VoiceVersion
from .source import fingerprint
from .state import ServingState, VersionRecord, VoiceRecord
from .store import ModelStore
from .table import VersionTable
from .versions import COMING_UP, NOT_ON_TRIAL, Key, Listener, ModelVersion, Policy, State, norm, order, parsed

log = logging.getLogger("ttsd.manager")
STORE_KEEP = 3  # rollback targets kept in the store besides the active version


class Lifecycle:
    def __init__(
        self,
        table: VersionTable,
        serving: ServingMap,
        state: ServingState,
        store: ModelStore,
        policy: Policy,
        listener: Listener,
        spawn: Callable[[Callable[[], None]], None],
        fit_budget: Callable[[], None],
    ) -> None:
        self.table, self.map, self.state, self.store, self.policy = table, serving, state, store, policy
        self._listener, self._spawn, self._fit_budget = listener, spawn, fit_budget
        self.commit = Guard(threading.RLock())
        self.closed = False  # set by close(): a job that loaded something after that commits nothing
        # voice -> the version the memory policy's upgrade took out of service (retire_now), until
        # the voice's next swap: the one replaced, whichever version that swap serves
        self._retired: dict[str, str] = {}
        # versions whose engine is being freed now (``unload``, outside the locks): set when done
        self._freeing: dict[Key, threading.Event] = {}
        self.marks = LoadMarks(state.root)  # loads the process may not live through

    def retired(self, name: str) -> str | None:
        """The version the memory policy's upgrade took out of service (``retire_now``) for
        ``name``, until the voice's next swap."""
        return self._retired.get(name)

    def forget_retired(self, name: str) -> None:
        """Voice ``name`` was removed: no version of it is out of service for an upgrade."""
        self._retired.pop(name, None)

    def active(self, name: str) -> ModelVersion | None:
        return self.table.by_key(self.map.active(name))

    def canary(self, name: str) -> ModelVersion | None:
        return self.table.by_key(self.map.canary(name))

    @staticmethod
    def voice_version(model: ModelVersion) -> VoiceVersion:
        assert model.engine is not None
        return VoiceVersion(model.name, model.version, model.engine.sample_rate)

    # == the swap ===============================================================================
    def activate(
        self,
        model: ModelVersion,
        why: str,
        *,
        ticket: Ticket | None = None,
        push_previous: bool = True,
        previous_state: State = State.STANDBY,
        record: VoiceRecord | None = None,
        durable: bool = True,
        load_seconds: float | None = None,
        unmarked: bool = False,
        retired: bool = False,
        vacant: bool = False,
        on_trial: bool = False,
    ) -> float:
        """Make ``model`` (loaded) its voice's active version; the monotonic time of the swap.

        ``durable`` (operator actions, new versions): the voice's new record (``record``, or one
        made here) is written to ``state.json`` first, and if that fails nothing changes and
        ``ResourceError`` says why. Otherwise (resuming, automatic rollbacks and canary results,
        which must not wait for disk space) the swap happens and the record is written when it can.
        ``Superseded`` when ``ticket`` was called off. ``load_seconds``: what bringing it up for this
        swap took, for the audit trail (None: nothing was loaded for it). ``unmarked`` (a version chosen
        before it loaded, as a job's is): ``Superseded`` if it was rolled back or withdrawn meanwhile.
        ``retired``: the memory policy took the voice's active version out of service for this swap
        (``retire_now``), so nothing is active now, yet that version is the one replaced: it becomes
        the rollback target as a replaced version does. ``vacant`` (a fall-back, a restart's resume,
        the memory policy's restore: chosen for a voice that served nothing): ``Superseded`` if it
        serves a version now (an operator's activate of a loaded version swaps at once, beside
        the job). ``on_trial`` (an upgrade's swap, a canary's promotion): its first requests decide
        an auto-rollback (``NOT_ON_TRIAL``)."""
        with self.commit:
            self._still_wanted(model, ticket, unmarked)
            if (retired or vacant) and self.map.active(model.name) is not None:  # an operator's action served one since
                raise Superseded(f"{model.name} serves another version now")
            if model.engine is None:  # unloaded before it could serve (the budget, a withdrawal): not served
                raise Superseded(f"{model.name} {model.version} was unloaded before it could serve")
            saved = self.state.voice(model.name)
            voice = record or saved
            previous = self.active(model.name)
            stack = list(voice.previous)
            # an operator's swap while the memory policy's upgrade has the serving version out of
            # service replaces that version too (it was dropped from the stack, and its store copy
            # pruned, when only the upgrade's own swap counted it)
            out = self.table.get(model.name, saved.active) if saved.active is not None else None
            retired = retired or (
                out is not None
                and norm(self._retired.get(model.name, "")) == norm(out.version)
                and out.state is not State.REFUSED  # (it failed to load again: no rollback target)
            )
            if (
                push_previous
                and saved.active is not None
                and norm(saved.active) != norm(model.version)
                and (previous is not None or retired)
                and previous_state is State.STANDBY
                and norm(saved.active) not in {norm(v) for v in voice.rolled_back}  # withdrawn meanwhile
            ):
                stack = [v for v in stack if v != saved.active] + [saved.active]
            # a canary is a newer version beside the active one: one not newer than what serves
            # now ends (the memory policy's upgrade activates over a running canary). An operator's
            # swap (``record``) ends the canary itself, as a rollback, after this
            outrun = self.canary(model.name) if record is None else None
            outrun = outrun if outrun is not None and outrun is not model and order(outrun) <= order(model) else None
            voice = voice.but(
                active=model.version,
                previous=[v for v in stack if norm(v) != norm(model.version)],
                canary=None if voice.canary and parsed(voice.canary) <= parsed(model.version) else voice.canary,
                rolling_to=None,  # whatever serves now ends a rollback under way (``Control.rollback``)
            )
            if durable:
                try:
                    self.state.commit(model.name, voice)
                except ResourceError:
                    if model.state in COMING_UP:  # loaded and unharmed: a rollback target
                        self.table.change(model, state=State.STANDBY)
                        self.map.add(model.key, self.voice_version(model), model.engine)
                    raise
            else:
                self.state.put(model.name, voice)
            self.map.add(model.key, self.voice_version(model), model.engine)
            self._retired.pop(model.name, None)
            with self.table.locked():
                replaced = self.map.activate(model.key)  # new requests get the new version from here on
                swapped = time.monotonic()
                model.state, model.requests, model.failures = State.ACTIVE, 0 if on_trial else NOT_ON_TRIAL, 0
                before = self.table.by_key(replaced)
                # a parked version a request is loading keeps its state until that load ends (which
                # then leaves it as it should be, ``unpark``); marked rolled back now, the store
                # would prune its copy mid-load
                if before is not None and before is not model and before.state not in COMING_UP:
                    # a parked version (the memory budget's) is a rollback target that must load first
                    before.state = (
                        State.AVAILABLE if before.engine is None and previous_state is State.STANDBY else previous_state
                    )
                if outrun is not None:
                    self.map.end_canary(model.name)
                    outrun.state = State.RETIRED
                standby = [m for m in self.table.of(model.name) if m.state is State.STANDBY]
                for extra in beyond_keep(standby, self.policy.keep):
                    extra.state = State.RETIRED
                to_unload = [
                    m
                    for m in self.table.of(model.name)
                    if m.engine is not None and m.state in (State.RETIRED, State.ROLLED_BACK)
                ]
        details = {"load_seconds": round(load_seconds, 2)} if load_seconds is not None else {}
        self.state.record(model.name, saved.active, model.version, why, write=False, **details)
        if saved.active is not None and norm(saved.active) == norm(model.version):
            log.info("%s: %s serves again (%s)", model.name, model.version, why)
        else:
            log.info("%s: %s -> %s (%s)", model.name, saved.active or "-", model.version, why)
        self._listener("activated", model)
        if outrun is not None:
            log.info("%s %s: canary superseded by %s", model.name, outrun.version, model.version)
            self.state.record(model.name, outrun.version, model.version, f"{why}: its canary ended", write=False)
        for m in to_unload:  # freeing memory is not part of the swap: off this path
            self.unload_later(m)
        self._fit_budget()  # the replaced version, now a rollback target, is the first to go
        # off the swap's path too: the audit line and the versions' records (the voice's record,
        # the one that must survive a crash, was committed above), and removing a store copy. Each
        # fsync queues behind whatever else the disk is writing (an upgrade's copy into the store):
        # measured up to 0.12 s for a rollback's answer when they ran here
        self._spawn(lambda: self._settle(model.name))
        return swapped

    def _still_wanted(self, model: ModelVersion, ticket: Ticket | None, unmarked: bool) -> None:
        """Under ``commit``, before a job's commit: ``Superseded`` if the job was called off, or if
        its version was rolled back or withdrawn meanwhile (with a ticket, or ``unmarked``). An
        urgent job (a request waits for it, or the memory policy unloaded the serving version for
        it) is never called off, and a fall-back or a restart's resume has no ticket, so a
        withdrawal that landed while they loaded is only seen here; the version is then marked
        rolled back again, as the withdrawal left it (loading had moved it on). An operator's
        ``ttsd activate`` and ``rollback --to`` are not checked: they may serve a marked version.
        After ``close`` nothing commits, nor for a voice being removed."""
        if self.closed:  # a job that outlived the shutdown's wait: what it loaded goes
            raise Superseded("ttsd is shutting down")
        if self.map.leaving(model.name):  # ``removal.py``: only an operator's swap of a loaded version gets here
            raise ConflictError(f"{model.name} is being removed")
        if self.table.by_key(model.key) is not model:  # a job's version, removed before it could serve: discarded
            raise Superseded(f"{model.name} {model.version} was removed")
        if ticket is None and not unmarked:
            return
        if ticket is not None:
            ticket.check()
        if self.marked(model):
            self.table.change(model, state=State.ROLLED_BACK, reason="rolled back or withdrawn while it loaded")
            raise Superseded(f"{model.name} {model.version} was rolled back or withdrawn while it loaded")

    def notify(self, event: str, model: ModelVersion) -> None:
        """Tell the listener (metrics, the status page's events) of a transition made elsewhere."""
        self._listener(event, model)

    def marked(self, model: ModelVersion) -> bool:
        """Whether ``model``'s version is marked rolled back (a rollback or a fleet withdrawal) in
        its voice's record, whatever its state says now."""
        return norm(model.version) in {norm(v) for v in self.state.voice(model.name).rolled_back}

    def resting(self, model: ModelVersion) -> State:
        """The state of a version that stops coming up or serving: rolled back if it is marked (a
        withdrawal that landed while a job loaded it, whose state changes had covered the mark:
        the status said "available", and the fleet client withdrew it again at every run), else
        available."""
        return State.ROLLED_BACK if self.marked(model) else State.AVAILABLE

    def _settle(self, name: str) -> None:
        self.state.trail.flush()
        self.save()
        self.prune_store(name)

    # == canaries ===============================================================================
    def start_canary(self, model: ModelVersion, ticket: Ticket | None = None, *, unmarked: bool = False) -> None:
        """``model`` takes the canary share of its voice's requests; a canary it supersedes (a
        newer version arrived before the old canary ended) is retired and unloaded."""
        with self.commit:
            self._still_wanted(model, ticket, unmarked)
            if model.engine is None:  # unloaded before it could serve (the budget, a withdrawal): not served
                raise Superseded(f"{model.name} {model.version} was unloaded before it could serve")
            self.map.add(model.key, self.voice_version(model), model.engine)
            self.state.put(model.name, self.state.voice(model.name).but(canary=model.version))
            with self.table.locked():
                superseded = self.canary(model.name)
                model.state, model.requests, model.failures = State.CANARY, 0, 0
                self.map.set_canary(model.key)
                if superseded is not None and superseded is not model:
                    superseded.state = State.RETIRED
        self.save()
        if superseded is not None and superseded is not model:
            log.info("%s %s: canary superseded by %s", model.name, superseded.version, model.version)
            self.unload_later(superseded)
        log.info(
            "%s %s is a canary for %.0f%% of requests",
            model.name,
            model.version,
            self.policy.canary_share(model.name) * 100,
        )
        self._listener("canary", model)

    def end_canary(self, model: ModelVersion, promote: bool, why: str | None = None) -> None:
        """Promote a canary that passed its requests, or roll back one that failed one (or was
        withdrawn: ``why``)."""
        with self.commit:
            if self.map.canary(model.name) != model.key:
                return
            if promote:
                self.activate(model, f"canary passed {model.requests} requests", durable=False, on_trial=True)
                return
            with self.table.locked():
                self.map.end_canary(model.name)
                model.state = State.ROLLED_BACK
                model.reason = why or f"failed {model.failures} of {model.requests} canary requests"
            self.state.put(model.name, self.state.voice(model.name).marked(model.version).but(canary=None))
        active = self.active(model.name)
        self.state.record(
            model.name,
            model.version,
            active.version if active else None,
            "canary failed" if why is None else why,
            reason=model.reason,
        )
        self.save()
        log.error("%s %s canary ended: %s", model.name, model.version, model.reason)
        self._listener("rolled_back", model)
        self.unload(model)  # now, or when its last request ends
        # its store copy goes too (it stayed until the voice's next swap: eight failed canaries in
        # a row of the built-in voice held 480 MB); one still serving a request goes at the next
        self._spawn(lambda: self.prune_store(model.name))

    def unpark(self, model: ModelVersion) -> bool:
        """A parked active version (the memory budget's) was loaded for requests: it serves again.
        False, and what was loaded goes, when the voice moved on meanwhile (a rollback, an
        upgrade)."""
        with self.commit:
            if self.map.active(model.name) == model.key and model.engine is not None:
                with self.table.locked():
                    model.state = State.ACTIVE
                    self.map.add(model.key, self.voice_version(model), model.engine)
                return True
        self.discard(model, "loaded for requests, but its voice serves another version now")
        self.table.change(model, state=self.resting(model))
        return False

    # == verdicts ===============================================================================
    def refuse(self, model: ModelVersion, reason: str, folder: Path | None = None, *, its_files: bool = True) -> None:
        """The version cannot serve, and its store copy is dropped unless it is in use. With
        ``folder`` and ``its_files``: that folder's files fail (missing, unlisted, a checksum, a
        copy never completed), and it is judged again once the folder changed (its fingerprint),
        also after a restart. Otherwise its content or its version fails (loading, warm-up, not
        newer than the active one): refused for good under this content."""
        # the folder as it was judged: one mended while it was hashed has changed since, and is judged again
        mark = (model.seen or fingerprint(folder)) if folder is not None and its_files else None
        with self.table.locked():
            model.state, model.reason, model.refused_folder = State.REFUSED, reason, mark
            if folder is not None:
                self.table.see_folder(folder, "refused", reason)
            drop = model.store_copy is not None and model.engine is None and not self.map.in_flight(model.key)
            aside = None
            if drop:
                model.store_copy = None
                # moved out under the lock, deleted after it, as the prune does: a copy of the same
                # version made meanwhile is never the one being deleted
                aside = self.store.set_aside(model.name, model.version)
        log.warning("refused %s %s: %s", model.name, model.version, reason)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self.state.record(model.name, None, model.version, "refused", reason=reason)
        self._listener("refused", model)

    def defer(self, model: ModelVersion, reason: str, *, short_of_memory: bool = False) -> None:
        """The version could not come up for a reason of the box's (disk full, I/O error, out of
        memory) or its store copy was damaged with no intact folder to copy again: not the
        version's fault, so it is retried after a back-off. A version whose load ran out of memory
        ``MEMORY_TRIES`` times in a row is not retried by itself while another version of its voice
        serves (``retry_due``: each try risks the kernel's OOM killer, and under the memory policy
        takes the voice out of service while it loads), only on SIGHUP, ``ttsd activate``, or
        once its folder changes."""
        with self.table.locked():
            model.short_of_memory = model.short_of_memory + 1 if short_of_memory else 0
            model.backoff = backoff(model.backoff)
            model.retry_at = time.monotonic() + model.backoff
            if model.short_of_memory >= MEMORY_TRIES:
                when = (
                    f"it ran out of memory {model.short_of_memory} times in a row: retried on SIGHUP, "
                    f"or in {model.backoff:.0f} s if its voice has nothing else to serve"
                )
            else:
                when = f"retried in {model.backoff:.0f} s or on SIGHUP"
            model.state, model.reason = State.DEFERRED, f"{reason} ({when})"
        log.error("%s %s cannot come up now: %s", model.name, model.version, model.reason)
        self.state.record(model.name, None, model.version, "deferred", reason=reason)
        self._listener("deferred", model)

    def forget_folder(self, folder: Path) -> None:
        """The check of ``folder`` did not finish (it vanished, or no check foresaw an error): its
        version forgets the folder and leaves the transient states (a voice must never look "being
        upgraded" forever)."""
        with self.table.locked():
            gone = []
            for model in self.table.all():
                if model.folder != folder:
                    continue
                model.folder = None
                if _nowhere(model):
                    gone.append(model)
                elif model.state in (State.INCOMPLETE, State.VERIFYING):
                    model.state = State.AVAILABLE
            self._forget(gone)

    def unforeseen(self, folder: Path, exc: BaseException) -> None:
        """An error no check foresaw while looking at ``folder``: its version goes back to what it
        was, and the folder is refused until it changes (one traceback, not one per rescan)."""
        log.error("checking %s failed; refused until it changes", folder, exc_info=exc)
        self.forget_folder(folder)
        self.table.see_folder(folder, "refused", f"could not be checked: {type(exc).__name__}: {exc}"[:500])

    # == taking down ============================================================================
    def stand_by(self, model: ModelVersion) -> bool:
        """``model``, loaded again after a restart, becomes its voice's rollback target as it was
        before (``standby``): only while another version of the voice serves and ``model`` is still
        among the ``keep`` most recent versions before it, not marked; else what was loaded goes
        (``discard``). Whether it stands by."""
        with self.commit:
            active = self.active(model.name)
            recent = {norm(v) for v in self.state.voice(model.name).previous[-self.policy.keep :]}
            wanted = (
                model.engine is not None
                and model.state in COMING_UP
                and active is not None
                and active is not model
                and norm(model.version) in recent
                and not self.marked(model)
            )
            if wanted:
                assert model.engine is not None
                self.table.change(model, state=State.STANDBY, reason="")
                self.map.add(model.key, self.voice_version(model), model.engine)
        if not wanted:
            self.discard(model, "not kept as a rollback target: the voice changed while it loaded")
        return wanted

    def discard(self, model: ModelVersion, why: str) -> None:
        """A job that brought ``model`` up was called off before it committed: what it loaded goes,
        and the version is available again (``why`` says why it is not serving)."""
        with self.table.locked():
            engine = model.engine if not self.map.loaded(model.key) else None
            if engine is not None:
                model.engine = None
                freed = self.freeing(model.key)
            if model.state in COMING_UP:
                model.state, model.reason = self.resting(model), why
        if engine is not None:
            self.free(model.key, engine, freed)
        log.info("%s %s: %s", model.name, model.version, why)

    def freeing(self, key: Key) -> threading.Event:
        """Under the lock that takes an engine off its version: its memory is being freed from now
        on, until ``free`` is done (a memory-policy swap waits for that: ``retire_now``)."""
        freed = self._freeing[key] = threading.Event()
        return freed

    def free(self, key: Key, engine: Any, freed: threading.Event) -> None:
        """Free ``engine`` outside the locks, then say so to whoever waits (``freeing``). The
        engine is off its version already: one whose ``unload`` fails is logged and dropped, and
        the swap, rollback or eviction that freed it goes on (raised, it stopped a memory-policy
        upgrade with the voice out of service)."""
        try:
            unload_engine(engine)
        except Exception:
            log.exception("%s %s: freeing its engine failed; its memory may not come back", *key)
        finally:
            freed.set()
            if self._freeing.get(key) is freed:
                del self._freeing[key]

    def retire_now(self, model: ModelVersion, wait: float = 30.0) -> None:
        """Memory policy: take the old version out of service and unload it before loading."""
        with self.table.locked():
            if self.map.active(model.name) == model.key:
                self.map.deactivate(model.name)
            model.state = State.RETIRED
            self._retired[model.name] = model.version
        deadline = time.monotonic() + wait
        while self.map.in_flight(model.key) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.unload(model, force=True)
        # its last request's release may have begun freeing it on a thread of its own: the load
        # that follows waits for that (it began while the old engine was still being freed)
        freeing = self._freeing.get(model.key)
        if freeing is not None:
            freeing.wait(wait)
        self.table.change(model, state=self.resting(model))

    def unload_later(self, model: ModelVersion) -> None:
        """``unload`` on a thread of its own: freeing an engine (collecting it, trimming malloc)
        takes tens of ms and must never hold up a request's answer or the event loop."""
        self._spawn(lambda: self.unload(model))

    def unload(self, model: ModelVersion, *, force: bool = False) -> None:
        """Unload ``model`` unless a request still holds it (its last release calls back). Under
        ``commit``, as the budget's eviction is: an operator's swap back to a version whose last
        request is just ending (a rollback ``--to`` it, an activate) checks that it is loaded and
        serves it under that lock, and found its engine gone between the two (state.json said it
        served while the old version went on serving)."""
        with self.commit, self.table.locked():
            if not force and model.state in (State.ACTIVE, State.CANARY):
                return  # serving again: re-activated after this unload was asked for
            if not self.map.remove(model.key, force=force):
                return
            engine, model.engine = model.engine, None
            if model.state is State.RETIRED:
                model.state = self.resting(model)
            freed = self.freeing(model.key) if engine is not None else threading.Event()
        if engine is not None:
            self.free(model.key, engine, freed)
            log.info("%s %s unloaded", model.name, model.version)
            self._listener("unloaded", model)

    def close(self) -> None:
        with self.commit:
            self.closed = True
        for model in [m for m in self.table.all() if m.engine is not None]:
            self.unload(model, force=True)
        self.map.clear()

    # == persistence ============================================================================
    def save(self) -> None:
        """Write every version's record (best effort: retried at the next call when the disk is
        full; transitions that must not be lost went through ``ServingState.commit``). A version
        still coming up keeps the record it had (a new one gets none yet): after a crash mid-load
        it is judged again, never taken for one that was judged."""
        records = {}
        with self.table.locked():
            for model in self.table.all():
                if model.content and model.state not in (*COMING_UP, State.INCOMPLETE):
                    records[f"{model.name}/{model.version}"] = VersionRecord(
                        model.content,
                        model.state.value,
                        model.reason,
                        model.refused_folder if model.state is State.REFUSED else None,
                    )
        self.state.set_versions(records)
        self.state.save()

    def prune_store(self, name: str) -> None:
        """Keep store copies only of what can serve soon: the active version, loaded ones, the
        canary, and the most recent rollback targets. Others drop back to their models-dir folder;
        one whose folder is gone can never serve again, and is forgotten."""
        voice = self.state.voice(name)
        keep = {norm(v) for v in voice.previous[-STORE_KEEP:]} | {norm(v) for v in (voice.active, voice.canary) if v}
        with self.table.locked():
            stale = [
                m
                for m in self.table.of(name)
                if m.store_copy is not None
                and m.engine is None
                and not self.map.in_flight(m.key)
                and m.state not in (State.CANARY, *COMING_UP)
                and norm(m.version) not in keep
            ]
            for m in stale:
                m.store_copy = None
            self._forget([m for m in stale if _nowhere(m)])
            # moved out under the lock, deleted after it: a job copying the same version in again
            # meanwhile never sees its files vanish (it was refused for a missing file)
            aside = [self.store.set_aside(m.name, m.version) for m in stale]
        for path in aside:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    def forget_voice(self, name: str) -> bool:
        """Voice ``name`` leaves the table and ``state.json`` when nothing of it is left: no
        folder in the models dir, no store dir (``STATE/store/NAME``), nothing loaded or coming
        up: its folders and its store dir were deleted while the daemon was stopped, the way to
        remove a voice (docs/operating.md). A voice whose copies were damaged keeps its store dir
        and stays, listed as serving nothing. Its rollback marks stay, so a rolled-back version
        dropped in again is still not served by itself. True if it was forgotten."""
        if os.path.lexists(self.store.root / name):
            return False
        with self.table.locked():
            models = self.table.of(name)
            if not models or any(
                m.folder is not None or m.store_copy is not None or m.engine is not None or m.state in COMING_UP
                for m in models
            ):
                return False
            for m in models:
                self.table.drop(m)
        self.state.forget_versions(f"{m.name}/{m.version}" for m in models)
        marks = self.state.voice(name).rolled_back
        self.state.drop(name, keep=VoiceRecord(rolled_back=marks) if marks else None)
        self.state.save()
        log.info(
            "%s: none of its versions is in the models dir or the store: the voice is forgotten%s",
            name,
            f" (its rollback marks stay: {', '.join(marks)})" if marks else "",
        )
        return True

    def _forget(self, models: list[ModelVersion]) -> None:
        """Versions that can never serve again (no store copy, no folder, not loaded) leave the
        table and ``state.json`` (under the table's lock). Refusals and rollbacks stay on record."""
        for m in models:
            self.table.drop(m)
            if m.content:
                log.info("%s %s forgotten: it is neither in the store nor in the models dir", m.name, m.version)
        self.state.forget_versions(f"{m.name}/{m.version}" for m in models)


def _nowhere(model: ModelVersion) -> bool:
    """Neither stored, nor a folder, nor loaded, and nothing to remember it by: it can never serve
    again."""
    return (
        model.store_copy is None
        and model.folder is None
        and model.engine is None
        and model.state in (State.AVAILABLE, State.INCOMPLETE, State.VERIFYING, State.DEFERRED)
    )
