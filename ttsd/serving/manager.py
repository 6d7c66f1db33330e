"""The model manager: decides which version of each voice serves, and brings versions up and down.

Shape from TF Serving's AspiredVersionsManager. The *source* (``source.py``) hands over folders
with a verdict; the manager decides what each is (a new version, one it knows, one it refuses),
copies a new version into the private store while hashing it (``store.py``), has the *loader*
(``loader.py``) load and warm it beside the serving version, then makes it active by replacing
one reference in the ``ServingMap``. Replaced versions stay loaded as rollback targets (``keep``)
and the rest are unloaded when their last request ends. Every version has an explicit ``State``
(``versions.py``); what serves survives restarts (``state.py``, read back by ``restore.py``).
Bringing a version up, the swap, operator actions (rollback, activate), the automatic ones
(auto-rollback, canary results) and unloading are in ``actions.py``; voices loaded on first use
and unloaded within a memory budget in ``demand.py`` (its policy: ``residency.py``); this module
decides.

Threads: ``start``/``reconcile`` and the actions run on a loader thread and serialise on
``_load_lock``; ``snapshot``/``folders`` and the map's release callback run on any thread and
take ``_lock`` only briefly (lock order: ``_lock``, then the map's). ``spawn`` runs follow-up
work, such as an auto-rollback, on a new thread.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..errors import (
    ResourceError,
    TtsdError,
    VerifyError,
    is_system_oserror,
    resource_error,
)
from ..manifest import Manifest, read_manifest
from ..signing import TrustedKeys, signature_digest
from .actions import OperatorActions
from .demand import OnDemand
from .loader import (
    lower_thread_priority,
)
from .residency import Budget
from .restore import StartUp
from .serving_map import Lease, ServingMap
from .source import Candidate, Source, Verdict
from .state import ServingState, VersionRecord
from .store import ModelStore, content_id
from .versions import (
    COMING_UP,
    Listener,
    ModelVersion,
    Policy,
    State,
    judge,
    norm,
    order,
)

log = logging.getLogger("ttsd.manager")

Found = tuple[Version, Path, Manifest]


class ModelManager(StartUp, OperatorActions, OnDemand):
    def __init__(self, source: Source, *, state_dir: Path, policy: Policy | None = None,
                 engine_options: dict[str, Any] | None = None, default_voice: str | None = None,
                 listener: Listener | None = None, spawn: Callable[[Callable[[], None]], None] | None = None,
                 trust: TrustedKeys | None = None, budget: Budget | None = None) -> None:
        self.source = source
        self.trust = trust  # when set, only folders signed by one of these keys load
        self.policy = policy or Policy()
        self.engine_options = engine_options or {}
        self._listener = listener or (lambda _e, _m: None)
        self._spawn = spawn or (lambda fn: threading.Thread(target=fn, daemon=True).start())
        self.store = ModelStore(state_dir / "store")
        self.state = ServingState(state_dir)
        self.map = ServingMap(on_release=self._released, upgrading=self._upgrading,
                              canary_share=self.policy.canary_share, default_voice=default_voice)
        self._lock = threading.Lock()
        self._load_lock = threading.RLock()
        self._versions: dict[tuple[str, str], ModelVersion] = {}
        self._folders: dict[Path, tuple[str, str]] = {}  # the manager's view of each folder: state, reason
        self._first_scan = True
        self._init_demand(budget)

    # == requests (any thread) ==================================================================
    def acquire(self, voice: str | None = None, version: str | None = None, *, user: str | None = None) -> Lease:
        """A lease from the serving map (front ends get ``map.acquire`` itself)."""
        return self.map.acquire(voice, version, user=user)

    def _released(self, key: tuple[str, str], ok: bool | None) -> None:
        """The map's callback when a request ends: judge a new version by it, and unload a
        replaced version once its last request is done."""
        action = None
        with self._lock:
            self._used(key[0])
            model = self._versions.get(key)
            if model is None:
                return
            if ok is not None:  # None: the request's or the box's fault, never counted against a model
                model.served += ok
                model.model_failures += not ok
                action = judge(model, ok, self.policy)
            idle = model.state in (State.RETIRED, State.ROLLED_BACK)
        self._room_changed()  # a load waiting for an idle voice to unload may go on
        if idle:
            self._unload(model)
        if action == "rollback":
            why = f"auto-rollback: {model.failures} of its first {model.requests} requests failed"
            self._spawn(lambda: self._auto_rollback(model, why))
        elif action is not None:
            self._spawn(lambda: self._end_canary(model, promote=action == "promote"))

    def _upgrading(self) -> set[str]:
        # called under the map's lock: reads without ours (a racy read only changes 503 vs 404)
        return {m.name for m in list(self._versions.values()) if m.state in COMING_UP}

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
        return self._versions.get((name, norm(version)))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted({m.name for m in self._versions.values()})
            default = self.map.default_name()
            voices = []
            for name in names:
                active, canary = self._active(name), self._versions.get(self.map.canary(name) or ("", ""))
                versions = sorted((m for m in self._versions.values() if m.name == name), key=order)
                voices.append({
                    "name": name, "default": name == default,
                    "active": active.version if active else None,
                    "canary": canary.version if canary else None,
                    "sample_rate": active.manifest.sample_rate if active and active.manifest else None,
                    **_voice_facts(active), **self._residency(name, active),
                    "versions": [m.describe(self.map.in_flight(m.key)) for m in versions],
                })
            return voices

    def folders(self) -> list[dict[str, Any]]:
        """Folders in the models dir that are not (yet) a version: incomplete or refused."""
        present = self.source.present()
        return [{"folder": str(path), "state": state, "reason": reason}
                for path, (state, reason) in sorted(self._folders.items())
                if path in present and state in ("incomplete", "refused")]

    def history(self) -> list[dict[str, Any]]:
        return self.state.history()

    def _active(self, name: str) -> ModelVersion | None:
        key = self.map.active(name)
        return self._versions.get(key) if key else None

    # == deciding (loader threads) =============================================================
    def retry_now(self) -> None:
        """Versions waiting after a system failure are retried at the next reconcile (SIGHUP)."""
        with self._lock:
            for model in self._versions.values():
                model.retry_at = 0.0

    def reconcile(self) -> None:
        """Take the source's new verdicts, promote the newest good new version of each voice, and
        bring up a voice that has no active version. No one folder or version can stop the rest."""
        with self._load_lock:
            # Everything a reconcile does (hashing, copying, loading, warming up) waits for idle CPU
            # time: measured with the default layout, nice 10 still cost live requests 20-60% while
            # a version loaded (a waking nice-10 thread preempts the workers' OpenMP threads, and
            # their barriers wait); SCHED_IDLE never preempts them. Under full load an upgrade
            # then takes ~3x longer (bench/hotswap.py).
            lower_thread_priority(self.policy.loader_nice, idle=self.policy.background_idle)
            ready: dict[str, list[Found]] = {}
            for candidate in self.source.scan():
                try:
                    manifest = self._take(candidate)
                except Exception as exc:  # no one folder may stop the rest
                    self._unforeseen(candidate.path, exc)
                    continue
                if manifest is not None:
                    ready.setdefault(manifest.name, []).append((manifest.parsed_version, candidate.path, manifest))
            first, self._first_scan = self._first_scan, False
            if first:
                self._resume_saved()
            for name, found in sorted(ready.items()):
                self._promote_newest(name, found)
            if first:
                for model in self._versions.values():
                    if model.state is State.VERIFYING:
                        model.state = State.AVAILABLE
            self._forget_vanished()
            for name in sorted({m.name for m in self._versions.values()}):
                self._retry_deferred(name)
                if self._active(name) is None and not any(
                        m.name == name and m.state in COMING_UP for m in self._versions.values()):
                    self._fall_back(name)  # (the memory policy's reload is not "no version")
            self._save()

    def _take(self, candidate: Candidate) -> Manifest | None:
        """What a folder the source handed over is to the manager; its manifest when it holds a
        new version to copy in and load."""
        path, manifest = candidate.path, candidate.manifest
        if manifest is None:  # no readable manifest: the source's verdict is all there is
            self._folders[path] = (candidate.verdict.value, candidate.reason)
            return None
        key, content = (manifest.name, norm(manifest.version)), content_id(manifest)
        known = self._versions.get(key)
        if known is not None and known.content == content and not known.fresh \
                and known.state not in (State.INCOMPLETE, State.DEFERRED) and not self._signed_again(known, path):
            self._folders[path] = ("known", "")
            known.source = path
            return None
        # the same version with other content is refused, when ttsd holds that version (a store
        # copy or a loaded engine); a content known only from state.json's record is not proof
        if known is not None and known.content and known.content != content and known.state is not State.REFUSED \
                and (known.store is not None or known.engine is not None):
            reason = (f"{manifest.name} {manifest.version} is already known with different content; "
                      "give the new folder a new version")
            self._folders[path] = ("refused", reason)
            log.warning("refused %s: %s", path, reason)
            return None
        model = known or ModelVersion(manifest.name, manifest.version, State.VERIFYING, source=path)
        model.content, model.source, model.manifest, model.fresh = content, path, manifest, False
        self._versions[key] = model
        if manifest.version in self.state.voice(manifest.name).rolled_back:
            model.state, model.reason = State.ROLLED_BACK, "rolled back earlier; 'ttsd activate' serves it"
            self._folders[path] = ("known", "")
            return None
        active = self._active(manifest.name)
        if active is not None and manifest.parsed_version <= Version(active.version) and not self._first_scan:
            self._refuse(model, f"version {manifest.version} is not newer than the active {active.version} "
                                "('ttsd activate' serves it anyway)", path)
            return None
        if candidate.verdict is Verdict.INCOMPLETE:
            model.state, model.reason = State.INCOMPLETE, candidate.reason
            self._folders[path] = ("incomplete", candidate.reason)
            return None
        if candidate.verdict is Verdict.REFUSED:
            self._refuse(model, candidate.reason, path)
            return None
        model.state = State.VERIFYING
        self._folders[path] = ("known", "")
        self._listener("verifying", model)
        return manifest

    @staticmethod
    def _signed_again(known: ModelVersion, path: Path) -> bool:
        """A version refused for its signature whose folder now holds another ``model.sig``: the
        operator signed it (again), so it is judged again."""
        return (known.state is State.REFUSED and known.refused_signature is not None
                and signature_digest(path) != known.refused_signature)

    def _promote_newest(self, name: str, found: list[Found]) -> None:
        for number, path, manifest in sorted(found, key=lambda c: c[0], reverse=True):
            model = self._versions[(name, norm(manifest.version))]
            active = self._active(name)
            if active is not None and number <= Version(active.version):
                model.state = State.AVAILABLE  # e.g. older folders found at start-up
                continue
            if self._promote(model, path, "new version in the models dir"):
                # Older new ones: known, copied in when they are needed, not loaded.
                for _, _, other in found:
                    other_model = self._versions[(name, norm(other.version))]
                    if other_model is not model and other_model.state is State.VERIFYING:
                        other_model.state = State.AVAILABLE
                return

    def _fall_back(self, name: str, for_request: bool = False) -> None:
        """A voice with no active version (its saved one is damaged or gone, or the state was
        lost) serves the newest version that verifies and loads, from the store or the models
        dir. Rolled-back and refused versions are not taken; ones waiting to retry are, when due.
        Within a memory budget it stays loaded only if a request waits for it or it is preloaded."""
        rolled_back = {norm(v) for v in self.state.voice(name).rolled_back}
        now = time.monotonic()
        options = sorted((m for m in self._versions.values() if m.name == name
                          and m.state not in (State.REFUSED, State.ROLLED_BACK, State.INCOMPLETE)
                          and norm(m.version) not in rolled_back and (m.store is not None or m.source is not None)
                          and (m.state is not State.DEFERRED or m.retry_at <= now)),
                         key=order, reverse=True)
        for model in options:
            try:
                self._ensure_stored(model)
            except TtsdError as exc:  # its folder changed or the disk is full: try again later
                self._defer(model, str(exc))
                continue
            if self._bring_up(model, "the voice had no active version"):
                self._activate(model, "fallback: newest version that verifies", durable=False)
                log.warning("%s: serving %s, the newest version that verifies", name, model.version)
                self._park_if_cold(model, was_loaded=for_request)
                return

    def _retry_deferred(self, name: str) -> None:
        """A new version that failed for a system reason (disk full while storing it, out of
        memory while loading) is tried again when its back-off is over, or at once after SIGHUP
        or when its folder changes."""
        active = self._active(name)
        now = time.monotonic()
        due = sorted((m for m in self._versions.values() if m.name == name and m.state is State.DEFERRED
                      and m.retry_at <= now and m.source is not None
                      and (active is None or order(m) > Version(active.version))), key=order, reverse=True)
        for model in due[:1]:
            assert model.source is not None
            log.info("retrying %s %s (%s)", model.name, model.version, model.reason)
            try:
                model.manifest = read_manifest(model.source)
                if content_id(model.manifest) != model.content:
                    raise VerifyError(f"{model.source} changed since it was checked")
            except (TtsdError, OSError) as exc:
                if isinstance(exc, OSError) and is_system_oserror(exc):
                    self._defer(model, str(resource_error(exc, "reading it")))
                else:
                    self._refuse(model, str(exc))
                continue
            self._promote(model, model.source, "retried after a system failure")

    def _forget_vanished(self) -> None:
        """Versions seen only as a folder that is gone, and never stored, are forgotten; a version
        caught mid-check by its folder's deletion goes back to what it was."""
        present = self.source.present()
        for path in set(self._folders) - present:
            del self._folders[path]
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

    def _refuse(self, model: ModelVersion, reason: str, folder: Path | None = None) -> None:
        """The version's content cannot serve (it fails verification, loading or warm-up): refused
        for good under this content, and its store copy is dropped unless it is in use."""
        model.state, model.reason = State.REFUSED, reason
        if folder is not None:
            self._folders[folder] = ("refused", reason)
        log.warning("refused %s %s: %s", model.name, model.version, reason)
        if model.store is not None and model.engine is None and not self.map.in_flight(model.key):
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
        """Copy ``model`` into the store (hashing it: the one time its bytes are read from the
        models dir), load and warm it beside the serving version, then swap (or start a canary).
        The memory policy unloads the serving version only once the copy is made and checked, so
        a folder that does not match its manifest never takes the voice down."""
        if not self._store_new(model, folder):
            return False
        previous = self._active(model.name)
        was_loaded = previous is not None and previous.engine is not None
        if self.policy.swap == "memory" and previous is not None:
            self._retire_now(previous)
        if not self._bring_up(model, why, verified=True):  # put() hashed the copy it made
            return self._restore_after_failure(previous)
        if self.policy.canary_share(model.name) > 0 and previous is not None and self.policy.swap != "memory":
            self._start_canary(model)
            return True
        try:
            self._activate(model, why)
        except ResourceError as exc:  # the swap could not be recorded: it does not happen yet
            self._unload(model)
            self._defer(model, str(exc))
            return self._restore_after_failure(previous)
        model.backoff = 0.0
        self._park_if_cold(model, was_loaded)
        return True

    def _store_new(self, model: ModelVersion, folder: Path) -> bool:
        """``store.put`` for a new version, each failure sorted by whose fault it is: the folder's
        (refused), a copy still in progress (incomplete: the source looks again), the box's
        (deferred, with a back-off), the folder vanishing (forgotten), or unforeseen (refused
        until the folder changes, logged once)."""
        try:
            assert model.manifest is not None
            model.store = self.store.put(folder, model.manifest)
            return True
        except Exception as exc:  # sorted below; MemoryError is an Exception too
            if not os.path.lexists(folder):  # it went away while it was copied: forgotten
                self.source.again(folder)
                self._undo_check(folder)
            elif isinstance(exc, VerifyError) and exc.looks_incomplete():  # changed since it was judged
                model.state, model.reason = State.INCOMPLETE, str(exc)
                self._folders[folder] = ("incomplete", str(exc))
                self.source.again(folder)
            elif isinstance(exc, MemoryError) or is_system_oserror(exc):  # the box's: wait, then retry
                self._defer(model, str(resource_error(exc, "copying it into the store")))
            elif isinstance(exc, VerifyError):
                self._refuse(model, str(exc), folder)
            elif isinstance(exc, (TtsdError, OSError)):
                self._refuse(model, f"could not copy into the store: {exc}", folder)
            else:  # a bug, or input no check foresaw
                self._unforeseen(folder, exc)
            return False

    def _unforeseen(self, folder: Path, exc: BaseException) -> None:
        """An error no check foresaw while looking at ``folder``: its version goes back to what it
        was, and the folder is refused until it changes (one traceback, not one per rescan)."""
        log.error("checking %s failed; refused until it changes", folder, exc_info=exc)
        self._undo_check(folder)
        self._folders[folder] = ("refused", f"could not be checked: {type(exc).__name__}: {exc}"[:500])

    def _save(self) -> None:
        """Write every version's record (best effort: retried at the next call when the disk is
        full; transitions that must not be lost went through ``ServingState.commit``)."""
        for model in self._versions.values():
            if model.content:
                state = model.state if model.state not in (*COMING_UP, State.INCOMPLETE) else State.AVAILABLE
                self.state.versions[f"{model.name}/{model.version}"] = VersionRecord(
                    content=model.content, state=state.value, reason=model.reason)
        self.state.save()


_PIPER_LANGUAGE = re.compile(r"^([a-z]{2,3}_[A-Z]{2})-")


def _voice_facts(active: ModelVersion | None) -> dict[str, Any]:
    """What a client choosing a voice wants to know of its active version: languages (the
    manifest's ``languages``, else a Piper-style name such as ``en_US-joe-medium``), speakers (the
    engine's), description and licence (the manifest's)."""
    manifest = active.manifest if active else None
    languages: list[str] = []
    if manifest is not None:
        given = manifest.extra.get("languages", manifest.extra.get("language"))
        if isinstance(given, str):
            languages = [given]
        elif isinstance(given, list):
            languages = [str(g) for g in given if isinstance(g, str)][:20]
        elif match := _PIPER_LANGUAGE.match(manifest.name):
            languages = [match.group(1)]
    speakers: list[str] = []
    precision = None  # the number format the loaded engine computes in (fp32 / bf16), if it says
    if active is not None and active.engine is not None:
        try:
            info = active.engine.info()
            speakers = sorted(str(s) for s in info.get("speakers", {}))[:1000]
            precision = info.get("precision")
        except Exception:  # noqa: BLE001 - facts for a listing: never let them fail it
            speakers = []
    return {"languages": languages, "speakers": speakers, "precision": precision,
            "description": manifest.description if manifest else "", "license": manifest.license if manifest else ""}


__all__ = ["ModelManager"]
