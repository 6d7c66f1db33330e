"""Start-up: what a restarted daemon knows before it looks at the models dir.

``restore`` reads the saved state (``state.json``: which version of each voice was active, the
rollback stack, the canary in progress, versions refused or rolled back) defensively (see
``state.py``), then scans the store for copies the state does not know (a ``kill -9`` between
storing a copy and saving the state), and returns the records. Nothing is loaded here: the manager
then brings each voice's saved active version (and canary) back, re-verified from its store copy,
and a voice whose saved version cannot come back falls back to the newest version that verifies.
"""

from __future__ import annotations

import logging
import re

from ..errors import ManifestError, SignatureError, TtsdError
from ..manifest import read_manifest
from .state import ServingState, VersionRecord
from .store import ModelStore, content_id
from .versions import ModelVersion, State, norm

log = logging.getLogger("ttsd.manager")


def restore(state: ServingState, store: ModelStore) -> list[ModelVersion]:
    """The records a restarted daemon starts from (``state`` and ``store`` are loaded/prepared
    here). Every one is unloaded; loading is the manager's."""
    store.prepare()
    state.load()
    found: dict[tuple[str, str], ModelVersion] = {}
    for key, record in state.versions().items():
        name, _, version = key.partition("/")
        saved = State(record.state) if record.state in State._value2member_map_ else State.AVAILABLE
        if saved not in (State.REFUSED, State.ROLLED_BACK) or (
            saved is State.REFUSED and record.reason.startswith(SignatureError.PREFIX)
        ):
            # nothing is loaded yet in this process; and a refusal for the signature is judged
            # again, since the trusted keys may have changed with the restart
            saved = State.AVAILABLE
        model = ModelVersion(
            name,
            version,
            saved,
            content=record.content,
            reason=record.reason,
            store_copy=store.get(name, version),
            refused_folder=_refused_folder(record) if saved is State.REFUSED else None,
        )
        _trust_store_copy(model)
        found.setdefault(model.key, model)
    for name, version, folder in store.scan():  # copies the saved state does not know
        if (name, norm(version)) in found:
            continue
        try:
            manifest = read_manifest(folder)
            if (manifest.name, norm(manifest.version)) != (name, norm(version)):
                raise ManifestError(f"it says {manifest.name} {manifest.version}")
        except TtsdError as exc:
            log.warning("store copy %s is unusable (%s); removing it", folder, exc)
            store.remove(name, version)
            continue
        # stored, then the process died before the state said so (e.g. kill -9 mid-load): its
        # folder is judged like a newly dropped one
        model = ModelVersion(
            name, manifest.version, State.AVAILABLE, content=content_id(manifest), store_copy=folder, fresh=True
        )
        found[model.key] = model
        log.info("found %s %s in the store", name, manifest.version)
    return list(found.values())


# what a refusal for a folder's files said before ttsd recorded it as such (``VerifyError``'s
# problems, an incomplete copy's timeout): judged again once, then recorded with its fingerprint
_FOLDER_REASON = re.compile(
    r"(?:^|: )(?:changed|missing|extra|unsafe|pickle weights|too many files): |still incomplete after"
)


def _refused_folder(record: VersionRecord) -> str | None:
    """The fingerprint a refusal for a folder's files was recorded with; "" (judged again at the
    first look) for one an older ttsd recorded without it; None for any other refusal."""
    if record.folder is not None:
        return record.folder
    return "" if _FOLDER_REASON.search(record.reason) else None


def _trust_store_copy(model: ModelVersion) -> None:
    """What a version *is* comes from its store copy's manifest (verified in full before it
    loads), not from state.json's record: a damaged record must never make ttsd drop a good copy,
    or refuse an intact folder as "the same version with other content"."""
    if model.store_copy is None:
        return
    try:
        content = content_id(read_manifest(model.store_copy))
    except TtsdError:
        return  # a damaged copy: check_store_copy deals with it before any load
    if model.content and content != model.content:
        log.warning(
            "state.json recorded other content for %s %s than its store copy holds; trusting the "
            "store copy (it is verified before it loads)%s",
            model.name,
            model.version,
            ", and judging it again rather than as refused" if model.state is State.REFUSED else "",
        )
        if model.state is State.REFUSED:  # the record's refusal was for other content
            model.state, model.reason, model.refused_folder = State.AVAILABLE, "", None
    model.content = content
