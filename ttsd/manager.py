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
from .errors import BusyError, ConfigError, TtsdError, UnknownVoiceError
from .gil import yielding_gil
from .manifest import Manifest, read_manifest, verify
from .source import Folder, Source, looks_incomplete
from .store import ModelStore, ServingState, content_id

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
    REFUSED = "refused"
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
    loader_nice: int = 10  # loading and warm-up yield the CPU to live requests


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
        """Restore the saved serving state, then look at the models dir."""
        with self._load_lock:
            self.store.prepare()
            self.state.load()
            for key, record in self.state.versions.items():
                name, _, version = key.partition("/")
                state = State(record.state) if record.state in State._value2member_map_ else State.AVAILABLE
                if state in (State.CANARY, State.ACTIVE, State.STANDBY, State.RETIRED, State.LOADING,
                             State.WARMING, State.VERIFYING, State.INCOMPLETE):
                    state = State.AVAILABLE  # nothing is loaded yet in this process
                model = ModelVersion(name, version, state, content=record.content, reason=record.reason,
                                     store=self.store.get(name, version))
                self._versions[model.key] = model
            for name, voice in sorted(self.state.voices.items()):
                if voice.active is None:
                    continue
                model = self._versions.get((name, _norm(voice.active)))
                if model is None or model.store is None:
                    log.warning("%s %s was active but is not in the store; choosing again", name, voice.active)
                    continue
                if self._bring_up(model, "resumed after restart"):
                    self._activate(model, "restart", push_previous=False)
            self.reconcile()

    def reconcile(self) -> None:
        """Check every folder that is ready, and promote the newest good new version of each voice."""
        with self._load_lock:
            _lower_thread_priority(self.policy.loader_nice)  # hashing and copying yield to requests too
            ready, waiting = self.source.ready()
            candidates: dict[str, list[tuple[Version, Folder, Manifest]]] = {}
            for folder in ready:
                found = self._examine(folder)
                if found is not None:
                    candidates.setdefault(found[1].name, []).append((found[1].parsed_version, folder, found[1]))
            first, self._first_scan = self._first_scan, False
            for name, found_list in sorted(candidates.items()):
                for number, folder, manifest in sorted(found_list, key=lambda c: c[0], reverse=True):
                    model = self._versions[(name, _norm(manifest.version))]
                    active = self._active.get(name)
                    if active is not None and number <= Version(active.version):
                        model.state = State.AVAILABLE  # e.g. older folders found at start-up
                        continue
                    if self._promote(model, folder.path, "new version in the models dir"):
                        # Older new ones: known and stored on demand, not loaded.
                        for _, _, other in found_list:
                            other_model = self._versions[(name, _norm(other.version))]
                            if other_model is not model and other_model.state is State.VERIFYING:
                                other_model.state = State.AVAILABLE
                        break
            if first:
                for model in self._versions.values():
                    if model.state is State.VERIFYING:
                        model.state = State.AVAILABLE
            self.needs_rescan = waiting or any(f.state == "incomplete" for f in self.source.folders.values())
            self._save()

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
        if known is not None and known.content == content and known.state is not State.INCOMPLETE:
            folder.state, folder.settled, folder.reason = "known", True, ""
            known.source = folder.path
            return None
        if known is not None and known.content and known.content != content and known.state is not State.REFUSED:
            folder.state, folder.settled = "refused", True
            folder.reason = (f"{manifest.name} {manifest.version} is already known with different content; "
                             "give the new folder a new version")
            log.warning("refused %s: %s", folder.path, folder.reason)
            return None
        model = known or ModelVersion(manifest.name, manifest.version, State.VERIFYING, source=folder.path)
        model.content, model.source, model.manifest = content, folder.path, manifest
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
        model.state, model.reason = State.REFUSED, reason
        if folder is not None:
            folder.state, folder.settled, folder.reason = "refused", True, reason
        log.warning("refused %s %s: %s", model.name, model.version, reason)
        self.state.record(model.name, None, model.version, "refused", reason=reason)
        self._listener("refused", model)

    def _promote(self, model: ModelVersion, folder: Path, why: str) -> bool:
        """Store, load and warm ``model`` beside the serving version, then swap (or start a canary)."""
        previous = self._active.get(model.name)
        if self.policy.swap == "memory" and previous is not None:
            self._retire_now(previous)
        try:
            assert model.manifest is not None
            model.store = self.store.put(folder, model.manifest)
        except (TtsdError, OSError) as exc:
            self._refuse(model, f"could not copy into the store: {exc}")
            return self._restore_after_failure(previous)
        if not self._bring_up(model, why):
            return self._restore_after_failure(previous)
        share = self._canary_share(model.name)
        if share > 0 and previous is not None and self.policy.swap != "memory":
            with self._lock:
                model.state, model.requests, model.failures = State.CANARY, 0, 0
                self._canary[model.name] = model
            log.info("%s %s is a canary for %.0f%% of requests", model.name, model.version, share * 100)
            self._listener("canary", model)
            return True
        self._activate(model, why)
        return True

    def _restore_after_failure(self, previous: ModelVersion | None) -> bool:
        if previous is not None and self.policy.swap == "memory" and previous.engine is None:
            if self._bring_up(previous, "reloaded after a failed upgrade"):
                self._activate(previous, "the upgrade failed", push_previous=False)
        return False

    def _bring_up(self, model: ModelVersion, why: str) -> bool:
        """Verify the store copy, load and warm up. Runs at low CPU priority beside live requests,
        handing the GIL to them while they are served (``ttsd.gil``)."""
        started = time.monotonic()
        _lower_thread_priority(self.policy.loader_nice)
        engine: Engine[Any] | None = None
        try:
            if model.store is None:
                raise ConfigError(f"{model.name} {model.version} is not in the store")
            model.state = State.VERIFYING
            model.manifest = verify(model.store)
            model.state = State.LOADING
            self._listener("loading", model)
            engine = create_engine(model.store, model.manifest, **self.engine_options)
            with yielding_gil(self.serving):
                engine.load()
                model.state = State.WARMING
                engine.warmup()
        except Exception as exc:  # TtsdError says why; anything else is the engine crashing
            if engine is not None:
                engine.unload()
            self._refuse(model, str(exc) if isinstance(exc, TtsdError) else f"{type(exc).__name__}: {exc}")
            return False
        model.engine, model.reason = engine, ""
        model.load_seconds = time.monotonic() - started
        log.info("%s %s loaded and warmed in %.2f s (%s)", model.name, model.version, model.load_seconds, why)
        self._listener("loaded", model)
        return True

    def _activate(self, model: ModelVersion, why: str, *, push_previous: bool = True,
                  previous_state: State = State.STANDBY) -> float:
        """The swap: one reference replaced under the lock. Then trim what stays loaded and persist.
        Returns the monotonic time of the swap."""
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
        voice = self.state.voice(model.name)
        old = voice.active
        if push_previous and old is not None and old != model.version and previous is not None \
                and previous_state is State.STANDBY:
            voice.previous = [v for v in voice.previous if v != old] + [old]
        voice.previous = [v for v in voice.previous if v != model.version]
        voice.active = model.version
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
    def rollback(self, voice: str, to: str | None = None, why: str = "rollback requested") -> dict[str, Any]:
        with self._load_lock:
            current = self._active.get(voice)
            if current is None:
                raise UnknownVoiceError(f"voice {voice!r} has no active version to roll back from")
            record = self.state.voice(voice)
            if to is None:
                stack = [v for v in record.previous if _norm(v) != _norm(current.version)]
                if not stack:
                    raise ConfigError(f"{voice} {current.version} has no previous version to roll back to")
                to = stack[-1]
            target = self._versions.get((voice, _norm(to)))
            if target is None:
                raise UnknownVoiceError(f"voice {voice} has no version {to}")
            if target is current:
                raise ConfigError(f"{voice} {to} is already active")
            started = time.monotonic()
            self._ensure_stored(target)
            if target.engine is None and not self._bring_up(target, why):
                raise ConfigError(f"cannot roll back to {voice} {to}: {target.reason}")
            if current.version not in record.rolled_back:
                record.rolled_back.append(current.version)
            current.reason = why
            swapped = self._activate(target, why, push_previous=False, previous_state=State.ROLLED_BACK)
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
                raise ConfigError(f"cannot activate {voice} {version}: {target.reason}")
            record = self.state.voice(voice)
            record.rolled_back = [v for v in record.rolled_back if _norm(v) != _norm(version)]
            swapped = self._activate(target, why)
            return {"voice": voice, "from": current.version if current else None, "to": target.version,
                    "seconds": round(swapped - started, 3)}

    def _ensure_stored(self, target: ModelVersion) -> None:
        """A version known only from the models dir is verified and copied into the store first."""
        if target.engine is not None or target.store is not None:
            return
        if target.source is None:
            raise UnknownVoiceError(f"{target.name} {target.version} is neither in the store nor on disk")
        try:
            manifest = verify(target.source)
            if target.content and content_id(manifest) != target.content:
                raise ConfigError(f"{target.source} changed since it was checked")
            target.manifest = manifest
            target.store = self.store.put(target.source, manifest)
        except (TtsdError, OSError) as exc:
            raise ConfigError(f"cannot serve {target.name} {target.version}: {exc}") from exc

    def _auto_rollback(self, model: ModelVersion, why: str) -> None:
        try:
            if self._active.get(model.name) is model:
                self.rollback(model.name, why=why)
                log.error("%s %s rolled back: %s", model.name, model.version, why)
        except TtsdError as exc:
            log.error("%s %s is failing (%s) but cannot roll back: %s", model.name, model.version, why, exc)

    def _end_canary(self, model: ModelVersion, promote: bool) -> None:
        with self._load_lock:
            if self._canary.get(model.name) is not model:
                return
            if promote:
                self._activate(model, f"canary passed {model.requests} requests")
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
        from .store import VersionRecord

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
    except InvalidVersion:
        return version


def _order(model: ModelVersion) -> Version:
    try:
        return Version(model.version)
    except InvalidVersion:
        return Version("0")


def _lower_thread_priority(nice: int) -> None:
    """Lower this thread's (and the OpenMP threads it starts') CPU priority on Linux."""
    if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, nice))
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
