"""``ttsd models get``: one catalog voice from the mirror to a model folder in the models dir.

0. A fleet mirror's ``ttsd-index.json`` naming the voice wins: its ready (and usually signed)
   folder is fetched as it is (``prebuilt``), checked, and published the same way.
1. Read the catalog and find the voice (``index``).
2. Decide the version: a voice already in the models dir gets the next one only with
   ``upgrade`` (``VoiceExistsError`` otherwise), and not at all when its newest version was made
   from the very files the catalog lists now.
3. Under a per-voice lock, download the ``.onnx``, the ``.onnx.json`` and the ``MODEL_CARD`` into
   the private download folder (``downloads/KEY/``; resumable, checked: ``download``).
4. Convert with ``import_piper``, which builds the folder in a dot-folder inside the models dir,
   fsyncs it and renames it into place: a running daemon sees nothing until the rename, then a
   whole folder, like any folder dropped in. The manifest records the licence line of the
   MODEL_CARD and where the voice came from (``source``), and the MODEL_CARD goes with it.

Nothing is left half-written in the models dir: the dot-folder is removed on any failure, Ctrl-C
included; one left by a killed process is removed by the next ``get`` of that voice. The download
folder keeps partial files for the next run, and is removed once the voice is published.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
import signal
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from packaging.version import Version

from ..errors import (
    ConfigError,
    ConflictError,
    ImportPiperError,
    ManifestError,
    NotOnMirror,
    SignatureError,
    TtsdError,
    VerifyError,
    VoiceExistsError,
    is_system_oserror,
    resource_error,
)
from ..fsutil import fsync_dir, own_dir
from ..manifest import Manifest, check_version, read_manifest
from ..models_dir import Candidate, scan
from .download import Mirror, download, ensure_room, fetch_small, present_bytes
from .index import CATALOG_FILE, MAX_CATALOG_BYTES, Catalog, CatalogFile, CatalogVoice, parse_catalog
from .prebuilt import get_prebuilt, load_index

if TYPE_CHECKING:
    from ..signing import TrustedKeys

SOURCE_FIELD = "source"  # the manifest field naming the catalog entry a folder was made from
_LICENSE = re.compile(r"^[ \t]*[*-]?[ \t]*licen[cs]e[ \t]*:[ \t]*(\S.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


class Reporter(Protocol):
    """What ``get_voice`` tells as it goes (the CLI draws it with rich)."""

    def step(self, message: str) -> None:
        """A stage begins (reading the catalog, converting, …)."""

    def transfer(self, name: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
        """A download of ``total`` bytes; the callback gets the bytes on disk so far."""


@dataclass(frozen=True)
class GetRequest:
    """Everything ``get_voice`` needs, resolved by the CLI."""

    voice: str  # catalog key or alias
    models: Path
    downloads: Path  # private: partial files live here, never in the models dir
    mirror: Mirror
    version: str | None = None  # default: 1, or the next major version with ``upgrade``
    upgrade: bool = False
    trust: TrustedKeys | None = None  # a folder from a fleet mirror must be signed by one of these
    box: str = ""  # this box's id: a fleet mirror's staged versions go to a share of boxes (ttsd.shares)
    daemon: Any = None  # a client of the daemon's socket, if one answers: told of withdrawn versions


@dataclass(frozen=True)
class GetResult:
    voice: CatalogVoice | None  # None: a ready folder from a fleet mirror (``prebuilt``)
    folder: Path | None  # None: no version of a fleet mirror is for this box yet (see ``notes``)
    manifest: Manifest | None
    fetched: bool  # False: the newest version in the models dir is already this catalog entry
    notes: tuple[str, ...] = ()  # what else was done or decided (a withdrawal, a share not reached)


def load_catalog(mirror: Mirror) -> Catalog:
    """The mirror's ``voices.json``, bounded and checked."""
    return parse_catalog(fetch_small(mirror, CATALOG_FILE, MAX_CATALOG_BYTES), mirror.url(CATALOG_FILE))


def card_license(text: str) -> str:
    """The ``License:`` line of a Piper MODEL_CARD (``* License: CC BY 4.0``), or ``""``."""
    match = _LICENSE.search(text)
    if match is None:
        return ""
    return "".join(c for c in match.group(1) if c.isprintable())[:200]


def get_voice(request: GetRequest, reporter: Reporter) -> GetResult:
    """Download, check, convert and publish ``request.voice``; see the module docstring."""
    try:
        return _get(request, reporter)
    except OSError as exc:
        if is_system_oserror(exc):
            raise resource_error(exc, f"getting {request.voice}") from exc
        where = exc.filename or request.models
        raise ConfigError(f"{where}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class _Local:
    """The voice's folders in the models dir: the newest that would serve, and those that would not
    (with why), which ``get`` treats as absent."""

    newest: Candidate | None
    refused: dict[Path, str]


def _local(
    models: Path, name: str, trust: TrustedKeys | None, reporter: Reporter, skip: Callable[[str], bool] | None = None
) -> _Local:
    """Judge the voice's folders as the daemon would before loading one (every byte against the
    manifest; with ``trust``, the signature), newest first, down to the first that passes. A
    folder that fails (an unsigned built-in voice seeded before a box trusted keys, a damaged
    copy) would never serve: counting it as present left a box voiceless while ``get`` said
    "already there" or "up to date". Versions ``skip`` names (withdrawn ones) do not count."""
    from ..manifest import verify

    present = sorted(
        (
            (c.manifest.parsed_version, c)
            for c in scan(models)
            if c.manifest and c.manifest.name == name and not (skip and skip(c.manifest.version))
        ),
        key=lambda pair: pair[0],
        reverse=True,
    )
    refused: dict[Path, str] = {}
    for _, candidate in present:
        try:
            manifest = verify(candidate.folder)
            if trust is not None:
                trust.check(candidate.folder, manifest)
        except TtsdError as exc:
            if isinstance(exc, VerifyError) and exc.looks_incomplete():  # a copy in progress: not ours
                reporter.step(f"{candidate.folder.name} looks like a copy in progress, so it does not count")
                continue
            refused[candidate.folder] = str(exc)
            reporter.step(f"{candidate.folder.name} would not serve, so it does not count ({exc})")
            continue
        return _Local(candidate, refused)
    return _Local(None, refused)


def _make_room(folder: Path, local: _Local, reporter: Reporter) -> None:
    """``folder`` (where the new version goes) holds a version of this voice that would not serve:
    move it aside, out of the daemon's sight (a dot-name), rather than fail or delete it. A folder
    that looks like a copy still in progress is left alone (``_local`` does not count it refused):
    then the new version's place is taken, and get says so."""
    if folder not in local.refused and not folder.is_symlink():  # a link never serves, wherever it points
        return
    aside = folder.with_name(f".{folder.name}.refused-{int(time.time())}")
    os.rename(folder, aside)
    fsync_dir(folder.parent)
    reporter.step(f"moved {folder.name}, which would not serve, aside to {aside.name} (remove it when done)")


def _remove_stale_downloads(
    downloads: Path, name: str, index: Mapping[str, object], keep: str | None, reporter: Reporter
) -> None:
    """Remove the fleet voice ``name``'s downloads of any version but ``keep`` (the one this run
    takes): one broken off is kept to resume, and once the mirror has moved on (a newer version,
    a withdrawal) nothing would ever finish or remove it, so each stayed in the cache for good.
    A download's folder is ``NAME@VERSION`` (``work_folder``): that name is this voice's alone."""
    prefix = f"{name}@"
    for work in downloads.glob(f"{glob.escape(prefix)}*"):
        version = work.name[len(prefix) :]
        if version == keep or work.is_symlink() or not work.is_dir():
            continue
        reporter.step(f"removing the download of {name} {version}: the mirror no longer offers it to this box")
        shutil.rmtree(work, ignore_errors=True)
    _remove_older_layout(downloads, name, index, reporter)


def _remove_older_layout(downloads: Path, name: str, index: Mapping[str, object], reporter: Reporter) -> None:
    """Remove the voice's downloads that an older ttsd kept as ``NAME-VERSION`` (none is resumed
    now). Only folders that hold that version's manifest, fetched first: no other voice's (``a``
    and ``a-1`` both made ``a-1-2``, and a second mirror may share the cache), nor a Piper
    download's (``downloads/KEY/``)."""
    prefix = f"{name}-"
    others = [f"{other}-" for other in index if other != name and other.startswith(prefix)]
    for work in downloads.glob(f"{glob.escape(prefix)}*"):
        version = work.name[len(prefix) :]
        if work.is_symlink() or not work.is_dir() or any(work.name.startswith(o) for o in others):
            continue
        try:
            manifest = read_manifest(work)
        except ManifestError:
            continue  # not a download of a version of this voice
        if manifest.name != name or manifest.version != version:
            continue
        reporter.step(f"removing the download of {name} {version} an older ttsd left in the cache")
        shutil.rmtree(work, ignore_errors=True)


def _from_fleet_mirror(request: GetRequest, reporter: Reporter) -> GetResult | None:
    """The voice as a ready folder from a fleet mirror's ``ttsd-index.json``, or None when the
    mirror has no index or the index does not name it (then the Piper catalog is asked). The box
    takes the newest version whose share includes it (``FleetVoice.target``), keeps a newer one it
    already has unless it is withdrawn, and takes withdrawn versions off (``withdraw.apply``)."""
    try:
        index = load_index(request.mirror, cache=request.downloads, trust=request.trust)
    except NotOnMirror:
        return None
    fleet = index.get(request.voice)
    if fleet is None:
        return None
    if request.version is not None:
        newest = fleet.newest()
        raise ConfigError(
            f"{request.voice} comes ready-made from {request.mirror.base}"
            + (f" (newest: version {newest.version})" if newest else "")
            + "; --version cannot change it"
        )
    local = _local(request.models, fleet.name, request.trust, reporter, skip=fleet.is_withdrawn)
    have = local.newest.manifest if local.newest is not None else None
    target = fleet.target(request.box)
    notes: list[str] = []
    newest = fleet.newest()
    if newest is not None and newest is not target and (have is None or Version(newest.version) > have.parsed_version):
        # a narrowed share leaves the version on boxes that have it: only those without it hear this
        held = f"version {newest.version} goes to {newest.share:.0%} of boxes, not this one ({request.box})"
        notes.append(held + (f"; {target.version} is the newest it may take" if target else ""))
    request.models.mkdir(parents=True, exist_ok=True)
    request.downloads.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(request.downloads / f"{fleet.name}.lock", fleet.name):
        _remove_stale_builds(request.models, fleet.name)
        _remove_stale_downloads(request.downloads, fleet.name, index, target.version if target else None, reporter)
        folder, manifest, fetched = (local.newest.folder if local.newest else None), have, False
        if target is not None and (have is None or Version(target.version) > have.parsed_version):
            try:
                _make_room(request.models / f"{fleet.name}-{target.version}", local, reporter)
                folder, manifest, fetched = get_prebuilt(
                    target,
                    models=request.models,
                    downloads=request.downloads,
                    mirror=request.mirror,
                    upgrade=request.upgrade,
                    have=have,
                    trust=request.trust,
                    reporter=reporter,
                )
            except TtsdError:
                # a withdrawal is not held up by the newer version's download: the box goes back
                # to what it has (one broken file on the mirror kept a withdrawn version serving)
                _withdraw_anyway(fleet, request, have.version if have else None, reporter)
                raise
        elif have is not None and not request.upgrade and not fleet.withdrawn:
            raise VoiceExistsError(
                f"{fleet.name} is already in {request.models} as version {have.version}; "
                f"'ttsd models get {fleet.name} --upgrade' takes the mirror's newest"
            )
        if fleet.withdrawn:
            from .withdraw import apply

            notes += apply(fleet, request.models, manifest.version if manifest else None, request.daemon, reporter.step)
    if (folder is None or manifest is None) and not fleet.versions:
        raise NotOnMirror(f"every version of {fleet.name} on {request.mirror.base} is withdrawn")
    return GetResult(None, folder, manifest, fetched, tuple(notes))  # no folder: not for this box yet


def _withdraw_anyway(fleet: Any, request: GetRequest, to: str | None, reporter: Reporter) -> None:
    """The mirror's withdrawals, applied when the newer version could not be fetched; their own
    failure is said, and the download's is the error the command ends with."""
    if not fleet.withdrawn:
        return
    from .withdraw import apply

    try:
        for note in apply(fleet, request.models, to, request.daemon, reporter.step):
            reporter.step(note)
    except TtsdError as exc:
        reporter.step(f"the withdrawal could not be applied either: {exc}")


def _get(request: GetRequest, reporter: Reporter) -> GetResult:
    request = replace(request, voice=unicodedata.normalize("NFC", request.voice))  # as catalog keys are
    if request.version is not None:
        check_version(request.version)  # before anything is fetched
    reporter.step(f"reading the catalog at {request.mirror.base}")
    ready = _from_fleet_mirror(request, reporter)
    if ready is not None:
        return ready
    if request.trust is not None:  # a voice converted here is signed by nobody: the daemon would refuse it
        raise SignatureError(
            "unsigned",
            f"{request.mirror.base} has no signed folder of {request.voice} "
            "(no ttsd-index.json naming it), and a Piper voice converted here is "
            "signed by nobody; publish it signed (ttsd models publish) or drop "
            "--trusted-keys",
        )
    voice = load_catalog(request.mirror).find(request.voice)
    key = voice.key
    mine = _local(request.models, key, None, reporter)
    newest = mine.newest
    if newest is not None and newest.manifest is not None:
        have = newest.manifest
        if not request.upgrade:
            raise VoiceExistsError(
                f"{key} is already in {request.models} as version {have.version} ({newest.folder.name}); "
                f"'ttsd models get {key} --upgrade' adds the next version"
            )
        if request.version is None and have.extra.get(SOURCE_FIELD) == _source(voice):
            return GetResult(voice, newest.folder, have, fetched=False)
    version = _version(request, newest.manifest if newest else None)
    folder = request.models / f"{key}-{version}"
    _make_room(folder, mine, reporter)
    if os.path.lexists(folder):
        raise ConfigError(f"{folder} already exists (a folder of another voice?); choose another --version")

    request.models.mkdir(parents=True, exist_ok=True)
    request.downloads.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(request.downloads / f"{key}.lock", key):
        _remove_stale_builds(request.models, key)
        work = own_dir(request.downloads, key)
        local = {voice.onnx: work / f"{key}.onnx", voice.config: work / f"{key}.onnx.json"}
        if voice.model_card is not None:
            local[voice.model_card] = work / "MODEL_CARD"
        _check_space(request, voice, local)
        for file, dest in local.items():
            with reporter.transfer(file.name, file.size) as update:
                download(request.mirror, file, dest, update)
        if voice.model_card is not None:
            card = (work / "MODEL_CARD").read_text(encoding="utf-8", errors="replace")
            license_ = card_license(card) or "unknown (the MODEL_CARD names none)"
        else:
            license_ = "unknown (the catalog lists no MODEL_CARD)"
        from ..voices import import_piper  # the conversion imports torch: only here

        try:
            with _ctrl_c_between_steps() as interrupted:

                def step(message: str) -> None:
                    if interrupted:
                        raise KeyboardInterrupt
                    reporter.step(message)

                manifest = import_piper(
                    local[voice.onnx],
                    folder,
                    name=key,
                    version=version,
                    license=license_,
                    progress=step,
                    attach={"MODEL_CARD": local[voice.model_card]} if voice.model_card else None,
                    extra={SOURCE_FIELD: _source(voice)},
                )
        except ImportPiperError:
            shutil.rmtree(work, ignore_errors=True)  # the same files would fail the same way
            raise
        shutil.rmtree(work, ignore_errors=True)
    return GetResult(voice, folder, manifest, fetched=True)


@contextmanager
def _ctrl_c_between_steps() -> Iterator[list[int]]:
    """Ctrl-C during the conversion is held until its next step. Raised where it lands, it can land
    inside a Python callback of C++ code (onnx, torch), which cannot unwind through C++ and
    aborts the process: no clean-up, a core dump. Held, it ends the conversion at the next step
    (a second or two), and the dot-folder is removed as for any failure. Main thread only; where
    handlers cannot be set, Ctrl-C behaves as usual."""
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    except ValueError:  # not the main thread
        yield caught
        return
    try:
        yield caught  # a conversion that finished despite a late Ctrl-C has published whole: kept
    finally:
        signal.signal(signal.SIGINT, previous)


def _source(voice: CatalogVoice) -> dict[str, object]:
    return {"catalog": "piper", "key": voice.key, "files": voice.fingerprint()}


def _version(request: GetRequest, have: Manifest | None) -> str:
    if request.version is None:
        return "1" if have is None else str(have.parsed_version.release[0] + 1)
    version = check_version(request.version)
    if have is not None and Version(version) <= have.parsed_version:
        raise ConfigError(
            f"--version {version} is not newer than version {have.version} of {have.name} in {request.models}"
        )
    return version


@contextmanager
def _locked(path: Path, key: str) -> Iterator[None]:
    """One ``get`` of a voice at a time: two would share the partial files and the version."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConflictError(f"another 'ttsd models get {key}' is running (it holds {path})") from None
            raise
        yield
    finally:
        os.close(fd)


def _remove_stale_builds(models: Path, key: str) -> None:
    """Dot-folders ``import_piper`` left for this voice when its process was killed (under the
    lock, no other ``get`` of the voice is building one). The daemon ignores them; this frees
    the space."""
    stale = re.compile(rf"\.{re.escape(key)}-([^/]+)\.[A-Za-z0-9_]{{8}}\.partial")
    for entry in models.iterdir():
        found = stale.fullmatch(entry.name)
        # KEY-VERSION: "joe-kids-3" is voice joe-kids's build ("kids-3" is no version), not joe's
        if found and _is_version(found.group(1)) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _is_version(text: str) -> bool:
    try:
        check_version(text)
    except TtsdError:
        return False
    return True


def _check_space(request: GetRequest, voice: CatalogVoice, local: dict[CatalogFile, Path]) -> None:
    """Refuse before downloading what there is no room for: the files still to fetch, and a
    model folder about the size of the .onnx."""
    to_fetch = sum(file.size - present_bytes(dest, file) for file, dest in local.items())
    ensure_room({request.downloads: to_fetch, request.models: voice.onnx.size}, f"getting {voice.key}")
