"""Start-up: what a restarted daemon knows before it looks at the models dir.

The saved state (``state.json``: which version of each voice was active, the rollback stack,
versions refused or rolled back) is read first, defensively (see ``state.py``); then the store is
scanned for copies the state does not know (a ``kill -9`` between storing a copy and saving the
state); then each voice's saved active version comes back, re-verified from its store copy. A voice
whose saved version cannot come back falls back to the newest version that verifies (``manager``).
Within a memory budget, voices that are not preloaded come back parked: loaded on first use.
``StartUp`` is the ``ModelManager``'s half that does this; it runs once, on a loader thread.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..errors import ManifestError, SignatureError, TtsdError
from ..manifest import read_manifest
from .store import content_id
from .versions import ModelVersion, State, norm

if TYPE_CHECKING:
    from .manager import ModelManager

log = logging.getLogger("ttsd.manager")


class StartUp:
    def start(self: ModelManager) -> None:
        """Restore what is known (saved state, then the store), look at the models dir, and bring
        every voice up: its saved active version, else the newest version that verifies. Folders
        still settling or incomplete (a voice converted or copied in just now) are waited for, briefly, so the
        daemon does not announce "no voice" a second before one serves."""
        with self._load_lock:
            self.store.prepare()
            self.state.load()
            for key, record in self.state.versions.items():
                name, _, version = key.partition("/")
                state = State(record.state) if record.state in State._value2member_map_ else State.AVAILABLE
                if state not in (State.REFUSED, State.ROLLED_BACK) or (
                        state is State.REFUSED and record.reason.startswith(SignatureError.PREFIX)):
                    # nothing is loaded yet in this process; and a refusal for the signature is
                    # judged again, since the trusted keys may have changed with the restart
                    state = State.AVAILABLE
                model = ModelVersion(name, version, state, content=record.content, reason=record.reason,
                                     store=self.store.get(name, version))
                self._trust_store_copy(model)
                self._versions[model.key] = model
            for name, version, folder in self.store.scan():  # copies the saved state does not know
                if (name, norm(version)) in self._versions:
                    continue
                try:
                    manifest = read_manifest(folder)
                    if (manifest.name, norm(manifest.version)) != (name, norm(version)):
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
        while self.source.waiting() and time.monotonic() < deadline:
            time.sleep(min(0.2, max(self.policy.settle / 4, 0.02)))
            self.reconcile()

    def _trust_store_copy(self: ModelManager, model: ModelVersion) -> None:
        """What a version *is* comes from its store copy's manifest (verified in full before it
        loads), not from state.json's record: a damaged record must never make ttsd drop a good
        copy, or refuse an intact folder as "the same version with other content"."""
        if model.store is None:
            return
        try:
            content = content_id(read_manifest(model.store))
        except TtsdError:
            return  # a damaged copy: check_store_copy deals with it before any load
        if model.content and content != model.content:
            log.warning("state.json recorded other content for %s %s than its store copy holds; trusting the "
                        "store copy (it is verified before it loads)", model.name, model.version)
        model.content = content



    def _resume_saved(self: ModelManager) -> None:
        """At start-up: every voice's saved active version comes back (re-copied from the models
        dir if its store copy is damaged); one that cannot is logged and the voice falls back.
        Within a memory budget only preloaded voices load now; the others come back parked."""
        pinned = self._pinned([name for name, voice in self.state.voices.items() if voice.active])
        for name, voice in sorted(self.state.voices.items()):
            if voice.active is None or self._active(name) is not None:
                continue
            model = self._versions.get((name, norm(voice.active)))
            if model is None or model.state in (State.REFUSED, State.ROLLED_BACK):
                log.warning("%s %s was active but is not known any more; choosing again", name, voice.active)
                continue
            try:
                self._ensure_stored(model)
            except TtsdError as exc:
                log.warning("%s %s was active but cannot be restored (%s); choosing again", name, voice.active, exc)
                continue
            if self.budget.limited and name not in pinned:
                self._activate_cold(model)
                continue
            if self._bring_up(model, "resumed after restart"):
                self._activate(model, "restart", push_previous=False, durable=False)
