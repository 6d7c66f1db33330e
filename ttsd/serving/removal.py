"""``ttsd models remove VOICE``: a voice leaves the running daemon, with no restart.

A voice serves from its store copy (``STATE/store/NAME``) once its folders are in, so deleting
its folders from the models dir does not stop it (that is what lets a rollback work after a
folder is deleted). Removing it is this operator's action:

* refused while the voice still has a folder in the models dir (the next scan would bring it
  back), while it is ``--default-voice``, or while it is the only voice that serves (the daemon
  would serve nothing: add the voice that replaces it first);
* an operator's job of the voice (``jobs.py``), on no lane (it loads nothing, so no other voice's
  load waits behind it): a background job of the voice (an upgrade, the restart's load of
  rollback targets) is called off, an urgent one (a load for a waiting request, the memory
  policy's upgrade) is waited for, and no rescan starts another meanwhile
  (``ModelManager.reconcile`` skips a voice with a job);
* the voice leaves the serving map first: new requests naming it get 404 ``unknown_voice``;
  requests already holding it finish (bounded by ``wait``; after that its engines are unloaded
  under them, the daemon's fault, not counted against any model); then its versions are
  unloaded and its store dir deleted; its records left ``state.json`` when it left the map. Its
  rollback marks stay, as at a start-up's ``Lifecycle.forget_voice``: a version rolled back (or a
  fleet's withdrawal) dropped in again later still does not serve by itself. The audit trail says
  it was removed.

Killed midway, the restart finishes the job: the store dir is gone or whole, and a voice with no
folder and no store dir is forgotten at start-up (``Lifecycle.forget_voice``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConflictError, ManifestError, ResourceError, StateLockedError, UnknownVoiceError, os_error
from ..manifest import check_name
from ..models_dir import scan
from .jobs import Jobs
from .lifecycle import Lifecycle
from .serving_map import shown_name
from .state import ServingState, StateDirLock, VoiceRecord
from .store import ModelStore
from .table import VersionTable
from .versions import COMING_UP, Listener, ModelVersion, State

log = logging.getLogger("ttsd.manager")

MAX_SHOWN = 5  # folders named in a refusal


class Removal:
    def __init__(
        self,
        table: VersionTable,
        lifecycle: Lifecycle,
        jobs: Jobs,
        state: ServingState,
        store: ModelStore,
        listener: Listener,
        *,
        forget_use: Callable[[str], None] = lambda _name: None,
        wake: Callable[[], None] = lambda: None,
        wait: float = 30.0,
    ) -> None:
        """``forget_use``: the memory budget forgets when the voice was last used; ``wake``: a
        rescan soon; ``wait``: seconds requests already holding the voice may go on before it is
        unloaded under them."""
        self.table, self.lifecycle, self.jobs, self.state, self.store = table, lifecycle, jobs, state, store
        self.map = lifecycle.map
        self._listener, self._forget_use, self._wake, self.wait = listener, forget_use, wake, wait

    def remove(self, voice: str, why: str = "removed") -> dict[str, Any]:
        """Remove ``voice`` (see the module docstring): ``UnknownVoiceError`` for a voice this
        daemon does not have, ``ConflictError`` saying why it cannot go now, the ``OSError`` that
        stopped its store dir from being moved (``os_error``; then nothing changed)."""
        started = time.monotonic()
        self._check(voice)
        return self.jobs.start(
            voice,
            f"removal of {voice}",
            lambda _ticket: self._remove(voice, why, started),
            urgent=True,
            supersede=True,
            operator=True,
            laned=False,  # it loads nothing; its wait for the voice's last requests holds up no other voice
        ).result()

    def _check(self, voice: str) -> None:
        if voice not in self.table.names():
            raise UnknownVoiceError(f"unknown voice {shown_name(voice)!r}")
        if voice == self.map.default_voice:
            raise ConflictError(f"{voice} is the daemon's --default-voice: start it with another --default-voice first")
        if self.map.active(voice) is not None and not any(
            self.map.active(name) is not None for name in self.table.names() if name != voice
        ):
            raise ConflictError(
                f"{voice} is the only voice that serves: the daemon would serve nothing; add the voice that "
                "replaces it first"
            )
        _refuse_folders(voice, sorted({str(m.folder) for m in self.table.of(voice) if _on_disk(m)}))

    def _remove(self, voice: str, why: str, started: float) -> dict[str, Any]:
        with self.lifecycle.commit:
            self._check(voice)  # again, in the voice's job: a folder may have come, another voice gone
            try:  # first, so nothing has changed when it cannot be done (one rename)
                aside = self.store.set_voice_aside(voice)
            except OSError as exc:
                raise os_error(
                    exc, f"removing {voice}", f"cannot remove {voice}: its store dir {self.store.root / voice}"
                ) from None
            active = self.lifecycle.active(voice)
            with self.table.locked():
                models = self.table.of(voice)
                for model in models:
                    model.store_copy = None
                    if model.engine is not None:  # nothing judges it any more; its last release unloads it
                        model.state = State.RETIRED
            self.map.drop_voice(voice)
            # on disk before the wait: killed from here on, the restart finds no store dir and no
            # voice record (a rescan meanwhile may write its version records back), and forgets
            # what is left of the voice without a warning
            self._forget_records(voice, models)
        self.state.record(voice, active.version if active is not None else None, None, why)
        try:
            log.warning("%s: being removed (%s): requests naming it are refused from now on", voice, why)
            self._unload(voice, models)
            with self.lifecycle.commit, self.table.locked():
                gone: list[ModelVersion] = []
                kept = False
                for model in self.table.of(voice):
                    # (a folder dropped in meanwhile is a version of the voice again: it stays, and
                    # its upgrade brings the voice back)
                    if not _on_disk(model) and model.engine is None and model.state not in COMING_UP:
                        self.table.drop(model)
                        gone.append(model)
                    else:
                        kept = True
                marks = self._forget_records(voice, gone)  # again: a rescan may have saved them meanwhile
                self.lifecycle.forget_retired(voice)
        finally:
            self.map.forget_voice(voice)
        self._forget_use(voice)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        for model in gone:
            self._listener("removed", model)  # ttsd_model_transitions_total{event="removed"}; metrics forgotten
        if kept:
            self._wake()  # (a folder of a version it had: taken up at the next rescan, now)
        log.warning(
            "%s removed (%s): %s left the daemon%s",
            voice,
            why,
            ", ".join(sorted(m.version for m in gone)) or "no version",
            f"; its rollback marks stay ({', '.join(marks)})" if marks else "",
        )
        return {
            "voice": voice,
            "removed": sorted(m.version for m in gone),
            "active": active.version if active is not None else None,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _forget_records(self, voice: str, models: list[ModelVersion]) -> tuple[str, ...]:
        """``models``' records and the voice's leave ``state.json`` (written now, best effort);
        its rollback marks stay. Returns them."""
        marks = self.state.voice(voice).rolled_back
        self.state.forget_versions(f"{m.name}/{m.version}" for m in models)
        self.state.drop(voice, keep=VoiceRecord(rolled_back=marks) if marks else None)
        self.state.save()
        return marks

    def _unload(self, voice: str, models: list[ModelVersion]) -> None:
        """Unload ``models`` once the requests holding them are done, or after ``wait`` seconds
        under them (their leases are cut: the daemon's doing, not the model's)."""
        deadline = time.monotonic() + self.wait
        while (held := sum(self.map.in_flight(m.key) for m in models)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if held:
            log.warning("%s: %d request(s) still held it after %g s; it is unloaded under them", voice, held, self.wait)
        for model in models:
            if model.engine is not None or self.map.loaded(model.key):
                self.lifecycle.unload(model, force=True)


def _on_disk(model: ModelVersion) -> bool:
    """Whether ``model``'s folder is in the models dir (read on disk: one deleted a moment ago,
    the rescan not yet run, is not)."""
    return model.folder is not None and os.path.lexists(model.folder)


def remove_stopped(voice: str, models: Path, state_dir: Path, why: str = "removed") -> dict[str, Any]:
    """``ttsd models remove`` with no daemon running on ``state_dir``: the same refusals, as far
    as they can be told from disk (its folders in ``models``; the only voice), then its store dir
    and its records in ``state.json`` go, its rollback marks stay, and the audit trail says so.
    The next start serves on without it. ``StateLockedError`` while a daemon holds the state dir
    (it is removed through that daemon). A ``--default-voice`` is the daemon's flag, not known
    here: the next start says it names no voice."""
    started = time.monotonic()
    try:  # before it is joined into a path: "../../x" named a directory outside the store
        check_name(voice)
    except ManifestError:
        raise UnknownVoiceError(f"unknown voice {shown_name(voice)!r} (not a voice name)") from None
    store = ModelStore(state_dir / "store")
    if not state_dir.is_dir():
        raise UnknownVoiceError(f"unknown voice {shown_name(voice)!r} (no state dir {state_dir})")
    lock = StateDirLock(state_dir)
    try:
        lock.acquire()
    except StateLockedError as exc:
        raise StateLockedError(f"{exc} (a daemon runs: remove it through that daemon's --socket)") from None
    try:
        state = ServingState(state_dir)
        state.load()
        record = state.voices().get(voice)
        stored = {name for name, _version, _path in store.scan()}
        known = os.path.lexists(store.root / voice) or any(key.partition("/")[0] == voice for key in state.versions())
        if not known and (record is None or record.active is None):  # (only rollback marks: removed before)
            raise UnknownVoiceError(f"unknown voice {shown_name(voice)!r}")
        found = [c for c in scan(models) if c.manifest is not None] if models.is_dir() else []
        folders = sorted(str(c.folder) for c in found if c.manifest is not None and c.manifest.name == voice)
        others = {c.manifest.name for c in found if c.manifest is not None} | stored  # what can serve
        if not others - {voice}:
            raise ConflictError(
                f"{voice} is the only voice: the daemon would serve nothing; add the voice that replaces it first"
            )
        _refuse_folders(voice, folders)
        try:
            aside = store.set_voice_aside(voice)
        except OSError as exc:
            raise os_error(
                exc, f"removing {voice}", f"cannot remove {voice}: its store dir {store.root / voice}"
            ) from None
        versions = sorted(
            {key.partition("/")[2] for key in state.versions() if key.partition("/")[0] == voice}
            | ({path.name for path in aside.iterdir() if path.is_dir()} if aside is not None else set())
        )
        marks = record.rolled_back if record is not None else ()
        state.forget_versions(f"{voice}/{version}" for version in versions)
        state.drop(voice, keep=VoiceRecord(rolled_back=marks) if marks else None)
        if not state.save():
            raise ResourceError(f"cannot write {state.path}: {voice}'s store dir is gone, the next start forgets it")
        state.record(voice, record.active if record is not None else None, None, why)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        lock.release()
    return {
        "voice": voice,
        "removed": versions,
        "active": record.active if record is not None else None,
        "seconds": round(time.monotonic() - started, 3),
    }


def _refuse_folders(voice: str, folders: list[str]) -> None:
    """``ConflictError`` naming ``voice``'s folders in the models dir: the next scan would bring it back."""
    if folders:
        listed = ", ".join(folders[:MAX_SHOWN]) + (
            f" and {len(folders) - MAX_SHOWN} more" if len(folders) > MAX_SHOWN else ""
        )
        raise ConflictError(
            f"{voice} still has {'a folder' if len(folders) == 1 else f'{len(folders)} folders'} in the models "
            f"dir, which would bring it back: {listed}; delete {'it' if len(folders) == 1 else 'them'} first"
        )
