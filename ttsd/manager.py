"""The model manager: which version of each voice serves, and the one place versions are loaded,
swapped and unloaded.

Shape taken from TF Serving's AspiredVersionsManager: a *source* (``catalog.scan``) says what is
on disk; the manager verifies, loads and warms a version beside the serving one, then makes it
active by replacing one reference. Requests take a ``Lease`` on the version that was active when
they started and keep it to the end, so a swap never changes the model under a running request;
a replaced version is unloaded when its last lease ends.

Thread contract: ``rescan`` runs on one loader thread at a time (it holds ``_load_lock``);
``acquire``/``release``/``snapshot`` are called from any thread and only take ``_lock`` briefly.
Nothing here blocks the event loop: the daemon calls ``rescan`` in an executor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from packaging.version import Version

from .catalog import scan
from .engines import Engine, create_engine
from .errors import TtsdError, UnknownVoiceError
from .manifest import Manifest, verify

log = logging.getLogger("ttsd.manager")


class State(str, Enum):
    VERIFYING = "verifying"
    LOADING = "loading"
    WARMING = "warming"
    ACTIVE = "active"
    RETIRED = "retired"  # replaced; unloaded once its last request ends
    UNLOADED = "unloaded"
    REFUSED = "refused"


@dataclass
class ModelVersion:
    """One version of one voice. ``engine`` is set only while loaded."""

    name: str
    version: str
    folder: Path
    state: State
    manifest: Manifest | None = None
    engine: Engine[Any] | None = None
    reason: str = ""
    in_flight: int = 0
    load_seconds: float = 0.0
    loaded_at: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, _norm(self.version))

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "state": self.state.value, "folder": str(self.folder),
                "reason": self.reason or None, "in_flight": self.in_flight}


@dataclass
class Lease:
    """A request's hold on one loaded version; release exactly once (use as a context manager)."""

    model: ModelVersion
    _release: Callable[[ModelVersion], None]
    _released: bool = field(default=False, repr=False)

    @property
    def engine(self) -> Engine[Any]:
        assert self.model.engine is not None
        return self.model.engine

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self.model)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


Listener = Callable[[str, ModelVersion], None]  # (event, version): "loaded", "activated", "refused", "unloaded"


class ModelManager:
    def __init__(self, models_dir: Path, *, engine_options: dict[str, Any] | None = None,
                 default_voice: str | None = None, listener: Listener | None = None) -> None:
        self.models_dir = models_dir
        self.engine_options = engine_options or {}
        self.default_voice = default_voice
        self._listener = listener or (lambda _event, _model: None)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._active: dict[str, ModelVersion] = {}
        self._versions: dict[tuple[str, str], ModelVersion] = {}
        # A refused folder is not retried until its manifest or files change (mtime/size signature).
        self._refused_sig: dict[Path, tuple[float, ...]] = {}

    # -- requests ------------------------------------------------------------------------------
    def acquire(self, voice: str | None = None, version: str | None = None) -> Lease:
        """Lease the active version of ``voice`` (or a specific loaded ``version``)."""
        with self._lock:
            name = voice or self._default_name()
            if name is None:
                raise UnknownVoiceError("no voice is ready yet")
            if version is not None:
                model = self._versions.get((name, _norm(version)))
                if model is None or model.engine is None or model.state not in (State.ACTIVE, State.RETIRED):
                    raise UnknownVoiceError(f"voice {name} has no loaded version {version}")
            else:
                model = self._active.get(name)
                if model is None:
                    known = ", ".join(sorted(self._active)) or "none"
                    raise UnknownVoiceError(f"unknown voice {name!r} (voices: {known})")
            model.in_flight += 1
            return Lease(model, self._release)

    def _release(self, model: ModelVersion) -> None:
        with self._lock:
            model.in_flight -= 1
            idle_retired = model.state is State.RETIRED and model.in_flight == 0
        if idle_retired:
            self._unload(model)

    def _default_name(self) -> str | None:
        if self.default_voice and self.default_voice in self._active:
            return self.default_voice
        return min(self._active) if self._active else None

    # -- what serves ---------------------------------------------------------------------------
    def ready(self) -> bool:
        with self._lock:
            return bool(self._active)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every voice with its active version and every known version's state."""
        with self._lock:
            names = sorted({m.name for m in self._versions.values()})
            default = self._default_name()
            return [
                {
                    "name": name,
                    "default": name == default,
                    "active": self._active[name].version if name in self._active else None,
                    "sample_rate": self._active[name].manifest.sample_rate  # type: ignore[union-attr]
                    if name in self._active else None,
                    "versions": [m.describe() for m in sorted(
                        (m for m in self._versions.values() if m.name == name),
                        key=lambda m: _version_key(m.version))],
                }
                for name in names
            ]

    # -- loading -------------------------------------------------------------------------------
    def rescan(self) -> None:
        """Make the newest good version of every voice on disk active. Runs on a loader thread."""
        with self._load_lock:
            newest: dict[str, tuple[Version, Path, Manifest]] = {}
            for cand in scan(self.models_dir):
                if cand.manifest is None:
                    self._refuse_folder(cand.folder, cand.problem)
                    continue
                m = cand.manifest
                if not newest.get(m.name) or m.parsed_version > newest[m.name][0]:
                    newest[m.name] = (m.parsed_version, cand.folder, m)
            for name, (version, folder, manifest) in sorted(newest.items()):
                active = self._active.get(name)
                if active is not None and _version_key(active.version) >= version:
                    continue
                if self._refused_sig.get(folder) == _signature(folder):
                    continue
                self._load_and_activate(folder, manifest)

    def _refuse_folder(self, folder: Path, reason: str) -> None:
        sig = _signature(folder)
        if self._refused_sig.get(folder) != sig:
            self._refused_sig[folder] = sig
            log.warning("refused %s: %s", folder, reason)

    def _load_and_activate(self, folder: Path, manifest: Manifest) -> None:
        model = ModelVersion(manifest.name, manifest.version, folder, State.VERIFYING, manifest)
        with self._lock:
            self._versions[model.key] = model
        started = time.monotonic()
        engine: Engine[Any] | None = None
        try:
            model.manifest = verify(folder)
            model.state = State.LOADING
            engine = create_engine(folder, model.manifest, **self.engine_options)
            engine.load()
            model.state = State.WARMING
            engine.warmup()
        except Exception as exc:  # TtsdError says why; anything else is the model crashing its engine
            if engine is not None:
                engine.unload()
            reason = str(exc) if isinstance(exc, TtsdError) else f"{type(exc).__name__}: {exc}"
            model.state, model.reason = State.REFUSED, reason
            self._refused_sig[folder] = _signature(folder)
            log.warning("refused %s %s: %s", model.name, model.version, exc)
            self._listener("refused", model)
            return
        model.engine = engine
        model.load_seconds = time.monotonic() - started
        model.loaded_at = time.time()
        self._listener("loaded", model)
        with self._lock:
            previous = self._active.get(model.name)
            self._active[model.name] = model  # the swap: one reference
            model.state = State.ACTIVE
            if previous is not None:
                previous.state = State.RETIRED
            idle_previous = previous is not None and previous.in_flight == 0
        log.info("%s %s active (loaded and warmed in %.2f s)", model.name, model.version, model.load_seconds)
        self._listener("activated", model)
        if idle_previous and previous is not None:
            self._unload(previous)

    def _unload(self, model: ModelVersion) -> None:
        with self._lock:
            engine, model.engine = model.engine, None
            model.state = State.UNLOADED
        if engine is not None:
            engine.unload()
            log.info("%s %s unloaded", model.name, model.version)
            self._listener("unloaded", model)

    def close(self) -> None:
        """Unload everything (at shutdown, after requests have drained)."""
        with self._lock:
            models = [m for m in self._versions.values() if m.engine is not None]
            self._active.clear()
        for model in models:
            self._unload(model)


def _norm(version: str) -> str:
    try:
        return str(Version(version))
    except Exception:
        return version


def _version_key(version: str) -> Version:
    return Version(version)


def _signature(folder: Path) -> tuple[float, ...]:
    """Cheap change detector for a folder: names, sizes and mtimes of its entries."""
    try:
        entries = sorted(folder.rglob("*"))
        return tuple(x for p in entries for x in (hash(p.name), p.lstat().st_size, p.lstat().st_mtime))
    except OSError:
        return (time.time(),)
