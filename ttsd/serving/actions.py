"""Changing what serves: bringing a version up, the swap itself, the actions that ask for one,
and taking versions down.

* bringing up (``_bring_up``): verify the store copy, then the loader loads and warms the engine;
  a failure refuses the version (its own fault) or defers it (the box's);
* the swap (``_activate``): one reference replaced in the ``ServingMap``, then what stays loaded
  is trimmed (``keep``) and the store pruned;
* taking down (``_unload``): out of the map once no request holds it, then unloaded (within a
  memory budget, ``demand.py`` unloads idle voices too);
* operator actions (``rollback``, ``activate``), from ``ttsd rollback``/``activate`` or the
  control routes, on a fresh loader thread;
* automatic ones: an auto-rollback when a new version fails too many of its first requests, and
  the end of a canary (promoted, or rolled back at its first failure).

``OperatorActions`` is the ``ModelManager``'s half that changes what serves; the manager's own
module decides what comes up. Same threads and locks as the manager (see ``manager.py``).
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

from ..engines import engine_class
from ..errors import (
    ConflictError,
    ResourceError,
    SignatureError,
    TtsdError,
    UnknownVoiceError,
    is_system_oserror,
    resource_error,
)
from ..malloc import resident_bytes
from ..manifest import read_manifest
from ..signing import describe as describe_signature
from ..signing import signature_digest
from .loader import (
    StoreLost,
    check_store_copy,
    load_engine,
    lower_thread_priority,
    unload_engine,
)
from .serving_map import Served
from .state import VoiceRecord
from .store import content_id
from .versions import COMING_UP, ModelVersion, State, norm, order

if TYPE_CHECKING:
    from .manager import ModelManager

log = logging.getLogger("ttsd.manager")
STORE_KEEP = 3  # rollback targets kept in the store besides the active version


class OperatorActions:
    # == operator actions (loader threads) ======================================================
    def rollback(self: ModelManager, voice: str, to: str | None = None, why: str = "rollback requested", *,
                 durable: bool = True) -> dict[str, Any]:
        """Serve the previous (or ``to``) version at once and mark the current one rolled back.
        ``durable``: on disk before it happens (``ResourceError`` and no change when the state dir
        is full); automatic rollbacks pass False and are written when they can."""
        with self._load_lock:
            current = self._active(voice)
            if current is None:
                raise UnknownVoiceError(f"voice {voice!r} has no active version to roll back from")
            record = self.state.voice(voice).copy()
            if to is None:
                stack = [v for v in record.previous if norm(v) != norm(current.version)]
                if not stack:
                    raise ConflictError(f"{voice} {current.version} has no previous version to roll back to")
                to = stack[-1]
            target = self._versions.get((voice, norm(to)))
            if target is None:
                raise UnknownVoiceError(f"voice {voice} has no version {to}")
            if target is current:
                raise ConflictError(f"{voice} {to} is already active")
            started = time.monotonic()
            self._ensure_stored(target)
            if target.engine is None and not self._bring_up(target, why):
                raise ConflictError(f"cannot roll back to {voice} {to}: {target.reason}")
            if current.version not in record.rolled_back:
                record.rolled_back.append(current.version)
            reason, current.reason = current.reason, why
            try:
                swapped = self._activate(target, why, push_previous=False, previous_state=State.ROLLED_BACK,
                                         record=record, durable=durable)
            except ResourceError:
                current.reason = reason
                raise
            self._listener("rolled_back", current)
            return {"voice": voice, "from": current.version, "to": target.version,
                    "seconds": round(swapped - started, 3)}

    def activate(self: ModelManager, voice: str, version: str, why: str = "activate requested") -> dict[str, Any]:
        """Serve any known version (clears a rolled-back mark; re-verified from the store)."""
        with self._load_lock:
            target = self._versions.get((voice, norm(version)))
            if target is None:
                raise UnknownVoiceError(f"voice {voice} has no known version {version}")
            current = self._active(voice)
            if target is current:
                return {"voice": voice, "from": version, "to": version, "seconds": 0.0}
            started = time.monotonic()
            self._ensure_stored(target)
            if target.engine is None and not self._bring_up(target, why):
                raise ConflictError(f"cannot activate {voice} {version}: {target.reason}")
            record = self.state.voice(voice).copy()
            record.rolled_back = [v for v in record.rolled_back if norm(v) != norm(version)]
            swapped = self._activate(target, why, record=record)
            return {"voice": voice, "from": current.version if current else None, "to": target.version,
                    "seconds": round(swapped - started, 3)}

    def _ensure_stored(self: ModelManager, target: ModelVersion) -> None:
        """A version known only from the models dir is copied into the store first, hashed on the
        way (a damaged store copy is dealt with by ``_bring_up``). ``ResourceError`` when the box
        cannot take the copy now."""
        if target.engine is not None or target.store is not None:
            return
        if target.source is None:
            raise UnknownVoiceError(f"{target.name} {target.version} is neither in the store nor on disk")
        try:
            manifest = read_manifest(target.source)
            if target.content and content_id(manifest) != target.content:
                raise ConflictError(f"{target.source} changed since it was checked")
            target.store = self.store.put(target.source, manifest)
            target.manifest = manifest
        except OSError as exc:
            if is_system_oserror(exc):
                raise resource_error(exc, f"copying {target.name} {target.version} into the store") from exc
            raise ConflictError(f"cannot serve {target.name} {target.version}: {exc}") from exc
        except TtsdError as exc:
            raise ConflictError(f"cannot serve {target.name} {target.version}: {exc}") from exc

    # == bringing up and taking down ============================================================
    def _check_signature(self: ModelManager, model: ModelVersion) -> None:
        """With trusted keys, the store copy (just verified against its manifest) must be signed by
        one of them, over exactly its files; ``SignatureError`` says why not. The models-dir
        folder's signature is tried when the copy's fails: one added after the copy was made counts,
        a junk one beside a good copy does not."""
        assert model.store is not None and model.manifest is not None
        if self.trust is None:  # shown as unverified, as what it claims
            claimed = describe_signature(model.store)
            model.signer = str(claimed) if claimed is not None else ""
            return
        trust, store, manifest = self.trust, model.store, model.manifest
        try:
            try:
                signer = trust.check(store, manifest)
            except SignatureError:
                # the folder in the models dir may hold a newer signature (signed again, a key rotated)
                offered = self.store.offer_signature(model.source, store, lambda: trust.check(store, manifest)) \
                    if model.source is not None else None
                if offered is None:
                    raise
                signer = offered
        except SignatureError as exc:
            model.refused_signature = signature_digest(model.source) if model.source is not None else ""
            model.signature_failure = exc.kind
            self._listener("signature_refused", model)
            raise
        model.signer = str(signer)
        model.refused_signature, model.signature_failure = None, ""
        log.info("%s %s: signed by %s", model.name, model.version, model.signer)

    def _bring_up(self: ModelManager, model: ModelVersion, why: str, *, verified: bool = False,
                  urgent: bool = False) -> bool:
        """Verify the store copy (copying it again from the models dir if it is damaged), load and
        warm up, at low CPU priority beside live requests. A failure of the version's own refuses
        it; one of the box's (or a damaged copy with nothing to copy again) defers it.
        ``verified``: the caller has just made the store copy from hashed bytes (``put``).
        ``urgent``: a request waits for this load, so it keeps its thread's CPU priority (still on
        one core and yielding the GIL while others are served)."""
        started = time.monotonic()
        if not urgent:
            lower_thread_priority(self.policy.loader_nice)
        self._make_room(model)  # within a memory budget: idle voices are unloaded first
        try:
            model.state = State.VERIFYING
            if not verified:
                check_store_copy(self.store, model)
            assert model.store is not None and model.manifest is not None
            self._check_signature(model)
            model.state = State.LOADING
            self._listener("loading", model)
            engine_class(model.manifest.engine)  # imported first: torch's own start-up is no voice's cost
            before = resident_bytes()
            engine = load_engine(model.store, model.manifest, self.engine_options, serving=self.map.serving,
                                 warming=lambda: setattr(model, "state", State.WARMING))
            model.rss = max(0, resident_bytes() - before)  # what it costs, for the budget's next choices
        except Exception as exc:  # TtsdError says why; anything else is the engine crashing
            if isinstance(exc, (StoreLost, MemoryError, ResourceError)) or is_system_oserror(exc):
                self._defer(model, str(exc) if isinstance(exc, TtsdError) else str(resource_error(exc, "loading")))
            else:
                self._refuse(model, str(exc) if isinstance(exc, TtsdError) else f"{type(exc).__name__}: {exc}")
            return False
        model.engine, model.reason = engine, ""
        model.load_seconds = time.monotonic() - started
        log.info("%s %s loaded and warmed in %.2f s (%s)", model.name, model.version, model.load_seconds, why)
        self._listener("loaded", model)
        return True


    def _restore_after_failure(self: ModelManager, previous: ModelVersion | None) -> bool:
        if previous is not None and self.policy.swap == "memory" and previous.engine is None \
                and self._bring_up(previous, "reloaded after a failed upgrade"):
            self._activate(previous, "the upgrade failed", push_previous=False, durable=False)
        return False


    def _unload(self: ModelManager, model: ModelVersion, *, force: bool = False) -> None:
        """Unload ``model`` unless a request still holds it (its last release calls back here)."""
        with self._lock:
            if not force and model.state in (State.ACTIVE, State.CANARY):
                return  # serving again: re-activated after this unload was asked for
            if not self.map.remove(model.key, force=force):
                return
            engine, model.engine = model.engine, None
            if model.state is State.RETIRED:
                model.state = State.AVAILABLE
        if engine is not None:
            unload_engine(engine)
            log.info("%s %s unloaded", model.name, model.version)
            self._listener("unloaded", model)

    def close(self: ModelManager) -> None:
        with self._lock:
            models = [m for m in self._versions.values() if m.engine is not None]
        for model in models:
            self._unload(model, force=True)
        self.map.clear()

    def _served(self: ModelManager, model: ModelVersion) -> Served:
        assert model.engine is not None
        return Served(model.name, model.version, model.engine.sample_rate)

    # == automatic actions ======================================================================
    def _auto_rollback(self: ModelManager, model: ModelVersion, why: str) -> None:
        try:
            if self._active(model.name) is model:
                self.rollback(model.name, why=why, durable=False)
                log.error("%s %s rolled back: %s", model.name, model.version, why)
        except TtsdError as exc:
            log.error("%s %s is failing (%s) but cannot roll back: %s", model.name, model.version, why, exc)

    def _start_canary(self: ModelManager, model: ModelVersion) -> None:
        """``model`` takes the canary share of its voice's requests; a canary it supersedes (a
        newer version arrived before the old canary ended) is retired and unloaded."""
        self.map.add(model.key, self._served(model), model.engine)  # type: ignore[arg-type]
        with self._lock:
            superseded = self._versions.get(self.map.canary(model.name) or ("", ""))
            model.state, model.requests, model.failures = State.CANARY, 0, 0
            self.map.set_canary(model.key)
            if superseded is not None and superseded is not model:
                superseded.state = State.RETIRED
        if superseded is not None and superseded is not model:
            log.info("%s %s: canary superseded by %s", model.name, superseded.version, model.version)
            self._spawn(lambda: self._unload(superseded))
        log.info("%s %s is a canary for %.0f%% of requests", model.name, model.version,
                 self.policy.canary_share(model.name) * 100)
        self._listener("canary", model)

    def _end_canary(self: ModelManager, model: ModelVersion, promote: bool) -> None:
        with self._load_lock:
            if self.map.canary(model.name) != model.key:
                return
            if promote:
                self._activate(model, f"canary passed {model.requests} requests", durable=False)
                return
            with self._lock:
                self.map.end_canary(model.name)
                model.state = State.ROLLED_BACK
            self.state.voice(model.name).rolled_back.append(model.version)
            model.reason = f"failed {model.failures} of {model.requests} canary requests"
            active = self._active(model.name)
            self.state.record(model.name, model.version, active.version if active else None, "canary failed",
                              reason=model.reason)
            self._save()
            log.error("%s %s canary ended: %s", model.name, model.version, model.reason)
            self._listener("rolled_back", model)
            self._unload(model)  # now, or when its last request ends

    # == the swap ===============================================================================
    def _activate(self: ModelManager, model: ModelVersion, why: str, *, push_previous: bool = True,
                  previous_state: State = State.STANDBY, record: VoiceRecord | None = None,
                  durable: bool = True) -> float:
        """The swap: one reference replaced in the map, then trim what stays loaded. Returns the
        monotonic time of the swap.

        ``durable`` (operator actions, new versions): the voice's new record (``record``, or one
        made here) is written to ``state.json`` first, and if that fails nothing changes and
        ``ResourceError`` says why. Otherwise (resuming, automatic rollbacks and canary results,
        which must not wait for disk space) the swap happens and the record is written when it can.
        """
        assert model.engine is not None
        voice = (record or self.state.voice(model.name)).copy()
        old = self.state.voice(model.name).active
        previous = self._active(model.name)
        if push_previous and old is not None and old != model.version and previous is not None \
                and previous_state is State.STANDBY:
            voice.previous = [v for v in voice.previous if v != old] + [old]
        voice.previous = [v for v in voice.previous if v != model.version]
        voice.active = model.version
        if durable:
            try:
                self.state.commit(model.name, voice)
            except ResourceError:
                if model.state in COMING_UP:
                    model.state = State.STANDBY  # loaded and unharmed: a rollback target
                    self.map.add(model.key, self._served(model), model.engine)
                raise
        else:
            self.state.voices[model.name] = voice
        self.map.add(model.key, self._served(model), model.engine)
        to_unload: list[ModelVersion] = []
        with self._lock:
            replaced = self.map.activate(model.key)  # new requests get the new version from here on
            swapped = time.monotonic()
            model.state, model.requests, model.failures = State.ACTIVE, 0, 0
            previous = self._versions.get(replaced) if replaced else None
            if previous is not None and previous is not model:
                # a parked version (the memory budget's) is a rollback target that must load first
                previous.state = State.AVAILABLE if previous.engine is None and previous_state is State.STANDBY \
                    else previous_state
            standby = sorted((m for m in self._versions.values()
                              if m.name == model.name and m.state is State.STANDBY), key=order, reverse=True)
            for extra in standby[self.policy.keep:]:
                extra.state = State.RETIRED
            to_unload = [m for m in self._versions.values() if m.name == model.name and m.engine is not None
                         and m.state in (State.RETIRED, State.ROLLED_BACK)]
        self.state.record(model.name, old, model.version, why, load_seconds=round(model.load_seconds, 2))
        self._save()
        log.info("%s: %s -> %s (%s)", model.name, old or "-", model.version, why)
        self._listener("activated", model)
        for m in to_unload:  # freeing memory is not part of the swap: do it off this path
            self._spawn(lambda m=m: self._unload(m))
        self._fit_budget()  # the replaced version, now a rollback target, is the first to go
        self._prune_store(model.name)
        return swapped

    def _prune_store(self: ModelManager, name: str) -> None:
        """Keep store copies only of what can serve soon: the active version, loaded ones, and the
        most recent rollback targets. Others drop back to their models-dir folder, if any."""
        voice = self.state.voice(name)
        keep = {norm(v) for v in voice.previous[-STORE_KEEP:]} | ({norm(voice.active)} if voice.active else set())
        with self._lock:
            stale = [m for m in self._versions.values()
                     if m.name == name and m.store is not None and m.engine is None
                     and not self.map.in_flight(m.key)
                     and m.state not in (State.CANARY, *COMING_UP) and norm(m.version) not in keep]
            for m in stale:
                m.store = None
        for m in stale:
            shutil.rmtree(self.store.path(m.name, m.version), ignore_errors=True)

    def _retire_now(self: ModelManager, model: ModelVersion, wait: float = 30.0) -> None:
        """Memory policy: take the old version out of service and unload it before loading."""
        with self._lock:
            if self.map.active(model.name) == model.key:
                self.map.deactivate(model.name)
            model.state = State.RETIRED
        deadline = time.monotonic() + wait
        while self.map.in_flight(model.key) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._unload(model, force=True)
        model.state = State.AVAILABLE
