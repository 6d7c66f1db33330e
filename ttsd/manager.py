"""The model manager: which version of each voice serves, and the one place versions are
verified, stored, loaded, swapped, rolled back and unloaded.

Shape from TF Serving's AspiredVersionsManager: the *source* (``source.py``) says which folders on
disk are ready to be checked; the manager verifies each, copies it into the private store, loads
and warms it beside the serving version (the engine is the *loader*), then makes it active by
replacing one reference. Requests hold a ``Lease`` on the version active when they started, so a
swap never changes the model under a running request; replaced versions stay loaded as rollback
targets (``keep``) and the rest are unloaded when their last lease ends. Every version has an
explicit ``State``; the serving state survives restarts (``store.ServingState``).

Threads: ``start``/``reconcile``/``rollback``/``activate``/``promote`` run on a loader thread and
serialise on ``_load_lock``; ``acquire``/``release``/``snapshot`` run on any thread and only take
``_lock`` briefly. ``spawn`` (given by the daemon) runs follow-up work such as an auto-rollback on a
new loader thread.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from .engines import Engine, create_engine
from .engines.threads import thread_cores
from .errors import (
    BusyError,
    ConflictError,
    ManifestError,
    ResourceError,
    TtsdError,
    UnknownVoiceError,
    VerifyError,
    is_system_oserror,
    resource_error,
)
from .gil import yielding_gil
from .manifest import Manifest, read_manifest, verify
from .source import Folder, Source, looks_incomplete
from .store import ModelStore, ServingState, VersionRecord, VoiceRecord, content_id

log = logging.getLogger("ttsd.manager")
STORE_KEEP = 3  # rollback targets kept in the store besides the active version


class State(str, Enum):
    INCOMPLETE = "incomplete"
    VERIFYING = "verifying"
    LOADING = "loading"
    WARMING = "warming"
    CANARY = "canary"  # loaded, serving a share of requests before promotion
    ACTIVE = "active"
    STANDBY = "standby"  # loaded, kept as a rollback target
    AVAILABLE = "available"  # verified and stored, not loaded
    RETIRED = "retired"  # replaced; unloaded when its last request ends
    REFUSED = "refused"  # its content cannot serve (fails verification, loading or warm-up)
    DEFERRED = "deferred"  # could not come up for the box's reasons (disk full, damaged copy): retried
    ROLLED_BACK = "rolled-back"


LOADED = (State.CANARY, State.ACTIVE, State.STANDBY, State.RETIRED, State.ROLLED_BACK)


@dataclass(frozen=True)
class Policy:
    keep: int = 1  # previous versions kept loaded for instant rollback
    swap: str = "availability"  # or "memory": unload the old version before loading the new one
    settle: float = 1.0
    incomplete_timeout: float = 60.0
    auto_rollback_requests: int = 20  # watch this many first requests of a new version (0 = off)
    auto_rollback_share: float = 0.25  # roll back when more than this share of them fail
    canary: dict[str, float] = field(default_factory=dict)  # voice (or "*") -> share of requests
    canary_requests: int = 20  # clean canary requests before full promotion
    loader_nice: int = 10  # operator-asked loads (rollback, activate) yield the CPU to live requests
    background_idle: bool = True  # other loads and checks run in Linux's SCHED_IDLE class


@dataclass
class ModelVersion:
    name: str
    version: str
    state: State
    content: str = ""
    reason: str = ""
    source: Path | None = None
    store: Path | None = None
    manifest: Manifest | None = None
    engine: Engine[Any] | None = None
    in_flight: int = 0
    requests: int = 0  # since it became active or canary (the auto-rollback and canary window)
    failures: int = 0
    served: int = 0  # requests it served, and failed through its own fault, since it was loaded
    model_failures: int = 0
    load_seconds: float = 0.0
    retry_at: float = 0.0  # DEFERRED: monotonic time of the next try
    backoff: float = 0.0
    fresh: bool = False  # found in the store but not in the saved state: not judged yet

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, _norm(self.version))

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "state": self.state.value, "reason": self.reason or None,
                "in_flight": self.in_flight, "source": str(self.source) if self.source else None,
                "content": self.content or None, "load_seconds": round(self.load_seconds, 2) or None,
                "served": self.served, "model_failures": self.model_failures}


@dataclass
class Lease:
    """A request's hold on one loaded version. ``release(ok)`` exactly once: ``ok`` is whether the
    model did its job (None: the request failed for its own reasons, e.g. bad text)."""

    model: ModelVersion
    _release: Callable[[ModelVersion, bool | None], None]
    _released: bool = field(default=False, repr=False)

    @property
    def engine(self) -> Engine[Any]:
        assert self.model.engine is not None
        return self.model.engine

    def release(self, ok: bool | None = None) -> None:
        if not self._released:
            self._released = True
            self._release(self.model, ok)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


Listener = Callable[[str, ModelVersion], None]


class _StoreLost(TtsdError):
    """A version's store copy is damaged and there is no intact folder to copy it from again."""


class ModelManager:
    def __init__(self, models_dir: Path, *, state_dir: Path, policy: Policy | None = None,
                 engine_options: dict[str, Any] | None = None, default_voice: str | None = None,
                 listener: Listener | None = None, spawn: Callable[[Callable[[], None]], None] | None = None
                 ) -> None:
        self.models_dir = models_dir
        self.policy = policy or Policy()
        self.engine_options = engine_options or {}
        self.default_voice = default_voice
        self._listener = listener or (lambda _e, _m: None)
        self._spawn = spawn or (lambda fn: threading.Thread(target=fn, daemon=True).start())
        self.store = ModelStore(state_dir / "store")
        self.state = ServingState(state_dir)
        self.source = Source(models_dir, settle=self.policy.settle,
                             incomplete_timeout=self.policy.incomplete_timeout)
        self._lock = threading.Lock()
        self._load_lock = threading.RLock()
        self._versions: dict[tuple[str, str], ModelVersion] = {}
        self._active: dict[str, ModelVersion] = {}
        self._canary: dict[str, ModelVersion] = {}
        self._first_scan = True
        self._settling = False  # a folder changed less than `settle` seconds ago
        self._in_flight = 0  # requests holding a lease on any version
        self.needs_rescan = False  # a folder is still settling: the daemon should look again soon

    # == requests (any thread) ================================================================
    def acquire(self, voice: str | None = None, version: str | None = None) -> Lease:
        with self._lock:
            name = voice or self._default_name()
            if name is None:
                raise BusyError("no voice is ready yet", retry_after=5)
            if version is not None:
                model = self._versions.get((name, _norm(version)))
                if model is None or model.engine is None or model.state not in LOADED:
                    raise UnknownVoiceError(f"voice {name} has no loaded version {version}")
            else:
                model = self._active.get(name)
                if model is None:
                    if name in self._loading_names():
                        raise BusyError(f"voice {name} is being upgraded", retry_after=2)
                    known = ", ".join(sorted(self._active)) or "none"
                    raise UnknownVoiceError(f"unknown voice {name!r} (voices: {known})")
                canary = self._canary.get(name)
                if canary is not None and random.random() < self._canary_share(name):
                    model = canary
            model.in_flight += 1
            self._in_flight += 1
            return Lease(model, self._release)

    def serving(self) -> bool:
        """Whether any request is being synthesized right now (read without the lock)."""
        return self._in_flight > 0

    def _release(self, model: ModelVersion, ok: bool | None) -> None:
        follow_up: Callable[[], None] | None = None
        with self._lock:
            model.in_flight -= 1
            self._in_flight -= 1
            idle_retired = model.state in (State.RETIRED, State.ROLLED_BACK) and model.in_flight == 0
            if ok is not None:  # None: the request's or the box's fault, never counted against a model
                model.served += ok
                model.model_failures += not ok
                follow_up = self._judge(model, ok)
        if idle_retired:
            self._unload(model)
        if follow_up is not None:
            self._spawn(follow_up)

    def _judge(self, model: ModelVersion, ok: bool) -> Callable[[], None] | None:
        """Count a request against a new version; returns work to do (under ``_lock``)."""
        p = self.policy
        if model.state is State.CANARY:
            model.requests += 1
            if not ok:
                model.failures += 1
                return lambda: self._end_canary(model, promote=False)
            if model.requests == p.canary_requests:
                return lambda: self._end_canary(model, promote=True)
        elif model.state is State.ACTIVE and p.auto_rollback_requests and model.requests < p.auto_rollback_requests:
            model.requests += 1
            model.failures += 0 if ok else 1
            if model.failures > p.auto_rollback_share * p.auto_rollback_requests:
                model.requests = p.auto_rollback_requests  # fire once
                why = f"auto-rollback: {model.failures} of its first {model.requests} requests failed"
                return lambda: self._auto_rollback(model, why)
        return None

    def _default_name(self) -> str | None:
        if self.default_voice and self.default_voice in self._active:
            return self.default_voice
        return min(self._active) if self._active else None

    def _loading_names(self) -> set[str]:
        return {m.name for m in self._versions.values()
                if m.state in (State.VERIFYING, State.LOADING, State.WARMING)}

    def _canary_share(self, name: str) -> float:
        return self.policy.canary.get(name, self.policy.canary.get("*", 0.0))

    # == what serves (any thread) =============================================================
    def ready(self) -> bool:
        with self._lock:
            return bool(self._active)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted({m.name for m in self._versions.values()})
            default = self._default_name()
            voices = []
            for name in names:
                active = self._active.get(name)
                versions = sorted((m for m in self._versions.values() if m.name == name), key=_order)
                voices.append({
                    "name": name, "default": name == default,
                    "active": active.version if active else None,
                    "canary": self._canary[name].version if name in self._canary else None,
                    "sample_rate": active.manifest.sample_rate if active and active.manifest else None,
                    "versions": [m.describe() for m in versions],
                })
            return voices

    def folders(self) -> list[dict[str, Any]]:
        """Folders in the models dir that are not (yet) a version: incomplete or refused."""
        return [{"folder": str(f.path), "state": f.state, "reason": f.reason}
                for f in self.source.folders.values() if f.state in ("incomplete", "refused")]

    def history(self) -> list[dict[str, Any]]:
        return self.state.history()

    # == loading (loader threads) =============================================================
    def start(self) -> None:
        """Restore what is known (saved state, then the store), look at the models dir, and bring
        every voice up: its saved active version, else the newest version that verifies. Folders
        still settling (a voice converted or copied in just now) are waited for, briefly, so the
        daemon does not announce "no voice" a second before one serves."""
        with self._load_lock:
            self.store.prepare()
            self.state.load()
            for key, record in self.state.versions.items():
                name, _, version = key.partition("/")
                state = State(record.state) if record.state in State._value2member_map_ else State.AVAILABLE
                if state not in (State.REFUSED, State.ROLLED_BACK):
                    state = State.AVAILABLE  # nothing is loaded yet in this process
                model = ModelVersion(name, version, state, content=record.content, reason=record.reason,
                                     store=self.store.get(name, version))
                self._trust_store_copy(model)
                self._versions[model.key] = model
            for name, version, folder in self.store.scan():  # copies the saved state does not know
                if (name, _norm(version)) in self._versions:
                    continue
                try:
                    manifest = read_manifest(folder)
                    if (manifest.name, _norm(manifest.version)) != (name, _norm(version)):
                        raise ManifestError(f"it says {manifest.name} {manifest.version}")
                except TtsdError as exc:
                    log.warning("store copy %s is unusable (%s); removing it", folder, exc)
                    self.store.remove(name, version)
                    continue
                # stored, then the process died before the state said so (e.g. kill -9 mid-load):
                # its folder is judged like a newly dropped one
                model = ModelVersion(name, version, State.AVAILABLE, content=content_id(manifest), store=folder,
                                     fresh=True)
                self._versions[model.key] = model
                log.info("found %s %s in the store", name, version)
        self.reconcile()
        deadline = time.monotonic() + 3 * self.policy.settle + 1.0
        while self._settling and time.monotonic() < deadline:
            time.sleep(min(0.2, max(self.policy.settle / 4, 0.02)))
            self.reconcile()

    def _trust_store_copy(self, model: ModelVersion) -> None:
        """What a version *is* comes from its store copy's manifest (verified in full before it
        loads), not from state.json's record: a damaged record must never make ttsd drop a good
        copy, or refuse an intact folder as "the same version with other content"."""
        if model.store is None:
            return
        try:
            content = content_id(read_manifest(model.store))
        except TtsdError:
            return  # a damaged copy: _check_store deals with it before any load
        if model.content and content != model.content:
            log.warning("state.json recorded other content for %s %s than its store copy holds; trusting the "
                        "store copy (it is verified before it loads)", model.name, model.version)
        model.content = content

    def retry_now(self) -> None:
        """Versions waiting after a system failure are retried at the next reconcile (SIGHUP)."""
        with self._lock:
            for model in self._versions.values():
                model.retry_at = 0.0

    def reconcile(self) -> None:
        """Check every folder that is ready, promote the newest good new version of each voice, and
        bring up a voice that has no active version. No one folder or version can stop the rest:
        a failure is logged and that folder is looked at again at the next scan."""
        with self._load_lock:
            # Everything a reconcile does (hashing, copying, loading, warming up) waits for idle CPU
            # time: measured with the default layout, nice 10 still cost live requests 20-60% while
            # a version loaded (a waking nice-10 thread preempts the workers' OpenMP threads, and
            # their barriers wait); SCHED_IDLE never preempts them. Under full load an upgrade
            # then takes ~3x longer (bench/hotswap.py).
            _lower_thread_priority(self.policy.loader_nice, idle=self.policy.background_idle)
            ready, self._settling = self.source.ready()
            candidates: dict[str, list[tuple[Version, Folder, Manifest]]] = {}
            for folder in ready:
                try:
                    found = self._examine(folder)
                except Exception as exc:  # e.g. an I/O error, or a folder deleted while it was hashed
                    self._undo_check(folder.path)
                    if is_system_oserror(exc) or isinstance(exc, (FileNotFoundError, MemoryError)):
                        log.error("checking %s failed (%s); it is looked at again at the next scan", folder.path,
                                  exc)
                        folder.settled, folder.signature, folder.state = False, (), "new"
                    else:  # a bug, or input no check foresaw: refused until the folder changes, logged once
                        log.exception("checking %s failed; refused until it changes", folder.path)
                        folder.state, folder.settled = "refused", True
                        folder.reason = f"could not be checked: {type(exc).__name__}: {exc}"[:500]
                    continue
                if found is not None:
                    candidates.setdefault(found[1].name, []).append((found[1].parsed_version, folder, found[1]))
            first, self._first_scan = self._first_scan, False
            if first:
                self._resume_saved()
            for name, found_list in sorted(candidates.items()):
                self._promote_newest(name, found_list)
            if first:
                for model in self._versions.values():
                    if model.state is State.VERIFYING:
                        model.state = State.AVAILABLE
            self._forget_vanished()
            for name in sorted({m.name for m in self._versions.values()}):
                self._retry_deferred(name)
                if name not in self._active and self._policy_allows_fallback(name):
                    self._fall_back(name)
            # deferred versions wait for the periodic rescan: their back-off is longer than its interval
            self.needs_rescan = self._settling or any(f.state == "incomplete" for f in self.source.folders.values())
            self._save()

    def _resume_saved(self) -> None:
        """At start-up: every voice's saved active version comes back (re-copied from the models
        dir if its store copy is damaged); one that cannot is logged and the voice falls back."""
        for name, voice in sorted(self.state.voices.items()):
            if voice.active is None or name in self._active:
                continue
            model = self._versions.get((name, _norm(voice.active)))
            if model is None or model.state in (State.REFUSED, State.ROLLED_BACK):
                log.warning("%s %s was active but is not known any more; choosing again", name, voice.active)
                continue
            try:
                self._ensure_stored(model)
            except TtsdError as exc:
                log.warning("%s %s was active but cannot be restored (%s); choosing again", name, voice.active, exc)
                continue
            if self._bring_up(model, "resumed after restart"):
                self._activate(model, "restart", push_previous=False, durable=False)

    def _promote_newest(self, name: str, found: list[tuple[Version, Folder, Manifest]]) -> None:
        for number, folder, manifest in sorted(found, key=lambda c: c[0], reverse=True):
            model = self._versions[(name, _norm(manifest.version))]
            active = self._active.get(name)
            if active is not None and number <= Version(active.version):
                model.state = State.AVAILABLE  # e.g. older folders found at start-up
                continue
            if self._promote(model, folder.path, "new version in the models dir"):
                # Older new ones: known and stored on demand, not loaded.
                for _, _, other in found:
                    other_model = self._versions[(name, _norm(other.version))]
                    if other_model is not model and other_model.state is State.VERIFYING:
                        other_model.state = State.AVAILABLE
                return

    def _policy_allows_fallback(self, name: str) -> bool:
        # the memory policy unloads the active version while its successor loads: not "no version"
        return not any(m.name == name and m.state in (State.VERIFYING, State.LOADING, State.WARMING)
                       for m in self._versions.values())

    def _fall_back(self, name: str) -> None:
        """A voice with no active version (its saved one is damaged or gone, or the state was
        lost) serves the newest version that verifies and loads, from the store or the models
        dir. Rolled-back and refused versions are not taken; ones waiting to retry are, when due."""
        rolled_back = {_norm(v) for v in self.state.voice(name).rolled_back}
        now = time.monotonic()
        options = sorted((m for m in self._versions.values() if m.name == name
                          and m.state not in (State.REFUSED, State.ROLLED_BACK, State.INCOMPLETE)
                          and _norm(m.version) not in rolled_back and (m.store is not None or m.source is not None)
                          and (m.state is not State.DEFERRED or m.retry_at <= now)),
                         key=_order, reverse=True)
        for model in options:
            try:
                self._ensure_stored(model)
            except TtsdError as exc:  # its folder changed or the disk is full: try again later
                self._defer(model, str(exc))
                continue
            if self._bring_up(model, "the voice had no active version"):
                self._activate(model, "fallback: newest version that verifies", durable=False)
                log.warning("%s: serving %s, the newest version that verifies", name, model.version)
                return

    def _retry_deferred(self, name: str) -> None:
        """A new version that failed for a system reason (disk full while storing it, out of
        memory while loading) is tried again when its back-off is over, or at once after SIGHUP
        or when its folder changes."""
        active = self._active.get(name)
        now = time.monotonic()
        due = sorted((m for m in self._versions.values() if m.name == name and m.state is State.DEFERRED
                      and m.retry_at <= now and m.source is not None
                      and (active is None or _order(m) > Version(active.version))), key=_order, reverse=True)
        for model in due[:1]:
            assert model.source is not None
            log.info("retrying %s %s (%s)", model.name, model.version, model.reason)
            try:
                model.manifest = verify(model.source)
                if content_id(model.manifest) != model.content:
                    raise VerifyError(f"{model.source} changed since it was checked")
            except (TtsdError, OSError) as exc:
                if isinstance(exc, OSError) and is_system_oserror(exc):
                    self._defer(model, str(resource_error(exc, "verifying it")))
                else:
                    self._refuse(model, str(exc))
                continue
            self._promote(model, model.source, "retried after a system failure")

    def _forget_vanished(self) -> None:
        """Versions seen only as a folder that is gone, and never stored, are forgotten; a version
        caught mid-check by its folder's deletion goes back to what it was."""
        present = set(self.source.folders)
        for model in list(self._versions.values()):
            if model.source is not None and model.source not in present:
                self._undo_check(model.source)

    def _undo_check(self, folder: Path) -> None:
        """The check of ``folder`` did not finish: its version forgets the folder and leaves the
        transient states (a voice must never look "being upgraded" forever)."""
        with self._lock:
            for key, model in list(self._versions.items()):
                if model.source != folder:
                    continue
                model.source = None
                if model.state in (State.INCOMPLETE, State.VERIFYING, State.DEFERRED):
                    if model.store is None and model.engine is None:
                        del self._versions[key]
                    elif model.state is not State.DEFERRED:
                        model.state = State.AVAILABLE

    def _examine(self, folder: Folder) -> tuple[Folder, Manifest] | None:
        """Classify one settled folder; returns it when it holds a new version worth loading."""
        try:
            manifest = read_manifest(folder.path)
        except TtsdError as exc:
            return self._not_ready(folder, exc)
        folder.voice, folder.version = manifest.name, manifest.version
        key = (manifest.name, _norm(manifest.version))
        content = content_id(manifest)
        known = self._versions.get(key)
        if known is not None and known.content == content and not known.fresh \
                and known.state not in (State.INCOMPLETE, State.DEFERRED):
            folder.state, folder.settled, folder.reason = "known", True, ""
            known.source = folder.path
            return None
        # the same version with other content is refused, when ttsd holds that version (a store
        # copy or a loaded engine); a content known only from state.json's record is not proof
        if known is not None and known.content and known.content != content and known.state is not State.REFUSED \
                and (known.store is not None or known.engine is not None):
            folder.state, folder.settled = "refused", True
            folder.reason = (f"{manifest.name} {manifest.version} is already known with different content; "
                             "give the new folder a new version")
            log.warning("refused %s: %s", folder.path, folder.reason)
            return None
        model = known or ModelVersion(manifest.name, manifest.version, State.VERIFYING, source=folder.path)
        model.content, model.source, model.manifest, model.fresh = content, folder.path, manifest, False
        self._versions[key] = model
        voice = self.state.voice(manifest.name)
        if manifest.version in voice.rolled_back:
            model.state, model.reason = State.ROLLED_BACK, "rolled back earlier; 'ttsd activate' serves it"
            folder.state, folder.settled = "known", True
            return None
        active = self._active.get(manifest.name)
        if active is not None and manifest.parsed_version <= Version(active.version) and not self._first_scan:
            self._refuse(model, f"version {manifest.version} is not newer than the active {active.version} "
                                "('ttsd activate' serves it anyway)", folder)
            return None
        model.state = State.VERIFYING
        self._listener("verifying", model)
        try:
            verify(folder.path)
        except TtsdError as exc:
            return self._not_ready(folder, exc, model)
        folder.state, folder.settled, folder.reason = "known", True, ""
        return folder, manifest

    def _not_ready(self, folder: Folder, exc: TtsdError, model: ModelVersion | None = None
                   ) -> tuple[Folder, Manifest] | None:
        if looks_incomplete(exc) and not self.source.timed_out(folder):
            folder.state, folder.settled, folder.reason = "incomplete", True, str(exc)
            if model is not None:
                model.state, model.reason = State.INCOMPLETE, str(exc)
            return None
        reason = str(exc)
        if looks_incomplete(exc):
            reason = f"still incomplete after {self.policy.incomplete_timeout:.0f} s unchanged: {exc}"
        if model is not None:
            self._refuse(model, reason, folder)
        else:
            folder.state, folder.settled, folder.reason = "refused", True, reason
            log.warning("refused %s: %s", folder.path, reason)
        return None

    def _refuse(self, model: ModelVersion, reason: str, folder: Folder | None = None) -> None:
        """The version's content cannot serve (it fails verification, loading or warm-up): refused
        for good under this content, and its store copy is dropped unless it is in use."""
        model.state, model.reason = State.REFUSED, reason
        if folder is not None:
            folder.state, folder.settled, folder.reason = "refused", True, reason
        log.warning("refused %s %s: %s", model.name, model.version, reason)
        if model.store is not None and model.engine is None and model.in_flight == 0:
            self.store.remove(model.name, model.version)
            model.store = None
        self.state.record(model.name, None, model.version, "refused", reason=reason)
        self._listener("refused", model)

    def _defer(self, model: ModelVersion, reason: str) -> None:
        """The version could not come up for a reason of the box's (disk full, I/O error, out of
        memory) or its store copy was damaged with no intact folder to copy again: not the
        version's fault, so it is retried, after a back-off that doubles up to five minutes."""
        model.backoff = min(300.0, model.backoff * 2 if model.backoff else 10.0)
        model.retry_at = time.monotonic() + model.backoff
        model.state, model.reason = State.DEFERRED, f"{reason} (retried in {model.backoff:.0f} s or on SIGHUP)"
        log.error("%s %s cannot come up now: %s", model.name, model.version, model.reason)
        self.state.record(model.name, None, model.version, "deferred", reason=reason)
        self._listener("deferred", model)

    def _promote(self, model: ModelVersion, folder: Path, why: str) -> bool:
        """Store, load and warm ``model`` beside the serving version, then swap (or start a canary)."""
        previous = self._active.get(model.name)
        if self.policy.swap == "memory" and previous is not None:
            self._retire_now(previous)
        try:
            assert model.manifest is not None
            model.store = self.store.put(folder, model.manifest)
        except (TtsdError, OSError) as exc:
            if is_system_oserror(exc):
                self._defer(model, str(resource_error(exc, "copying it into the store")))
            else:
                self._refuse(model, f"could not copy into the store: {exc}")
            return self._restore_after_failure(previous)
        if not self._bring_up(model, why, verified=True):  # put() verified the copy it made
            return self._restore_after_failure(previous)
        share = self._canary_share(model.name)
        if share > 0 and previous is not None and self.policy.swap != "memory":
            with self._lock:
                model.state, model.requests, model.failures = State.CANARY, 0, 0
                self._canary[model.name] = model
            log.info("%s %s is a canary for %.0f%% of requests", model.name, model.version, share * 100)
            self._listener("canary", model)
            return True
        try:
            self._activate(model, why)
        except ResourceError as exc:  # the swap could not be recorded: it does not happen yet
            self._unload(model)
            self._defer(model, str(exc))
            return self._restore_after_failure(previous)
        model.backoff = 0.0
        return True

    def _restore_after_failure(self, previous: ModelVersion | None) -> bool:
        if previous is not None and self.policy.swap == "memory" and previous.engine is None:
            if self._bring_up(previous, "reloaded after a failed upgrade"):
                self._activate(previous, "the upgrade failed", push_previous=False, durable=False)
        return False

    def _bring_up(self, model: ModelVersion, why: str, *, verified: bool = False) -> bool:
        """Verify the store copy (copying it again from the models dir if it is damaged), load and
        warm up. Runs at low CPU priority beside live requests, handing the GIL to them while they
        are served (``ttsd.gil``). A failure of the version's own refuses it; one of the box's
        (or a damaged copy with nothing to copy again) defers it. ``verified``: the caller has just
        made and verified the store copy (``ModelStore.put``)."""
        started = time.monotonic()
        _lower_thread_priority(self.policy.loader_nice)
        engine: Engine[Any] | None = None
        try:
            model.state = State.VERIFYING
            if not verified:  # a copy the store verified moments ago is not hashed a third time
                self._check_store(model)
            assert model.store is not None and model.manifest is not None
            model.state = State.LOADING
            self._listener("loading", model)
            engine = create_engine(model.store, model.manifest, **self.engine_options)
            # beside live requests: one core for the load, and the GIL handed over (ttsd.gil)
            with thread_cores(1 if self.serving() else None), yielding_gil(self.serving):
                engine.load()
                model.state = State.WARMING
                engine.warmup()
        except Exception as exc:  # TtsdError says why; anything else is the engine crashing
            if engine is not None:
                engine.unload()
            if isinstance(exc, (_StoreLost, MemoryError, ResourceError)) or is_system_oserror(exc):
                self._defer(model, str(exc) if isinstance(exc, TtsdError) else str(resource_error(exc, "loading")))
            else:
                self._refuse(model, str(exc) if isinstance(exc, TtsdError) else f"{type(exc).__name__}: {exc}")
            return False
        model.engine, model.reason = engine, ""
        model.load_seconds = time.monotonic() - started
        log.info("%s %s loaded and warmed in %.2f s (%s)", model.name, model.version, model.load_seconds, why)
        self._listener("loaded", model)
        return True

    def _check_store(self, model: ModelVersion) -> None:
        """The store copy must verify and be the content recorded for this version. A damaged one
        is dropped and copied again from the version's folder in the models dir when that folder
        verifies with the same content; else ``_StoreLost``."""
        problem = "it is not in the store"
        if model.store is not None:
            try:
                manifest = verify(model.store)
                if model.content and content_id(manifest) != model.content:
                    log.warning("%s %s: its store copy verifies but holds other content than was recorded; "
                                "serving the store copy", model.name, model.version)
                model.manifest, model.content = manifest, content_id(manifest)
                return
            except OSError as exc:
                if is_system_oserror(exc):
                    raise
                problem = f"its store copy is unreadable ({exc})"
            except TtsdError as exc:
                problem = f"its store copy is damaged ({exc})"
            log.warning("%s %s: %s; dropping the copy", model.name, model.version, problem)
            self.store.remove(model.name, model.version)
            model.store = None
        if model.source is None:
            raise _StoreLost(f"{problem}, and the models dir has no folder of it to copy again")
        try:
            manifest = verify(model.source)
        except TtsdError as exc:
            raise _StoreLost(f"{problem}, and its folder {model.source} does not verify ({exc})") from exc
        if model.content and content_id(manifest) != model.content:
            raise _StoreLost(f"{problem}, and {model.source} holds other content now")
        model.store = self.store.put(model.source, manifest)
        model.manifest, model.content = manifest, content_id(manifest)
        log.warning("%s %s: copied again from %s", model.name, model.version, model.source)

    def _activate(self, model: ModelVersion, why: str, *, push_previous: bool = True,
                  previous_state: State = State.STANDBY, record: VoiceRecord | None = None,
                  durable: bool = True) -> float:
        """The swap: one reference replaced under the lock, then trim what stays loaded. Returns the
        monotonic time of the swap.

        ``durable`` (operator actions, new versions): the voice's new record (``record``, or one
        made here) is written to ``state.json`` first, and if that fails nothing changes and
        ``ResourceError`` says why. Otherwise (resuming, automatic rollbacks and canary results,
        which must not wait for disk space) the swap happens and the record is written when it can.
        """
        voice = (record or self.state.voice(model.name)).copy()
        old = self.state.voice(model.name).active
        previous = self._active.get(model.name)
        if push_previous and old is not None and old != model.version and previous is not None \
                and previous_state is State.STANDBY:
            voice.previous = [v for v in voice.previous if v != old] + [old]
        voice.previous = [v for v in voice.previous if v != model.version]
        voice.active = model.version
        if durable:
            try:
                self.state.commit(model.name, voice)
            except ResourceError:
                if model.engine is not None and model.state in (State.LOADING, State.WARMING, State.VERIFYING):
                    model.state = State.STANDBY  # loaded and unharmed: a rollback target
                raise
        else:
            self.state.voices[model.name] = voice
        to_unload: list[ModelVersion] = []
        with self._lock:
            previous = self._active.get(model.name)
            self._active[model.name] = model  # new requests get the new version from here on
            swapped = time.monotonic()
            if self._canary.get(model.name) is model:
                del self._canary[model.name]
            model.state, model.requests, model.failures = State.ACTIVE, 0, 0
            if previous is not None and previous is not model:
                previous.state = previous_state
            standby = sorted((m for m in self._versions.values()
                              if m.name == model.name and m.state is State.STANDBY), key=_order, reverse=True)
            for extra in standby[self.policy.keep:]:
                extra.state = State.RETIRED
            for m in self._versions.values():
                if m.name == model.name and m.state in (State.RETIRED, State.ROLLED_BACK) and m.in_flight == 0:
                    to_unload.append(m)
        self.state.record(model.name, old, model.version, why, load_seconds=round(model.load_seconds, 2))
        self._save()
        log.info("%s: %s -> %s (%s)", model.name, old or "-", model.version, why)
        self._listener("activated", model)
        for m in to_unload:  # freeing memory is not part of the swap: do it off this path
            self._spawn(lambda m=m: self._unload(m))
        self._prune_store(model.name)
        return swapped

    def _prune_store(self, name: str) -> None:
        """Keep store copies only of what can serve soon: the active version, loaded ones, and the
        most recent rollback targets. Others drop back to their models-dir folder, if any."""
        voice = self.state.voice(name)
        keep = {_norm(v) for v in voice.previous[-STORE_KEEP:]} | ({_norm(voice.active)} if voice.active else set())
        with self._lock:
            stale = [m for m in self._versions.values()
                     if m.name == name and m.store is not None and m.engine is None and m.in_flight == 0
                     and m.state not in (State.CANARY, State.LOADING, State.WARMING, State.VERIFYING)
                     and _norm(m.version) not in keep]
            for m in stale:
                m.store = None
        for m in stale:
            shutil.rmtree(self.store.path(m.name, m.version), ignore_errors=True)

    def _retire_now(self, model: ModelVersion, wait: float = 30.0) -> None:
        """Memory policy: take the old version out of service and unload it before loading."""
        with self._lock:
            if self._active.get(model.name) is model:
                del self._active[model.name]
            model.state = State.RETIRED
        deadline = time.monotonic() + wait
        while model.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self._unload(model)
        model.state = State.AVAILABLE

    # == operator actions (loader threads) ====================================================
    def rollback(self, voice: str, to: str | None = None, why: str = "rollback requested", *,
                 durable: bool = True) -> dict[str, Any]:
        """Serve the previous (or ``to``) version at once and mark the current one rolled back.
        ``durable``: on disk before it happens (``ResourceError`` and no change when the state dir
        is full); automatic rollbacks pass False and are written when they can."""
        with self._load_lock:
            current = self._active.get(voice)
            if current is None:
                raise UnknownVoiceError(f"voice {voice!r} has no active version to roll back from")
            record = self.state.voice(voice).copy()
            if to is None:
                stack = [v for v in record.previous if _norm(v) != _norm(current.version)]
                if not stack:
                    raise ConflictError(f"{voice} {current.version} has no previous version to roll back to")
                to = stack[-1]
            target = self._versions.get((voice, _norm(to)))
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
            return {"voice": voice, "from": current.version, "to": target.version,
                    "seconds": round(swapped - started, 3)}

    def activate(self, voice: str, version: str, why: str = "activate requested") -> dict[str, Any]:
        """Serve any known version (clears a rolled-back mark; re-verified from the store)."""
        with self._load_lock:
            target = self._versions.get((voice, _norm(version)))
            if target is None:
                raise UnknownVoiceError(f"voice {voice} has no known version {version}")
            current = self._active.get(voice)
            if target is current:
                return {"voice": voice, "from": version, "to": version, "seconds": 0.0}
            started = time.monotonic()
            self._ensure_stored(target)
            if target.engine is None and not self._bring_up(target, why):
                raise ConflictError(f"cannot activate {voice} {version}: {target.reason}")
            record = self.state.voice(voice).copy()
            record.rolled_back = [v for v in record.rolled_back if _norm(v) != _norm(version)]
            swapped = self._activate(target, why, record=record)
            return {"voice": voice, "from": current.version if current else None, "to": target.version,
                    "seconds": round(swapped - started, 3)}

    def _ensure_stored(self, target: ModelVersion) -> None:
        """A version known only from the models dir is verified and copied into the store first
        (a damaged store copy is dealt with by ``_bring_up``). ``ResourceError`` when the box
        cannot take the copy now."""
        if target.engine is not None or target.store is not None:
            return
        if target.source is None:
            raise UnknownVoiceError(f"{target.name} {target.version} is neither in the store nor on disk")
        try:
            manifest = verify(target.source)
            if target.content and content_id(manifest) != target.content:
                raise ConflictError(f"{target.source} changed since it was checked")
            target.manifest = manifest
            target.store = self.store.put(target.source, manifest)
        except OSError as exc:
            if is_system_oserror(exc):
                raise resource_error(exc, f"copying {target.name} {target.version} into the store") from exc
            raise ConflictError(f"cannot serve {target.name} {target.version}: {exc}") from exc
        except TtsdError as exc:
            raise ConflictError(f"cannot serve {target.name} {target.version}: {exc}") from exc

    def _auto_rollback(self, model: ModelVersion, why: str) -> None:
        try:
            if self._active.get(model.name) is model:
                self.rollback(model.name, why=why, durable=False)
                log.error("%s %s rolled back: %s", model.name, model.version, why)
        except TtsdError as exc:
            log.error("%s %s is failing (%s) but cannot roll back: %s", model.name, model.version, why, exc)

    def _end_canary(self, model: ModelVersion, promote: bool) -> None:
        with self._load_lock:
            if self._canary.get(model.name) is not model:
                return
            if promote:
                self._activate(model, f"canary passed {model.requests} requests", durable=False)
                return
            with self._lock:
                del self._canary[model.name]
                model.state = State.ROLLED_BACK
                idle = model.in_flight == 0
            self.state.voice(model.name).rolled_back.append(model.version)
            model.reason = f"failed {model.failures} of {model.requests} canary requests"
            self.state.record(model.name, model.version, self._active[model.name].version, "canary failed",
                              reason=model.reason)
            self._save()
            log.error("%s %s canary ended: %s", model.name, model.version, model.reason)
            if idle:
                self._unload(model)

    # == unloading ============================================================================
    def _unload(self, model: ModelVersion) -> None:
        with self._lock:
            engine, model.engine = model.engine, None
            if model.state is State.RETIRED:
                model.state = State.AVAILABLE
        if engine is not None:
            engine.unload()
            del engine
            _return_memory()
            log.info("%s %s unloaded", model.name, model.version)
            self._listener("unloaded", model)

    def close(self) -> None:
        with self._lock:
            models = [m for m in self._versions.values() if m.engine is not None]
            self._active.clear()
            self._canary.clear()
        for model in models:
            self._unload(model)

    def _save(self) -> None:
        """Write every version's record (best effort: retried at the next call when the disk is
        full; transitions that must not be lost went through ``ServingState.commit``)."""
        for model in self._versions.values():
            if model.content:
                state = model.state if model.state not in (State.LOADING, State.WARMING, State.VERIFYING,
                                                           State.INCOMPLETE) else State.AVAILABLE
                self.state.versions[f"{model.name}/{model.version}"] = VersionRecord(
                    content=model.content, state=state.value, reason=model.reason)
        self.state.save()


def _norm(version: str) -> str:
    try:
        return str(Version(version))
    except (InvalidVersion, ValueError):  # ValueError: thousands of digits (an operator's typo, or worse)
        return version


def _order(model: ModelVersion) -> Version:
    try:
        return Version(model.version)
    except (InvalidVersion, ValueError):
        return Version("0")


def _lower_thread_priority(nice: int, idle: bool = False) -> None:
    """Lower this thread's (and the OpenMP threads it starts') CPU priority on Linux: ``nice``, or
    with ``idle`` the SCHED_IDLE class (runs only on CPU time no one else wants). Loader threads
    are fresh threads that end with their work, so this is never undone."""
    if not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    # never the main thread: it outlives the work (an embedding program's, or a test's)
    if idle and hasattr(os, "SCHED_IDLE") and threading.current_thread() is not threading.main_thread():
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
        except OSError:
            pass


def _return_memory() -> None:
    """Give freed model memory back to the OS: glibc keeps freed heap pages unless trimmed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
