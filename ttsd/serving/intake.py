"""What a folder the source handed over is to the manager: a new version to bring up, one it knows
already, or one it refuses. Quick decisions only (the manifest was read by the source); the bytes
are hashed later, by the job that copies the version into the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..signing import signature_digest
from .lifecycle import Lifecycle
from .policy import MEMORY_TRIES
from .source import Candidate, Verdict
from .state import ServingState
from .store import content_id
from .table import VersionTable
from .versions import Listener, ModelVersion, State, norm, parsed

log = logging.getLogger("ttsd.manager")


class Intake:
    def __init__(self, table: VersionTable, lifecycle: Lifecycle, state: ServingState, listener: Listener) -> None:
        self.table, self.lifecycle, self.state, self._listener = table, lifecycle, state, listener

    def take(self, candidate: Candidate, *, first_scan: bool) -> ModelVersion | None:
        """The record of a new version to copy in and bring up (in state ``verifying``), or None
        when the folder holds nothing to bring up now. ``first_scan``: at start-up, versions older
        than the saved active one are known, not refused. A version refused for its folder is
        judged again whenever the source hands that folder over (it changed, or ttsd restarted):
        a file copied in again whole, an unlisted one removed."""
        path, manifest = candidate.path, candidate.manifest
        if manifest is None:  # no readable manifest: the source's verdict is all there is
            self.table.see_folder(path, candidate.verdict.value, candidate.reason)
            return None
        content = content_id(manifest)
        deferred = False
        with self.table.locked():
            known = self.table.get(manifest.name, manifest.version)
            if (
                known is not None
                and known.content == content
                and not known.fresh
                and known.state not in (State.INCOMPLETE, State.DEFERRED)
                and not _signed_again(known, path)
                and not _changed_since_refused(known, candidate)
            ):
                self.table.see_folder(path, "known")
                if known.folder is not None and known.folder != path and known.folder.is_dir():
                    log.info(
                        "%s holds the same files as %s: both are %s %s, which serves as it was first "
                        "stored (the later folder's manifest fields, such as its warm-up text, are not taken)",
                        path,
                        known.folder,
                        manifest.name,
                        manifest.version,
                    )
                known.folder = path
                return None
            # the same version with other content is refused, when ttsd holds that version (a store
            # copy or a loaded engine); a content known only from state.json's record is not proof
            # (as is one whose other folder, with other content, is still in the models dir: two
            # dropped in one scan, the later one served without a word, and a restart flipped it)
            if (
                known is not None
                and known.content
                and known.content != content
                and known.state is not State.REFUSED
                and (
                    known.store_copy is not None
                    or known.engine is not None
                    or (known.folder is not None and known.folder != path and known.folder.is_dir())
                )
            ):
                other = f" (in {known.folder.name})" if known.folder is not None and known.folder != path else ""
                reason = (
                    f"{manifest.name} {manifest.version} is already known with different content{other}; "
                    "give the new folder a new version"
                )
                self.table.see_folder(path, "refused", reason)
                log.warning("refused %s: %s", path, reason)
                return None
            model = known or self.table.add(ModelVersion(manifest.name, manifest.version, State.VERIFYING, folder=path))
            model.content, model.folder, model.manifest, model.fresh = content, path, manifest, False
            # its folder changed (or is new): its tries for lack of memory again, less the loads of
            # these very files the last process did not live through (killed: out of memory?)
            model.short_of_memory = died = self.lifecycle.marks.died(model)
            model.seen = candidate.fingerprint
            if norm(manifest.version) in {norm(v) for v in self.state.voice(manifest.name).rolled_back}:
                model.state, model.reason = State.ROLLED_BACK, "rolled back earlier; 'ttsd activate' serves it"
                self.table.see_folder(path, "known")
                return None
            active = self.lifecycle.active(manifest.name)
            its_files = True  # a refusal below is for the folder's files (judged again when it changes)
            if active is not None and manifest.parsed_version <= parsed(active.version) and not first_scan:
                if known is not None and known.state is State.DEFERRED and candidate.verdict is Verdict.READY:
                    # an earlier version that could not come up for the box's reasons (its store copy
                    # damaged, no folder to copy again): with its folder back it is a rollback target
                    model.state, model.reason = State.AVAILABLE, ""
                    self.table.see_folder(path, "known")
                    return None
                stale = (
                    f"version {manifest.version} is not newer than the active {active.version} "
                    "('ttsd activate' serves it anyway)"
                )
                its_files = False
            elif candidate.verdict is Verdict.INCOMPLETE:
                model.state, model.reason = State.INCOMPLETE, candidate.reason
                self.table.see_folder(path, "incomplete", candidate.reason)
                return None
            elif candidate.verdict is Verdict.REFUSED:
                stale = candidate.reason
            else:
                model.state = State.VERIFYING
                self.table.see_folder(path, "known")
                stale = ""
                saved = self.state.voice(manifest.name).active
                beside = active is not None or (saved is not None and norm(saved) != norm(manifest.version))
                if died >= MEMORY_TRIES and beside:
                    # the process died each time it loaded this: not again by itself while another
                    # version serves (systemd restarting it into the same load would hit the unit's
                    # start limit, leaving no daemon); SIGHUP, activate or a new folder try again
                    model.short_of_memory = died - 1
                    model.state = State.AVAILABLE
                    deferred = True
        if stale:
            self.lifecycle.refuse(model, stale, path, its_files=its_files)
            return None
        if deferred:
            self.lifecycle.defer(model, "the daemon was killed while loading it (out of memory?)", short_of_memory=True)
            return None
        self._listener("verifying", model)
        return model


def _changed_since_refused(known: ModelVersion, candidate: Candidate) -> bool:
    """A version refused for its folder's files whose folder changed since (a file copied in
    again whole, an unlisted one removed): judged again. By the fingerprint the source took as it
    judged the folder ("" from a source that takes none: judged again)."""
    if known.state is not State.REFUSED or known.refused_folder is None:
        return False
    return not candidate.fingerprint or candidate.fingerprint != known.refused_folder


def _signed_again(known: ModelVersion, path: Path) -> bool:
    """A version refused for its signature whose folder now holds another ``model.sig``: the
    operator signed it (again), so it is judged again."""
    return (
        known.state is State.REFUSED
        and known.refused_signature is not None
        and signature_digest(path) != known.refused_signature
    )
