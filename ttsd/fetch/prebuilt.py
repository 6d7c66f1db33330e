"""A fleet's own mirror of ready ttsd model folders: ``ttsd models publish`` writes one, and
``ttsd models get`` reads it before the Piper catalog.

A box that converts a Piper voice itself makes a folder nobody else signed. A fleet that signs its
voices (``ttsd serve --trusted-keys``) converts and signs them once, on a build machine, and ships
the folders as they are. The mirror is plain files any HTTP server (or a bucket) can serve::

    MIRROR/ttsd-index.json                 {"format": 1, "voices": {"joe": {"version": "2",
                                             "path": "ttsd/joe/2", "manifest": {"size": …, "sha256": …},
                                             "signature": {"size": …, "sha256": …}}}}
    MIRROR/ttsd/joe/2/ttsd.json            the folder's manifest: every file's size and sha256
    MIRROR/ttsd/joe/2/model.safetensors …  the files it lists
    MIRROR/ttsd/joe/2/model.sig            its signature, when it has one

The index pins each voice's manifest by sha256, and the manifest pins every file, so every byte a
box takes is checked before it lands. The index is remote data like the Piper catalog: bounded,
every field checked, paths plain segments under the mirror. A box fetches into its private
download folder (resumable), assembles the folder in a dot-folder inside the models dir, verifies
it whole (and its signature, given trusted keys: what a daemon would refuse never lands), and
renames it into place. Publishing writes the folder beside the index first and the index last,
each by rename, so a box never reads an index naming a folder that is not all there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.version import Version

from ..errors import (
    CatalogError,
    ConfigError,
    ManifestError,
    VoiceExistsError,
)
from ..fsutil import atomic_write_bytes, atomic_write_text, current_umask, fsync_dir, own_dir
from ..manifest import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    norm,
    parse_manifest,
    sha256_file,
    verify,
)
from .download import Mirror, download, ensure_room, fetch_small
from .fleet_index import INDEX_FILE, FleetVoice, Prebuilt, check_share, clean_reason, index_json, parse_index
from .index import CatalogFile
from .index_signature import check_index, is_signed, load_fleet_key, sign_index
from .small_cache import fetch_small_cached

MAX_INDEX_BYTES = 4 << 20
MAX_FILE_BYTES = 4 << 30  # any one file of a folder


def work_folder(name: str, version: str) -> str:
    """The name of a fleet download's folder in the box's downloads dir: ``NAME@VERSION``. No voice
    name or version holds ``@``, so one names one download (``NAME-VERSION`` made voice ``a``
    version ``1-2`` and voice ``a-1`` version 2 share a folder, under two locks), and none is a
    Piper download's (``downloads/KEY/``)."""
    return f"{name}@{version}"


def load_index(mirror: Mirror, cache: Path | None = None, trust: Any = None) -> dict[str, FleetVoice]:
    """The mirror's index; ``NotOnMirror`` when it has none (a plain Piper mirror). With ``cache``
    (the box's private downloads dir), asked for only if changed since the last time (an unchanged
    mirror answers 304, and nothing is written). With ``trust``, shares and withdrawals count only
    from an index signed by a trusted key (``index_signature``)."""
    if cache is None:
        raw = fetch_small(mirror, INDEX_FILE, MAX_INDEX_BYTES)
    else:
        raw, _changed = fetch_small_cached(mirror, INDEX_FILE, MAX_INDEX_BYTES, cache)
    voices = parse_index(raw, mirror.url(INDEX_FILE))
    if trust is not None:
        check_index(raw, voices, trust, mirror.url(INDEX_FILE))
    return voices


# -- the box's side ---------------------------------------------------------------------------------
def get_prebuilt(
    entry: Prebuilt,
    *,
    models: Path,
    downloads: Path,
    mirror: Mirror,
    upgrade: bool,
    have: Manifest | None,
    trust: Any = None,
    reporter: Any = None,
) -> tuple[Path, Manifest, bool]:
    """Fetch ``entry`` into the models dir as ``NAME-VERSION``. Returns (folder, manifest, fetched):
    fetched is False when the models dir already has this version or a newer one (``upgrade``).
    ``trust``: ``TrustedKeys`` the folder must be signed by before it is published."""
    if have is not None:
        if not upgrade:
            raise VoiceExistsError(
                f"{entry.name} is already in {models} as version {have.version}; "
                f"'ttsd models get {entry.name} --upgrade' takes the mirror's newest"
            )
        if Version(entry.version) <= have.parsed_version:
            return models / f"{entry.name}-{have.version}", have, False
    folder = models / f"{entry.name}-{entry.version}"
    if os.path.lexists(folder):
        raise ConfigError(f"{folder} already exists (a folder of another voice?)")
    downloads.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = own_dir(downloads, work_folder(entry.name, entry.version))
    step = reporter.step if reporter is not None else (lambda _m: None)

    def fetch(file: CatalogFile, rel: str) -> Path:
        dest = own_dir(work, PurePosixPath(rel).parent) / PurePosixPath(rel).name
        if reporter is None:
            download(mirror, file, dest)
        else:
            with reporter.transfer(file.name, file.size) as update:
                download(mirror, file, dest, update)
        return dest

    step(f"fetching {entry.name} {entry.version} from {mirror.base}")
    raw = fetch(entry.manifest, MANIFEST).read_bytes()
    try:
        manifest = parse_manifest(json.loads(raw), mirror.url(entry.manifest.path))
    except (ValueError, RecursionError) as exc:
        raise CatalogError(f"{mirror.url(entry.manifest.path)}: not valid JSON ({str(exc)[:100]})") from None
    except ManifestError as exc:
        raise CatalogError(str(exc)) from None
    if (manifest.name, manifest.version) != (entry.name, entry.version):
        raise CatalogError(
            f"{mirror.url(entry.manifest.path)} is {manifest.name} {manifest.version}, the index "
            f"says {entry.name} {entry.version}"
        )
    for rel, item in sorted(manifest.files.items()):  # a mirror's absurd size is its error, not a full disk
        if item.size > MAX_FILE_BYTES:
            raise CatalogError(f"{entry.name} {entry.version}: {rel} is larger than {MAX_FILE_BYTES} bytes")
    folder_bytes = sum(e.size for e in manifest.files.values())
    to_fetch = folder_bytes - sum(os.path.getsize(work / rel) for rel in manifest.files if (work / rel).is_file())
    models.mkdir(parents=True, exist_ok=True)
    # what is still to download, in the cache dir, and the folder, in the models dir (the cache's
    # disk was not checked: a download filled it and stopped halfway)
    ensure_room({models: folder_bytes, work: to_fetch}, f"{entry.name} {entry.version}")
    for rel, item in sorted(manifest.files.items()):
        fetch(CatalogFile(f"{entry.path}/{rel}", item.size, sha256=item.sha256), rel)
    if entry.signature is not None:
        fetch(entry.signature, SIGNATURE)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=models))
    try:
        for rel in [MANIFEST, *sorted(manifest.files), *([SIGNATURE] if entry.signature else [])]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / rel, tmp / rel)
            with open(tmp / rel, "rb") as done:
                os.fsync(done.fileno())
        os.chmod(tmp, 0o777 & ~current_umask())
        step("verifying")
        verify(tmp)  # every byte, as the daemon will
        if trust is not None:
            trust.check(tmp, manifest)
        fsync_dir(tmp)
        os.rename(tmp, folder)
        fsync_dir(models)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return folder, manifest, True


# -- the build machine's side -------------------------------------------------------------------------
def _read_index(mirror_dir: Path) -> dict[str, FleetVoice]:
    index_path = mirror_dir / INDEX_FILE
    if not index_path.is_file():
        return {}
    return parse_index(index_path.read_bytes(), str(index_path))  # a broken index is not extended


@contextmanager
def _index_lock(mirror_dir: Path) -> Iterator[None]:
    """One change of the index at a time on the build machine: publish copies a whole folder
    between reading the index and writing it, and a rollout or withdrawal meanwhile was lost."""
    mirror_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(mirror_dir / ".ttsd-index.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _share(value: float) -> float:
    try:
        return check_share(value, "share")
    except CatalogError as exc:  # the operator's input, not the mirror's
        raise ConfigError(str(exc)) from None


def _write_index(mirror_dir: Path, voices: dict[str, FleetVoice], sign_key: Any) -> None:
    """The index rewritten by rename: a box reads the old one or the new one, never half. Signed
    with ``sign_key``; an index that was signed is never rewritten unsigned (boxes with trusted
    keys would refuse its shares and withdrawals)."""
    path = mirror_dir / INDEX_FILE
    if sign_key is None:
        if path.is_file() and is_signed(json.loads(path.read_bytes())):
            raise ConfigError(f"{path} is signed: give --sign-key (the fleet key) to change it")
        atomic_write_text(path, index_json(voices), mode=0o644)
        return
    signed = sign_index(json.loads(index_json(voices)), sign_key)
    atomic_write_text(path, json.dumps(signed, indent=1) + "\n", mode=0o644)


def publish(
    folder: Path, mirror_dir: Path, trust: Any = None, share: float | None = None, sign_key: Path | None = None
) -> Prebuilt:
    """Copy ``folder`` (verified, and signed by ``trust`` when given) to ``mirror_dir`` and list it
    in the index, to ``share`` of the boxes (a new version: 1 unless given; one published before
    keeps its share unless given). The same version published again with the same content only
    changes its share; with other content, or once withdrawn, it is refused (boxes may have it)."""
    manifest = verify(folder)
    if trust is not None:
        trust.check(folder, manifest)
    else:  # boxes would refuse a signature that no longer covers the folder: refuse it here first
        from ..signing import check_coverage

        check_coverage(folder, manifest)
    if share is not None:
        share = _share(share)
    # read (once: it may be a pipe) and checked before anything is copied into the mirror
    key = load_fleet_key(sign_key) if sign_key is not None else None
    with _index_lock(mirror_dir):
        return _publish(folder, mirror_dir, manifest, share, key)


def _publish(folder: Path, mirror_dir: Path, manifest: Manifest, share: float | None, sign_key: Any) -> Prebuilt:
    signed = (folder / SIGNATURE).is_file()
    rel = f"ttsd/{manifest.name}/{manifest.version}"
    target = mirror_dir / rel
    voices = _read_index(mirror_dir)
    voice = voices.get(manifest.name, FleetVoice(manifest.name, ()))
    if voice.is_withdrawn(manifest.version):
        raise ConfigError(
            f"{manifest.name} {manifest.version} was withdrawn from {mirror_dir} (boxes rolled it back); "
            "give the folder a new version"
        )
    digest = sha256_file(folder / MANIFEST)
    before = next((p for p in voice.versions if norm(p.version) == norm(manifest.version)), None)
    if before is not None and before.manifest.sha256 != digest:
        raise ConfigError(
            f"{manifest.name} {before.version} is already published with other content (as {before.path}); "
            "give the folder a new version"
        )
    if target.exists():
        if sha256_file(target / MANIFEST) != digest:
            raise ConfigError(
                f"{target}: {manifest.name} {manifest.version} is already published with other "
                "content; give the folder a new version"
            )
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", suffix=".partial", dir=target.parent))
        try:
            for name in [MANIFEST, *sorted(manifest.files), *([SIGNATURE] if signed else [])]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, tmp / name)
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if signed and sha256_file(target / SIGNATURE) != sha256_file(folder / SIGNATURE):
        # signed again (same content, new signature): renamed in, so a box never reads half of it
        atomic_write_bytes(target / SIGNATURE, (folder / SIGNATURE).read_bytes(), mode=0o644)
    signature = None
    if (target / SIGNATURE).is_file():
        signature = CatalogFile(
            f"{rel}/{SIGNATURE}", (target / SIGNATURE).stat().st_size, sha256=sha256_file(target / SIGNATURE)
        )
    entry = Prebuilt(
        manifest.name,
        manifest.version,
        rel,
        CatalogFile(f"{rel}/{MANIFEST}", (target / MANIFEST).stat().st_size, sha256=digest),  # the same bytes
        signature,
        share if share is not None else (before.share if before is not None else 1.0),
    )
    others = tuple(p for p in voice.versions if p is not before)
    voices[manifest.name] = replace(voice, versions=_newest_first((*others, entry)))
    _write_index(mirror_dir, voices, sign_key)
    return entry


def _newest_first(versions: tuple[Prebuilt, ...]) -> tuple[Prebuilt, ...]:
    return tuple(sorted(versions, key=lambda p: Version(p.version), reverse=True))


def _published(voices: dict[str, FleetVoice], mirror_dir: Path, name: str, version: str) -> tuple[FleetVoice, Prebuilt]:
    """The published ``version`` of ``name`` in the index read (``ConfigError`` saying what is not there)."""
    if not (mirror_dir / INDEX_FILE).is_file():
        raise ConfigError(f"{mirror_dir} has no {INDEX_FILE}: publish a folder there first (ttsd models publish)")
    voice = voices.get(name)
    if voice is None:
        raise ConfigError(f"{mirror_dir / INDEX_FILE} has no voice {name!r}")
    if voice.is_withdrawn(version):
        raise ConfigError(f"{name} {version} is withdrawn from {mirror_dir}; publish a new version instead")
    entry = next((p for p in voice.versions if norm(p.version) == norm(version)), None)
    if entry is None:
        listed = ", ".join(p.version for p in voice.versions) or "none"
        raise ConfigError(f"{mirror_dir / INDEX_FILE} has no version {version} of {name} (published: {listed})")
    return voice, entry


def rollout(mirror_dir: Path, name: str, version: str, share: float, sign_key: Path | None = None) -> Prebuilt:
    """Give a published version ``share`` of the boxes (widen, hold or narrow its rollout)."""
    share = _share(share)
    with _index_lock(mirror_dir):
        voices = _read_index(mirror_dir)
        voice, entry = _published(voices, mirror_dir, name, version)
        changed = replace(entry, share=share)
        voices[name] = replace(voice, versions=tuple(changed if p is entry else p for p in voice.versions))
        _write_index(mirror_dir, voices, sign_key)
    return changed


def withdraw(
    mirror_dir: Path, name: str, version: str, why: str = "withdrawn", sign_key: Path | None = None
) -> FleetVoice:
    """Mark a published version withdrawn: no box takes it, and a box that has it goes back to the
    newest version it may have (``ttsd models get --upgrade``). Its files stay on the mirror."""
    reason = clean_reason(why)
    with _index_lock(mirror_dir):
        voices = _read_index(mirror_dir)
        voice = voices.get(name)
        if voice is not None and voice.is_withdrawn(version):
            return voice  # again: nothing changes
        voice, entry = _published(voices, mirror_dir, name, version)
        voices[name] = replace(
            voice,
            versions=tuple(p for p in voice.versions if p is not entry),
            withdrawn={**voice.withdrawn, norm(entry.version): reason},
        )
        _write_index(mirror_dir, voices, sign_key)
    return voices[name]
