"""The operator's actions, ``ttsd rollback`` and ``ttsd activate`` (and the control routes), and the
automatic rollback of a new version that fails too often.

Neither waits behind background work. To a version that is loaded, an action is one short
transition: it calls off the voice's background job (an upgrade being hashed, copied or loaded:
that job then commits nothing) and swaps, under ``Lifecycle.commit`` only. To a version that is
not loaded, the action runs as an urgent job of its voice (``jobs.py``): it calls off a background
job of the voice instead of waiting for it, and is paced only lightly beside live requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConflictError, ResourceError, TtsdError, UnknownVoiceError
from .bringup import BringUp
from .jobs import Jobs
from .lifecycle import Lifecycle
from .state import ServingState, VoiceRecord
from .table import VersionTable
from .versions import COMING_UP, Listener, ModelVersion, State, norm

log = logging.getLogger("ttsd.manager")


class Control:
    def __init__(
        self,
        table: VersionTable,
        lifecycle: Lifecycle,
        bringup: BringUp,
        jobs: Jobs,
        state: ServingState,
        listener: Listener,
        restore: Callable[[ModelVersion, str], object] = lambda _model, _why: None,
    ) -> None:
        self.table, self.lifecycle, self.bringup, self.jobs = table, lifecycle, bringup, jobs
        self.state, self._listener = state, listener
        self._restore = restore  # the memory policy's: a version an action unloaded serves again

    # == rollback ===============================================================================
    def rollback(
        self,
        voice: str,
        to: str | None = None,
        why: str = "rollback requested",
        *,
        durable: bool = True,
        only_from: ModelVersion | None = None,
    ) -> dict[str, Any]:
        """Serve the previous (or ``to``) version at once and mark the current one rolled back.
        ``durable``: on disk before it happens (``ResourceError`` and no change when the state dir
        is full); automatic rollbacks pass False and are written when they can. ``only_from``: only
        if that version is the current one (``ConflictError`` otherwise): the automatic rollback
        judged that one, and another rollback may have landed since."""
        started = time.monotonic()
        if durable:
            self._recordable(voice)
        if only_from is None and (called_off := self._call_off_upgrade(voice, to, why, durable, started)) is not None:
            return called_off
        if only_from is None and (ended := self._end_canary(voice, to, why, durable, started)) is not None:
            return ended
        with self.lifecycle.commit:
            try:
                current, target = self._rollback_pair(voice, to)
            except _NothingBefore:
                if only_from is None and (called_off := self._call_off_coming(voice, why, durable, started)):
                    return called_off
                raise
            if only_from is not None and current is not only_from:
                raise ConflictError(f"{voice} {only_from.version} is not active any more")
            if self._loaded(target):
                rolled = self._roll(
                    current, target, why, durable, started, named=to is not None, operator=only_from is None
                )
                # once it happened (under commit: the upgrade's swap waits for it, then sees this)
                self.jobs.cancel(voice, f"rollback of {voice} to {target.version}")
                return rolled
            was_marked = self.lifecycle.marked(target)

        def load_then_roll(_ticket: object) -> dict[str, Any]:
            # the target named on disk before it loads, in the voice's job (one at a time, so a
            # second rollback's record waits for this one's end): killed while the target loads,
            # the daemon finishes the rollback when it restarts (``Promoter.resume``); with the
            # state dir full, ResourceError before anything loads. The version serving meanwhile
            # is marked at the swap, as before.
            with self.lifecycle.commit:
                now = self.lifecycle.active(voice)
                if now is not current:  # a job before this one changed it: nothing is loaded for a stale pair
                    raise ConflictError(
                        f"{voice} changed to {now.version if now else 'nothing'} before the rollback from "
                        f"{current.version} began; roll back again if it is still wanted"
                    )
                self._write(voice, self.state.voice(voice).but(rolling_to=target.version), durable)
            loaded: bool | None = None
            retired: ModelVersion | None = None
            cannot = f"cannot roll back to {voice} {target.version}"
            try:
                retired = self._retire_for(target, current, cannot)
                loaded = self._bring_up(target, why, cannot, checked=retired is not None)
                with self.lifecycle.commit:
                    if self.lifecycle.marked(target) and not was_marked:  # withdrawn while it loaded
                        if to is not None:  # the operator named it before the withdrawal: say so
                            raise ConflictError(f"{voice} {to} was withdrawn while it loaded for the rollback")
                        raise _TargetWithdrawn(f"{voice} {target.version} was withdrawn while it loaded")
                    if target.engine is None:  # taken down meanwhile (a withdrawal, the budget)
                        raise ConflictError(f"{voice} {target.version} was unloaded before the rollback; try again")
                    if retired is not None and self.lifecycle.active(voice) is None:
                        now_current = current  # out of service for this rollback (the memory policy)
                    else:
                        now_current, _ = self._rollback_pair(voice, target.version)
                    if now_current is not current:  # e.g. an urgent upgrade finished first: mark nothing
                        raise ConflictError(
                            f"{voice} changed to {now_current.version} while {target.version} loaded for the "
                            f"rollback from {current.version}; roll back again if it is still wanted"
                        )
                    rolled = self._roll(
                        current, target, why, durable, started, loaded, named=to is not None, operator=only_from is None
                    )
                    if retired is not None:  # no swap replaced it: the rollback marks it here
                        self.table.change(current, state=State.ROLLED_BACK)
                    return rolled
            except BaseException:
                if not self.lifecycle.closed:  # a shutdown's leaves it on disk: the restart finishes it
                    self._not_rolling(voice, target.version, durable)
                if loaded is not None:
                    self.lifecycle.discard(target, "loaded for a rollback that did not happen")
                if retired is not None and not self.lifecycle.closed:
                    self._bring_back(retired, target, "the rollback did not happen")
                raise

        self._wait_for_stand_by(voice, target)
        try:
            return self.jobs.start(
                voice,
                f"rollback of {voice} to {target.version}",
                load_then_roll,
                urgent=True,
                supersede=True,
                operator=True,
            ).result()
        except _TargetWithdrawn as exc:  # the withdrawal took it off the stack: the next one
            log.warning("%s; rolling back to the next version", exc)
            return self.rollback(voice, None, why, durable=durable, only_from=current)

    def _not_rolling(self, voice: str, version: str, durable: bool) -> None:
        """A rollback to ``version`` that did not happen is not under way any more: the record stops
        naming it (``rolling_to``), on disk as the rollback was when it can be."""
        with self.lifecycle.commit:
            now = self.state.voice(voice)
            if now.rolling_to is None or norm(now.rolling_to) != norm(version):
                return
            try:
                self._write(voice, now.but(rolling_to=None), durable)
            except ResourceError:  # the state dir is full: in memory now, on disk when it can be
                self.state.put(voice, now.but(rolling_to=None))

    def _call_off_upgrade(
        self, voice: str, to: str | None, why: str, durable: bool, started: float
    ) -> dict[str, Any] | None:
        """A rollback while ``--swap-policy memory``'s upgrade has the serving version unloaded
        (the voice serves nothing until it is done, so the upgrade is not called off as others
        are): the version it brings up is marked rolled back now, as a withdrawal marks it, so its
        swap does not happen and the version that served before is loaded again. Waits for that
        and answers as a rollback from the new version to it. None when there is no such upgrade
        (or ``to`` names another version): the rollback goes on as usual."""
        saved = self.state.voice(voice).active
        if (
            saved is None
            or self.lifecycle.active(voice) is not None
            or (to is not None and norm(to) != norm(saved))
            # only the upgrade that took the saved version out of service: one for a voice that
            # serves nothing for another reason (its version did not come back) is its way back
            or norm(self.lifecycle.retired(voice) or "") != norm(saved)
            or (ticket := self.jobs.retiring(voice)) is None
        ):
            return None
        with self.lifecycle.commit:  # the upgrade's swap checks the mark under it
            coming = next((m for m in self.table.of(voice) if norm(m.version) == ticket.target), None)
            if (
                coming is None
                or coming.state not in COMING_UP  # it failed: the old version is on its way back
                or self.lifecycle.active(voice) is not None
                or ticket.done.is_set()
            ):
                return None  # it swapped or ended meanwhile: a rollback from what serves now
            first = not ticket.rolled_back  # (a second rollback meanwhile waits for the same end)
            record = self.state.voice(voice).withdrawn(coming.version)
            self._write(voice, record, durable)
            ticket.rolled_back = True
            self.table.change(coming, reason=why)  # its job leaves it rolled back (Lifecycle.resting)
        log.warning(
            "%s: rollback from %s while it loads: its upgrade ends and %s loads again", voice, coming.version, saved
        )
        ticket.done.wait()
        now = self.lifecycle.active(voice)
        if first:
            self.state.record(voice, coming.version, now.version if now is not None else None, why)
            self._listener("rolled_back", coming)
        if now is None:
            before = self.table.get(voice, saved)
            raise ConflictError(
                f"{voice}: the upgrade to {coming.version} was called off, but {saved} did not come back"
                + (f": {before.reason}" if before is not None and before.reason else "")
            )
        return {
            "voice": voice,
            "from": coming.version,
            "to": now.version,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _end_canary(self, voice: str, to: str | None, why: str, durable: bool, started: float) -> dict[str, Any] | None:
        """A plain rollback (or one ``--to`` the active version) while a canary runs: the canary is
        what it undoes. The canary ends, marked rolled back (on disk first when ``durable``), and
        the active version serves every request again. None when the voice has no canary (or
        ``to`` names another version: that rollback ends the canary as it swaps, ``_roll``)."""
        with self.lifecycle.commit:
            active, canary = self.lifecycle.active(voice), self.lifecycle.canary(voice)
            if active is None or canary is None or (to is not None and norm(to) != norm(active.version)):
                return None
            record, _ = self._without_canary(voice, self.state.voice(voice), active)
            self._write(voice, record, durable)
            self.lifecycle.end_canary(canary, promote=False, why=why)
        return {
            "voice": voice,
            "from": canary.version,
            "to": active.version,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _without_canary(
        self, voice: str, record: VoiceRecord, target: ModelVersion
    ) -> tuple[VoiceRecord, ModelVersion | None]:
        """``record`` with the voice's canary ended and marked rolled back, when an operator's swap
        to ``target`` (another version) ends it; and that canary (None: there is none to end). Left
        running, a canary was later promoted over the operator's choice."""
        canary = self.lifecycle.canary(voice)
        if canary is None or canary is target:
            return record, None
        return record.marked(canary.version).but(canary=None), canary

    def _call_off_coming(self, voice: str, why: str, durable: bool, started: float) -> dict[str, Any] | None:
        """A plain rollback of a voice with no earlier version to go to, while an upgrade brings a
        new one up (being copied in, hashed or loaded): that upgrade is what it undoes. Its version
        is marked rolled back (on disk first when ``durable``), the job is called off and commits
        nothing. Under ``lifecycle.commit``. None when no upgrade is under way."""
        ticket = self.jobs.upgrading(voice)
        active = self.lifecycle.active(voice)
        if ticket is None or active is None:
            return None
        coming = next(
            (m for m in self.table.of(voice) if norm(m.version) == ticket.target and m.state in COMING_UP), None
        )
        if coming is None or coming is active:
            return None
        self._write(voice, self.state.voice(voice).marked(coming.version), durable)
        ticket.rolled_back = True  # the versions found with it are not taken up instead
        self.jobs.cancel(voice, why, version=ticket.target)  # its commit refuses a marked version too
        self.table.change(coming, reason=why)  # its job leaves it rolled back (Lifecycle.resting)
        self.state.record(voice, coming.version, active.version, why)
        log.warning("%s: rollback from %s while it is brought up: its upgrade is called off", voice, coming.version)
        self._listener("rolled_back", coming)
        return {
            "voice": voice,
            "from": coming.version,
            "to": active.version,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _recordable(self, voice: str) -> None:
        """``ResourceError`` (507) when the voice's record cannot be written now (the state dir is
        full), before the action calls anything off: an upgrade in progress was called off by a
        rollback that then could not be recorded, and its version was never tried again."""
        # only with a job to call off: the at-once swap to a loaded target writes its record once
        # (an fsync queued behind other writes is most of its time on a busy box)
        if voice in self.table.names() and self.jobs.busy(voice):  # (an unknown voice is refused further on)
            self.state.check_writable()

    def _write(self, voice: str, record: VoiceRecord, durable: bool) -> None:
        """``record`` becomes the voice's: on disk first when ``durable`` (``ResourceError``, 507,
        and no change when the state dir is full), else written when the disk allows."""
        if durable:
            self.state.commit(voice, record)
        else:
            self.state.put(voice, record)

    def _rollback_pair(self, voice: str, to: str | None) -> tuple[ModelVersion, ModelVersion]:
        if self.lifecycle.map.leaving(voice):
            raise ConflictError(f"{voice} is being removed")
        current = self.lifecycle.active(voice)
        if current is None:
            if self.state.voice(voice).active is not None and self.jobs.busy(voice):
                # the memory policy's upgrade has the serving version out of service
                raise ConflictError(
                    f"{voice} is being upgraded and serves nothing now; roll back once the upgrade ends"
                )
            raise UnknownVoiceError(f"voice {voice!r} has no active version to roll back from")
        if to is None:
            stack = [v for v in self.state.voice(voice).previous if norm(v) != norm(current.version)]
            if not stack:
                raise _NothingBefore(f"{voice} {current.version} has no previous version to roll back to")
            to = stack[-1]
        target = self.table.get(voice, to)
        if target is None:
            raise UnknownVoiceError(f"voice {voice} has no version {to}")
        if target is current:
            raise ConflictError(f"{voice} {to} is already active")
        return current, target

    def _roll(
        self,
        current: ModelVersion,
        target: ModelVersion,
        why: str,
        durable: bool,
        started: float,
        loaded: bool = False,
        *,
        named: bool = False,
        operator: bool = True,
    ) -> dict[str, Any]:
        """The rollback's swap (under ``commit``): ``current`` is marked rolled back; ``target``, if
        it was and ``named`` (``--to`` a version rolled back before, the operator's choice as
        ``activate`` is), is not any more: marked and active, a restart would not resume it."""
        record = self.state.voice(current.name)
        marked = [v for v in record.rolled_back if not named or norm(v) != norm(target.version)]
        record = record.but(rolled_back=marked if current.version in marked else (*marked, current.version))
        # an operator's rollback ends a canary too; an automatic one judged only the active version
        record, canary = self._without_canary(current.name, record, target) if operator else (record, None)
        reason = current.reason
        self.table.change(current, reason=why)
        try:
            swapped = self.lifecycle.activate(
                target,
                why,
                push_previous=False,
                previous_state=State.ROLLED_BACK,
                record=record,
                durable=durable,
                load_seconds=target.load_seconds if loaded else None,
            )
        except ResourceError:
            self.table.change(current, reason=reason)
            raise
        if canary is not None:
            self.lifecycle.end_canary(canary, promote=False, why=f"{why}: its canary ended")
        self._listener("rolled_back", current)
        return {
            "voice": current.name,
            "from": current.version,
            "to": target.version,
            "seconds": round(swapped - started, 3),
        }

    # == activate ===============================================================================
    def activate(self, voice: str, version: str, why: str = "activate requested") -> dict[str, Any]:
        """Serve any known version (clears a rolled-back mark; re-verified from the store)."""
        started = time.monotonic()
        target = self.table.get(voice, version)
        if target is None:
            if voice not in self.table.names():
                raise UnknownVoiceError(f"unknown voice {voice!r}")
            raise UnknownVoiceError(f"voice {voice} has no known version {version}")
        with self.lifecycle.commit:
            current = self.lifecycle.active(voice)
            if target is current:  # it serves already; a canary beside it ends (the operator chose this)
                ended = self._end_canary(voice, None, why, True, started)
                return ended or {"voice": voice, "from": version, "to": version, "seconds": 0.0}
        self._recordable(voice)  # (nothing to record above but a canary's end, itself refused when full)
        with self.lifecycle.commit:
            current = self.lifecycle.active(voice)
            if target is current:  # (served meanwhile)
                return {"voice": voice, "from": version, "to": version, "seconds": 0.0}
            if self._loaded(target):
                switched = self._switch(target, current, why, started)
                self.jobs.cancel(voice, f"activate of {voice} {version}")  # once it happened, as above
                return switched
            was_marked = self.lifecycle.marked(target)

        def load_then_switch(_ticket: object) -> dict[str, Any]:
            cannot = f"cannot activate {voice} {version}"
            if self.table.get(voice, version) is not target:  # ``ttsd models remove``'s job came first
                raise UnknownVoiceError(f"{voice} {version} was removed before it could load")
            loaded, retired = False, None
            try:
                retired = self._retire_for(target, self.lifecycle.active(voice), cannot)
                loaded = self._bring_up(target, why, cannot, checked=retired is not None)
                with self.lifecycle.commit:
                    if self.lifecycle.marked(target) and not was_marked:  # the operator did not choose that
                        raise ConflictError(f"{voice} {version} was withdrawn while it loaded for the activate")
                    if target.engine is None:  # taken down meanwhile (a withdrawal, the budget)
                        raise ConflictError(f"{voice} {version} was unloaded before the activate; try again")
                    return self._switch(target, self.lifecycle.active(voice) or retired, why, started, loaded)
            except BaseException:
                if loaded:  # not one that stood by already (the restart's load of it, waited for)
                    self.lifecycle.discard(target, "loaded for an activate that did not happen")
                if retired is not None and not self.lifecycle.closed:
                    self._bring_back(retired, target, "the activate did not happen")
                raise

        self._wait_for_stand_by(voice, target)
        return self.jobs.start(
            voice, f"activate of {voice} {version}", load_then_switch, urgent=True, supersede=True, operator=True
        ).result()

    def _wait_for_stand_by(self, voice: str, target: ModelVersion) -> None:
        """The restart's load of rollback targets (``Promoter.stand_by``) is loading ``target``:
        it becomes urgent, so the action waits for it rather than calling it off and loading the
        same version again from the start; it loads no further targets."""
        loading = self.jobs.current(voice)
        if loading is not None and loading.stands_by and loading.target == norm(target.version):
            loading.make_urgent()

    def _switch(
        self, target: ModelVersion, current: ModelVersion | None, why: str, started: float, loaded: bool = False
    ) -> dict[str, Any]:
        record = self.state.voice(target.name)
        record = record.but(rolled_back=[v for v in record.rolled_back if norm(v) != norm(target.version)])
        record, canary = self._without_canary(target.name, record, target)
        swapped = self.lifecycle.activate(
            target, why, record=record, load_seconds=target.load_seconds if loaded else None
        )
        if canary is not None:
            self.lifecycle.end_canary(canary, promote=False, why=f"{why}: its canary ended")
        return {
            "voice": target.name,
            "from": current.version if current else None,
            "to": target.version,
            "seconds": round(swapped - started, 3),
        }

    # == withdraw ==============================================================================
    def withdraw(self, voice: str, version: str, why: str, to: str | None = None) -> dict[str, Any]:
        """``version`` may never serve again by itself, whatever it is doing now (a fleet mirror
        withdrew it). Active: rolled back (to ``to``, or the previous version). A canary: ended,
        rolled back. Loading for an upgrade: called off. Standby, available, or not yet seen here:
        marked rolled back and dropped from the rollback targets, so no rollback, fallback or
        rescan brings it back; only ``ttsd activate`` serves it again. Durable before it returns.
        Doing it again changes nothing."""
        if voice not in self.table.names():  # nothing is recorded for a voice this daemon has never had
            raise UnknownVoiceError(f"unknown voice {voice!r}")
        key = norm(version)
        with self.lifecycle.commit:
            active, canary = self.lifecycle.active(voice), self.lifecycle.canary(voice)
            if active is not None and norm(active.version) == key:
                done = None
            else:
                ended = canary is not None and norm(canary.version) == key
                record = self.state.voice(voice).withdrawn(version)
                record = record.but(canary=None if ended else record.canary)
                # on disk before anything changes: ResourceError (507) and no change when the
                # state dir is full, so the fleet client does not take the folder away unrecorded
                self.state.commit(voice, record)
                if canary is not None and ended:
                    self.lifecycle.end_canary(canary, promote=False, why=why)
                # only the jobs bringing it up: an upgrade to another version goes on (its commit
                # refuses a version marked meanwhile, so one that learns its target later is safe)
                self.jobs.cancel(voice, f"{voice} {version} withdrawn", version=key)
                model = self.table.get(voice, version)
                if model is not None:
                    # one a job is bringing up keeps its state and its engine (the store keeps its
                    # copy, and the job's end frees what it loaded and leaves it rolled back:
                    # ``Lifecycle.resting``); the reason says why
                    coming_up = model.state in COMING_UP and self.jobs.busy(voice)
                    self.table.change(model, state=model.state if coming_up else State.ROLLED_BACK, reason=why)
                    if not coming_up:
                        self.lifecycle.unload(model)
                self.lifecycle.save()
                if not ended:
                    self.state.record(voice, version, None, why)
                    if model is not None:
                        self._listener("rolled_back", model)
                if model is not None:
                    self._listener("withdrawn", model)  # ttsd_model_transitions_total{event="withdrawn"}
                done = {"voice": voice, "withdrawn": version, "active": active.version if active else None}
        if done is not None:
            return done
        assert active is not None  # done is None only when the withdrawn version is the active one
        try:
            result = self.rollback(voice, to, why, only_from=active)
        except ConflictError:
            if self.lifecycle.active(voice) is active:
                raise
            return self.withdraw(voice, version, why, to)  # another swap came first: mark it where it is now
        self._listener("withdrawn", active)  # ttsd_model_transitions_total{event="withdrawn"}
        return {"voice": voice, "withdrawn": version, "active": result["to"], "from": result["from"]}

    # == automatic ==============================================================================
    def auto_rollback(self, model: ModelVersion, why: str) -> None:
        """A new active version failed too many of its first requests: back to the one before."""
        try:
            if self.lifecycle.active(model.name) is model:  # checked again under the lock: only_from
                self.rollback(model.name, why=why, durable=False, only_from=model)
                log.error("%s %s rolled back: %s", model.name, model.version, why)
        except TtsdError as exc:
            if self.lifecycle.active(model.name) is model:  # else another rollback got there first
                log.error("%s %s is failing (%s) but cannot roll back: %s", model.name, model.version, why, exc)

    # == helpers ================================================================================
    def _loaded(self, model: ModelVersion) -> bool:
        return model.engine is not None and self.lifecycle.map.loaded(model.key)

    def _bring_up(self, target: ModelVersion, why: str, cannot: str, *, checked: bool = False) -> bool:
        """Load ``target`` for an action (in the action's urgent job): whether it was loaded now;
        ``ConflictError`` saying why it cannot serve. ``checked``: its store copy and signature
        were checked just now (``_retire_for``)."""
        if target.engine is not None:
            return False
        self.bringup.ensure_stored(target)
        if not self.bringup.bring_up(target, why, verified=checked, signed=checked):
            raise ConflictError(f"{cannot}: {target.reason}")
        return True

    def _bring_back(self, retired: ModelVersion, target: ModelVersion, why: str) -> None:
        """An action under the memory policy did not happen: ``target`` goes (a swap that could not
        be recorded left it standing by, loaded) before ``retired`` loads again."""
        if target.engine is not None and self.lifecycle.active(target.name) is not target:
            self.lifecycle.unload(target)
            if target.engine is None and target.state is State.STANDBY:
                self.table.change(target, state=self.lifecycle.resting(target))
        self._restore(retired, why)

    def _retire_for(self, target: ModelVersion, current: ModelVersion | None, cannot: str) -> ModelVersion | None:
        """Under ``--swap-policy memory`` (a box that cannot hold two versions; none stands by) the
        serving version ``current`` goes out of service and is unloaded before ``target`` loads, as
        for an upgrade: loaded beside it, a rollback or an activate held both. ``target``'s store
        copy and signature are checked first, so one that cannot serve never takes the voice down
        (``ConflictError``). The version taken out (None: none was); the caller restores it if the
        action does not happen."""
        if self.lifecycle.policy.swap != "memory" or current is None or current.engine is None or target.engine:
            return None
        self.bringup.ensure_stored(target)
        if not self.bringup.checked(target):
            raise ConflictError(f"{cannot}: {target.reason}")
        self.lifecycle.retire_now(current)
        return current


class _NothingBefore(ConflictError):
    """A plain rollback of a voice whose active version has no earlier one to go back to."""


class _TargetWithdrawn(ConflictError):
    """A rollback's target (the previous version, loading) was withdrawn before the swap."""
