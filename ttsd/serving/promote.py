"""What the manager's jobs do to make a version serve: an upgrade, a fall-back, a retry, a resume.

Each function here is the body of one job (``jobs.py``): it runs on the job's thread with the
job's ``Ticket``, does the slow work through ``BringUp`` and commits through ``Lifecycle``, which
commits nothing for a job called off meanwhile. The decisions themselves (which version, in what
order) come from ``policy.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ResourceError, TtsdError, VerifyError, is_system_oserror, resource_error
from ..manifest import read_manifest
from .bringup import BringUp
from .demand import OnDemand
from .lifecycle import Lifecycle
from .pacing import Superseded, Ticket
from .policy import fallback_order, newer
from .state import ServingState, VoiceRecord
from .store import content_id
from .table import VersionTable
from .versions import ModelVersion, Policy, State, norm, order

log = logging.getLogger("ttsd.manager")


class Promoter:
    def __init__(
        self,
        table: VersionTable,
        lifecycle: Lifecycle,
        bringup: BringUp,
        demand: OnDemand,
        state: ServingState,
        policy: Policy,
        again: Callable[[Path], None],
        requeue: Callable[[str, list[tuple[ModelVersion, Path]]], object] = lambda _name, _found: None,
    ) -> None:
        self.table, self.lifecycle, self.bringup, self.demand = table, lifecycle, bringup, demand
        self.state, self.policy, self._again, self._requeue = state, policy, again, requeue

    # == a new version in the models dir ========================================================
    def upgrade(self, name: str, found: list[tuple[ModelVersion, Path]], ticket: Ticket) -> None:
        """Bring up the newest of the new versions ``found`` that is newer than the active one and
        comes up; the others stay available (copied in and hashed only when they are needed)."""
        folders = {id(model): folder for model, folder in found}
        try:
            for model in newer([m for m, _ in found], self.lifecycle.active(name)):
                if ticket.rolled_back:  # an operator rolled back from the one it tried: no other
                    return
                active = self.lifecycle.active(name)  # a job before this one may have changed it
                if (active is not None and order(model) <= order(active)) or self.lifecycle.marked(model):
                    continue  # older than what serves now, or withdrawn while this job waited
                try:
                    if self.promote(model, folders[id(model)], "new version in the models dir", ticket):
                        return
                except Superseded:
                    # withdrawn: the job is called off, not the others (an operator's rollback
                    # from it ends the upgrade: the voice goes back to what served before)
                    if self.lifecycle.marked(model) and not ticket.rolled_back:
                        rest = [
                            (m, f)
                            for m, f in found
                            if m is not model
                            and not self.lifecycle.marked(m)
                            and m.state not in (State.REFUSED, State.DEFERRED)  # tried: judged, or waiting
                        ]
                        if rest:
                            self._requeue(name, rest)  # a job of their own, after this one
                    raise
        finally:
            self.settle(found)

    def settle(self, found: list[tuple[ModelVersion, Path]]) -> None:
        """The versions an upgrade was given that are still "verifying" (older folders found at
        start-up, or all of them when the upgrade was called off before it ran) are available
        again, or rolled back if marked meanwhile."""
        for model, _ in found:
            if model.state is State.VERIFYING:
                resting = self.lifecycle.resting(model)
                self.table.change(model, state=resting, reason="" if resting is State.AVAILABLE else model.reason)

    def promote(self, model: ModelVersion, folder: Path, why: str, ticket: Ticket) -> bool:
        """Copy ``model`` into the store (hashing it: the one time its bytes are read from the
        models dir), load and warm it beside the serving version, then swap (or start a canary).
        The memory policy unloads the serving version only once the copy is made and checked, so
        a folder that does not match its manifest never takes the voice down."""
        ticket.target = norm(model.version)  # a withdrawal of this version calls the job off
        try:
            if self.lifecycle.marked(model):  # withdrawn before the job knew its target
                raise Superseded(f"{model.name} {model.version} was withdrawn")
            # coming up from here on: the store's prune (a swap's settle, on a thread of its own)
            # leaves its copy alone. A version handed on by a withdrawn upgrade, or retried, was
            # "available", and its fresh copy was pruned as stale between copying and loading
            self.table.change(model, state=State.VERIFYING)
            if not self.bringup.store_new(model, folder, self._again):
                return False
            ticket.check()
            # the memory policy checks the signature before the serving version goes
            retiring = self.policy.swap == "memory" and self.lifecycle.active(model.name) is not None
            if retiring and not self.bringup.check_signed(model):
                return False
            with self.lifecycle.commit:  # a withdrawal marks under it: seen here, or by the swap's check
                if self.lifecycle.marked(model):
                    raise Superseded(f"{model.name} {model.version} was withdrawn")
                previous = self.lifecycle.active(model.name)
                was_loaded = previous is not None and previous.engine is not None
                # retired only when its signature was checked first (a version an operator made
                # active just now loads beside it, this once)
                retire = retiring and previous is not None
                # under the memory policy the voice serves nothing until this is done: no rollback
                # calls it off from here on (one that did first: nothing is unloaded yet)
                if retire and not ticket.make_urgent():
                    raise Superseded(str(ticket.cancelled))
        except Superseded as exc:  # called off while it was copied in, hashed or checked
            self.lifecycle.discard(model, f"not serving: its upgrade was called off ({exc})")
            raise
        retired = None
        if retire and previous is not None:
            self.lifecycle.retire_now(previous)
            retired = previous
        try:
            # put() hashed the copy it made; the memory policy checked its signature before retiring
            if not self.bringup.bring_up(model, why, verified=True, signed=retired is not None):
                return self._restore(retired)
            if self.policy.canary_share(model.name) > 0 and previous is not None and retired is None:
                self.lifecycle.start_canary(model, ticket)
                return True
            try:
                self.lifecycle.activate(
                    model,
                    why,
                    ticket=ticket,
                    load_seconds=model.load_seconds,
                    retired=retired is not None,
                    on_trial=True,
                )
            except ResourceError as exc:  # the swap could not be recorded: it does not happen yet
                self.lifecycle.unload(model)
                self.lifecycle.defer(model, str(exc))
                return self._restore(retired)
        except Superseded as exc:
            self.lifecycle.discard(model, f"not serving: its upgrade was called off ({exc})")
            self._restore(retired, "the upgrade was called off")
            raise
        except Exception as exc:  # unforeseen, with the serving version perhaps out of service
            self.lifecycle.discard(model, f"not serving: its upgrade failed ({type(exc).__name__}: {exc})")
            self._restore(retired)
            raise
        self.table.change(model, backoff=0.0)
        self.demand.park_if_cold(model, was_loaded)
        return True

    def _restore(self, retired: ModelVersion | None, why: str = "the upgrade failed") -> bool:
        """After a failed upgrade under the memory policy (or one withdrawn while it loaded, the
        one way an urgent upgrade is called off), or an operator's action that unloaded the serving
        version for its target (``Control``): the version it unloaded serves again."""
        if (
            retired is not None
            and retired.engine is None
            and self.lifecycle.active(retired.name) is None  # else an operator's action serves one
            and not (
                self.bringup.bring_up(retired, f"reloaded: {why}") and self._serve(retired, why, push_previous=False)
            )
        ):
            self.fall_back(retired.name)  # it failed to load again, or was withdrawn meanwhile
        return False

    restore = _restore  # for ``Control``: an operator's action under the memory policy

    def _serve(
        self,
        model: ModelVersion,
        why: str,
        *,
        push_previous: bool = True,
        vacant: bool = True,
        record: VoiceRecord | None = None,
        on_trial: bool = False,
    ) -> bool:
        """Make ``model``, chosen before it loaded and loaded now, active (with its voice's record
        made from ``record`` when given); False (and what was loaded goes) when a rollback or a
        fleet withdrawal marked it meanwhile, or (``vacant``: it was chosen for a voice serving
        nothing) an operator's action served a version since."""
        try:
            self.lifecycle.activate(
                model,
                why,
                push_previous=push_previous,
                durable=False,
                load_seconds=model.load_seconds,
                unmarked=True,
                vacant=vacant,
                record=record,
                on_trial=on_trial,
            )
        except Superseded as exc:
            self.lifecycle.discard(model, f"not serving: {exc}")
            return False
        return True

    # == a voice with nothing serving ===========================================================
    def fall_back(self, name: str, for_request: bool = False) -> None:
        """A voice with no active version (its saved one is damaged or gone, or the state was
        lost) serves the newest version that verifies and loads, from the store or the models
        dir. Rolled-back and refused versions are not taken; ones waiting to retry are, when due.
        Within a memory budget it stays loaded only if a request waits for it or it is preloaded."""
        options = fallback_order(self.table.of(name), self.state.voice(name).rolled_back, time.monotonic())
        for model in options:
            if self.lifecycle.closed:  # shutting down: nothing more is loaded
                return
            if self.lifecycle.active(name) is not None:  # an operator's action served one meanwhile
                return
            try:
                self.bringup.ensure_stored(model)
            except TtsdError as exc:  # its folder changed or the disk is full: try again later
                self.lifecycle.defer(model, str(exc))
                continue
            for _ in range(2):
                loaded = model.engine is not None and self.lifecycle.map.loaded(model.key)  # a standby: no 2nd load
                served = (loaded or self.bringup.bring_up(model, "the voice had no active version")) and self._serve(
                    model, "fallback: newest version that verifies"
                )
                if served or not loaded or model.engine is not None:
                    break
                if self.lifecycle.closed or self.lifecycle.marked(model) or self.lifecycle.active(name) is not None:
                    break
                # the standby was unloaded before it could serve (another voice's load made room in
                # the memory budget): it is still the newest that verifies, so it loads after all
            if served:
                log.warning("%s: serving %s, the newest version that verifies", name, model.version)
                self.demand.park_if_cold(model, was_loaded=for_request)
                return

    # == a version that failed for the box's reasons ============================================
    def retry(self, model: ModelVersion, ticket: Ticket) -> None:
        """A new version that failed for a system reason (disk full while storing it, out of
        memory while loading) is tried again when its back-off is over, or at once after SIGHUP
        or when its folder changes."""
        source = model.folder
        if source is None:
            return
        log.info("retrying %s %s (%s)", model.name, model.version, model.reason)
        try:
            manifest = read_manifest(source)
            if content_id(manifest) != model.content:
                raise VerifyError(f"{source} changed since it was checked")
        except (TtsdError, OSError) as exc:
            if isinstance(exc, OSError) and is_system_oserror(exc):
                self.lifecycle.defer(model, str(resource_error(exc, "reading it")))
            else:
                self.lifecycle.refuse(model, str(exc))
            return
        self.table.change(model, manifest=manifest)
        self.promote(model, source, "retried after a system failure", ticket)

    # == start-up ===============================================================================
    def resume(self, name: str, model: ModelVersion | None, canary: ModelVersion | None, pinned: set[str]) -> None:
        """At start-up: the voice's saved active version comes back (re-copied from the models dir
        if its store copy is damaged), and its canary with it; one that cannot come back is logged
        and the voice falls back. Within a memory budget only preloaded voices load now; the others
        come back parked."""
        saved = self.state.voice(name).active
        if model is not None and self.state.voice(name).rolling_to is not None and self._finish_rollback(model, canary):
            return
        if model is None or model.state in (State.REFUSED, State.ROLLED_BACK) or self.lifecycle.marked(model):
            if model is None:
                log.warning("%s %s was active but is not known any more; choosing again", name, saved)
            elif model.state is State.REFUSED:
                log.warning("%s %s was active but is refused (%s); choosing again", name, saved, model.reason)
            else:
                log.warning("%s %s was active but is marked rolled back; choosing again", name, saved)
            self.fall_back(name)
            if self.lifecycle.active(name) is None and not self.lifecycle.closed:
                log.error(
                    "%s serves nothing: no version of it may serve (%s); 'ttsd activate' serves one anyway",
                    name,
                    "; ".join(f"{m.version} {m.state.value}" for m in self.table.of(name)[:5]) or "none known",
                )
            return
        try:
            self.bringup.ensure_stored(model)
        except TtsdError as exc:
            log.warning("%s %s was active but cannot be restored (%s); choosing again", name, saved, exc)
            return self.fall_back(name)
        if self.demand.budget.limited and name not in pinned:
            self.demand.activate_cold(model)
        elif not (
            self.bringup.bring_up(model, "resumed after restart") and self._serve(model, "restart", push_previous=False)
        ):
            return self.fall_back(name)
        if canary is None:
            return
        if order(canary) <= order(model):  # none starts so: a hand-edited or damaged state.json
            log.warning(
                "%s %s was saved as the canary beside %s, which is not older: the canary is ended",
                name,
                canary.version,
                model.version,
            )
            self.state.put(name, self.state.voice(name).but(canary=None))
            return
        self._resume_canary(canary)

    def stand_by(self, name: str, ticket: Ticket) -> None:
        """After a restart: the voice's most recent rollback targets (``keep`` of them) load again
        and stand by, as they did before it, so ``ttsd rollback`` swaps at once rather than
        loading first. A background job, after the voice serves: an upgrade or an operator's
        action calls it off. Not within a memory budget (rollback targets load on demand there)
        or under ``--swap-policy memory`` (none is kept loaded)."""
        if self.demand.budget.limited or self.policy.swap == "memory" or self.policy.keep <= 0:
            return
        active = self.lifecycle.active(name)
        if active is None:
            return
        ticket.stands_by = True
        for version in reversed(self.state.voice(name).previous[-self.policy.keep :]):
            ticket.check()
            if ticket.urgent:  # a rollback waits for the target it just loaded: no more
                return
            model = self.table.get(name, version)
            if model is None or model is active or model.state is not State.AVAILABLE or self.lifecycle.marked(model):
                continue
            ticket.target = norm(model.version)  # a rollback to it waits for this load (``Control.rollback``)
            try:
                self.bringup.ensure_stored(model)
                if self.bringup.bring_up(model, "a rollback target, loaded again after a restart"):
                    self.lifecycle.stand_by(model)
            except Superseded:
                self.lifecycle.discard(model, "its load as a rollback target was called off")
                raise
            except TtsdError as exc:
                log.warning("%s %s cannot stand by as a rollback target: %s", name, version, exc)

    def _finish_rollback(self, model: ModelVersion, canary: ModelVersion | None) -> bool:
        """At start-up, when the daemon stopped while a rollback from ``model`` (the saved active
        version) loaded its target (``Control.rollback`` names it in the record first): the
        rollback happens now, as its swap would have made it, ``model`` marked rolled back and a
        canary beside it ended. True when the target serves; False when it cannot (unknown,
        refused, marked: withdrawn meanwhile, or named though rolled back before, which the record
        cannot tell apart; or it does not come up): the record forgets the rollback and the voice
        resumes ``model``, as a failed rollback leaves it."""
        name, record = model.name, self.state.voice(model.name)
        target = self.table.get(name, record.rolling_to or "")
        why = f"rollback to {record.rolling_to}, finished after a restart"
        if target is None or target is model or target.state is State.REFUSED or self.lifecycle.marked(target):
            target = None
        else:
            try:
                self.bringup.ensure_stored(target)
            except TtsdError as exc:
                log.warning("%s: %s cannot be restored (%s)", name, why, exc)
                target = None
        if target is not None and self.bringup.bring_up(target, why):
            finished = record.marked(model.version)
            ended = canary if canary is not None and canary is not target else None
            if ended is not None:  # an operator's rollback ends it
                finished = finished.marked(ended.version).but(canary=None)
            was = [(m, m.state, m.reason) for m in (model, ended) if m is not None]
            self.table.change(model, state=State.ROLLED_BACK, reason=why)  # before the swap saves the states
            if ended is not None:
                self.table.change(ended, state=State.ROLLED_BACK, reason=f"{why}: its canary ended")
            if self._serve(target, why, push_previous=False, record=finished):
                log.warning("%s: %s (from %s, which is rolled back)", name, why, model.version)
                self.lifecycle.notify("rolled_back", model)
                if ended is not None:
                    self.state.record(name, ended.version, target.version, f"{why}: its canary ended")
                    self.lifecycle.notify("rolled_back", ended)
                self.demand.park_if_cold(target, was_loaded=False)  # within a budget: loaded if preloaded
                return True
            for m, state, reason in was:
                self.table.change(m, state=state, reason=reason)
        log.warning(
            "%s: the rollback from %s under way when ttsd stopped cannot finish; %s serves again",
            name,
            model.version,
            model.version,
        )
        self.state.put(name, self.state.voice(name).but(rolling_to=None))
        return False

    def _resume_canary(self, canary: ModelVersion) -> None:
        """The canary in progress when the daemon stopped takes its share again, so each user
        hears the same version as before the restart (the share decides who: ``user_point``).
        With no canary share now, the version is promoted, as a new version would be."""
        name = canary.name
        try:
            self.bringup.ensure_stored(canary)
        except TtsdError as exc:
            log.warning("%s %s was a canary but cannot be restored (%s)", name, canary.version, exc)
            return
        if not self.bringup.bring_up(canary, "canary resumed after restart"):
            self.state.put(name, self.state.voice(name).but(canary=None))
            return
        if self.policy.canary_share(name) > 0:
            try:
                self.lifecycle.start_canary(canary, unmarked=True)
            except Superseded as exc:  # withdrawn while it loaded
                self.lifecycle.discard(canary, f"not serving: {exc}")
                self.state.put(name, self.state.voice(name).but(canary=None))
        else:
            self._serve(canary, "canary resumed with no canary share: promoted", vacant=False, on_trial=True)
