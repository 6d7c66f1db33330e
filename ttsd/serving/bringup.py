"""Bringing one version up: the slow work, run by a job outside every lock but the table's brief ones.

* ``store_new``: a new version's folder copied into the private store while it is hashed (the one
  time its bytes are read from the models dir), each failure sorted by whose fault it is;
* ``ensure_stored``: a known version that is only a folder is copied in the same way;
* ``bring_up``: the store copy verified (copied again if damaged), its signature checked against
  the trusted keys as they are *now* (the key dir is read at each load: a key removed stops
  loading at once), then the engine loaded and warmed up.

A failure of the version's own refuses it; one of the box's (disk full, out of memory, a damaged
copy with nothing to copy again, an unreadable key dir) defers it. ``Superseded`` (the job was
called off) passes through untouched: the job cleans up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engines import engine_class
from ..errors import (
    ConfigError,
    ConflictError,
    ResourceError,
    SignatureError,
    TtsdError,
    UnknownVoiceError,
    VerifyError,
    is_system_oserror,
    out_of_memory,
    resource_error,
)
from ..malloc import resident_bytes
from ..manifest import read_manifest
from ..signing import TrustedKeys, signature_digest
from ..signing import describe as describe_signature
from .lifecycle import Lifecycle
from .loader import StoreLost, check_store_copy, load_engine
from .pacing import checkpoint, unpaced
from .store import ModelStore, content_id
from .table import VersionTable
from .versions import Listener, ModelVersion, State

log = logging.getLogger("ttsd.manager")


def _import_engine(name: str) -> type[Any]:
    """``engine_class``, its module's first import not paced while nothing is served (``unpaced``)."""
    with unpaced():
        return engine_class(name)


class BringUp:
    def __init__(
        self,
        table: VersionTable,
        store: ModelStore,
        lifecycle: Lifecycle,
        *,
        engine_options: dict[str, Any],
        listener: Listener,
        trusted_keys: Path | None,
        make_room: Callable[[ModelVersion], object],
        live: Callable[[], bool],
    ) -> None:
        self.table, self.store, self.lifecycle = table, store, lifecycle
        self._options, self._listener = engine_options, listener
        self.trusted_keys = trusted_keys  # when set, only folders signed by a key in it load
        self._make_room = make_room
        self._live = live  # whether requests may be served now (a voice is active, or one is served)

    # == into the store =========================================================================
    def store_new(self, model: ModelVersion, folder: Path, again: Callable[[Path], None]) -> bool:
        """Copy a new version's folder into the store, hashing it. False when it cannot be: the
        folder's fault (refused), a copy still in progress (incomplete: ``again`` asks the source
        to look again), the box's (deferred), the folder vanishing (forgotten), or unforeseen
        (refused until the folder changes, logged once)."""
        try:
            assert model.manifest is not None
            copy = self.store.put(folder, model.manifest)
        except Exception as exc:  # sorted below; MemoryError is an Exception too
            if not os.path.lexists(folder):  # it went away while it was copied: forgotten
                log.warning(
                    "%s went away while it was copied into the store; it is looked at again if it comes back", folder
                )
                again(folder)
                self.lifecycle.forget_folder(folder)
            elif isinstance(exc, VerifyError) and exc.looks_incomplete():  # changed since it was judged
                with self.table.locked():
                    model.state, model.reason = State.INCOMPLETE, str(exc)
                    self.table.see_folder(folder, "incomplete", str(exc))
                again(folder)
            elif isinstance(exc, MemoryError) or is_system_oserror(exc) or self._in_store(exc):
                # the box's (a full disk; the store, ttsd's own dir, made unwritable): wait, retry
                self.lifecycle.defer(model, str(resource_error(exc, "copying it into the store")))
            elif isinstance(exc, VerifyError):
                self.lifecycle.refuse(model, str(exc), folder)
            elif isinstance(exc, (TtsdError, OSError)):
                self.lifecycle.refuse(model, f"could not copy into the store: {exc}", folder)
            else:  # a bug, or input no check foresaw
                self.lifecycle.unforeseen(folder, exc)
            return False
        self.table.change(model, store_copy=copy)
        return True

    def _in_store(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an ``OSError`` on a path in the store (permissions changed under it,
        its voice's folder replaced by a file): ttsd's own dir, never the version's fault (such a
        version was refused for good, and stayed refused once the store was mended)."""
        if not isinstance(exc, OSError):
            return False
        root = os.path.abspath(self.store.root)
        return any(
            isinstance(name, (str, os.PathLike)) and os.path.abspath(str(name)).startswith(root + os.sep)
            for name in (exc.filename, exc.filename2)
        )

    def ensure_stored(self, target: ModelVersion) -> None:
        """A version known only from the models dir is copied into the store first, hashed on the
        way (a damaged store copy is dealt with by ``bring_up``). ``ResourceError`` when the box
        cannot take the copy now, ``ConflictError`` when the folder cannot serve."""
        if target.engine is not None or target.store_copy is not None:
            return
        if target.folder is None:
            raise UnknownVoiceError(f"{target.name} {target.version} is neither in the store nor on disk")
        try:
            manifest = read_manifest(target.folder)
            if target.content and content_id(manifest) != target.content:
                raise ConflictError(f"{target.folder} changed since it was checked")
            copy = self.store.put(target.folder, manifest)
        except OSError as exc:
            if is_system_oserror(exc):
                raise resource_error(exc, f"copying {target.name} {target.version} into the store") from exc
            raise ConflictError(f"cannot serve {target.name} {target.version}: {exc}") from exc
        except TtsdError as exc:
            raise ConflictError(f"cannot serve {target.name} {target.version}: {exc}") from exc
        self.table.change(target, store_copy=copy, manifest=manifest)

    # == loading ================================================================================
    def bring_up(self, model: ModelVersion, why: str, *, verified: bool = False, signed: bool = False) -> bool:
        """Verify the store copy (copying it again from the models dir if it is damaged), check its
        signature, load and warm up. False when it cannot serve (refused or deferred, with the
        reason). ``verified``: the caller has just made the store copy from hashed bytes;
        ``signed``: and checked its signature (``check_signed``)."""
        started = time.monotonic()
        # coming up before anything else: making room takes a while, and a swap's store prune
        # meanwhile took the copy of a version that was not (an activate of a withdrawn version)
        was = model.state
        self.table.change(model, state=State.VERIFYING)
        try:
            self._make_room(model)  # within a memory budget: idle voices are unloaded first
        except BaseException:
            self.table.change(model, state=was)
            raise
        try:
            if not verified or model.store_copy is None:  # (a copy gone since: found and copied again)
                try:
                    copy, manifest = check_store_copy(self.store, model)
                finally:  # a damaged copy was dropped: the record says so whatever happens next
                    self.table.change(model, store_copy=self.store.get(model.name, model.version))
                self.table.change(model, store_copy=copy, manifest=manifest, content=content_id(manifest))
                signed = False  # a copy made again here is checked again
            if not (verified and signed):
                self._check_signature(model)
            assert model.store_copy is not None and model.manifest is not None
            checkpoint()  # a job called off while it verified goes no further (see pacing)
            self.table.change(model, state=State.LOADING)
            self._listener("loading", model)
            _import_engine(model.manifest.engine)  # imported first: torch's own start-up is no voice's cost
            before = resident_bytes()
            self.lifecycle.marks.begin(model)  # the kernel's OOM killer may end the process here
            try:
                engine = load_engine(
                    model.store_copy,
                    model.manifest,
                    self._options,
                    warming=lambda: self.table.change(model, state=State.WARMING),
                    live=self._live,
                )
            finally:
                self.lifecycle.marks.end(model)
            rss = max(0, resident_bytes() - before)  # what it costs, for the budget's next choices
        except Exception as exc:  # TtsdError says why; anything else is the engine crashing
            # the box's: out of memory (torch says so in a RuntimeError), a failing disk; never the version's
            if isinstance(exc, (StoreLost, ResourceError)) or out_of_memory(exc) or is_system_oserror(exc):
                self.lifecycle.defer(
                    model,
                    str(exc) if isinstance(exc, TtsdError) else str(resource_error(exc, "loading")),
                    short_of_memory=out_of_memory(exc),
                )
            else:
                self.lifecycle.refuse(model, str(exc) if isinstance(exc, TtsdError) else f"{type(exc).__name__}: {exc}")
            return False
        self.table.change(
            model, engine=engine, reason="", rss=rss, load_seconds=time.monotonic() - started, short_of_memory=0
        )
        log.info("%s %s loaded and warmed in %.2f s (%s)", model.name, model.version, model.load_seconds, why)
        self._listener("loaded", model)
        return True

    def checked(self, model: ModelVersion) -> bool:
        """The checks of ``bring_up`` before the load, on their own: its store copy verified (copied
        again from the models dir if damaged) and its signature. False (refused, or deferred for the
        box's reasons) when it cannot serve. The memory policy runs them before it unloads the
        serving version for an operator's action, as ``check_signed`` before an upgrade's."""
        was = model.state
        # coming up while it is checked, as in ``bring_up``: a swap's store prune on a thread of its
        # own (the rollback's just before, say) took the copy being checked from under it
        self.table.change(model, state=State.VERIFYING)
        try:
            try:
                copy, manifest = check_store_copy(self.store, model)
            finally:
                self.table.change(model, store_copy=self.store.get(model.name, model.version))
            self.table.change(model, store_copy=copy, manifest=manifest, content=content_id(manifest))
            _import_engine(manifest.engine)  # one this box lacks is refused before the serving version goes
            self._check_signature(model)
        except Exception as exc:
            if isinstance(exc, (StoreLost, ResourceError)) or is_system_oserror(exc):
                self.lifecycle.defer(
                    model, str(exc) if isinstance(exc, TtsdError) else str(resource_error(exc, "checking it"))
                )
            else:
                self.lifecycle.refuse(model, str(exc) if isinstance(exc, TtsdError) else f"{type(exc).__name__}: {exc}")
            return False
        except BaseException:
            self.table.change(model, state=was)
            raise
        self.table.change(model, state=was)  # (its load, next, makes it coming up again)
        return True

    def check_signed(self, model: ModelVersion) -> bool:
        """The signature check of ``bring_up`` on its own, for a store copy just made: False (the
        version refused, or deferred when the keys cannot be read) when it fails; with it, that its
        engine is installed. The memory policy runs it before it unloads the serving version, so
        an unsigned folder, or one for an engine this box lacks, never takes a voice down."""
        try:
            assert model.manifest is not None
            _import_engine(model.manifest.engine)
            self._check_signature(model)
        except ResourceError as exc:
            self.lifecycle.defer(model, str(exc))
            return False
        except TtsdError as exc:
            self.lifecycle.refuse(model, str(exc))
            return False
        return True

    def _check_signature(self, model: ModelVersion) -> None:
        """With trusted keys, the store copy (just verified against its manifest) must be signed by
        one of them, over exactly its files; ``SignatureError`` says why not. The models-dir
        folder's signature is tried when the copy's fails: one added after the copy was made
        counts, a junk one beside a good copy does not. The key dir is read now, not at start-up."""
        assert model.store_copy is not None and model.manifest is not None
        if self.trusted_keys is None:  # shown as unverified, as what it claims
            claimed = describe_signature(model.store_copy)
            self.table.change(model, signer=str(claimed) if claimed is not None else "")
            return
        try:
            trust = TrustedKeys.load(self.trusted_keys)
        except ConfigError as exc:  # the box's (an operator's dir), never the version's fault
            raise ResourceError(f"the trusted keys cannot be read now: {exc}", retry_after=10) from exc
        store, manifest = model.store_copy, model.manifest
        try:
            try:
                signer = trust.check(store, manifest)
            except SignatureError:
                # the folder in the models dir may hold a newer signature (signed again, a key rotated)
                offered = (
                    self.store.offer_signature(model.folder, store, lambda: trust.check(store, manifest))
                    if model.folder is not None
                    else None
                )
                if offered is None:
                    raise
                signer = offered
        except SignatureError as exc:
            self.table.change(
                model,
                signature_failure=exc.kind,
                refused_signature=signature_digest(model.folder) if model.folder is not None else "",
            )
            self._listener("signature_refused", model)
            raise
        self.table.change(model, signer=str(signer), refused_signature=None, signature_failure="")
        log.info("%s %s: signed by %s", model.name, model.version, model.signer)
