"""ttsd's private model store, under the state dir:

    STATE/store/NAME/VERSION/   copies of model folders, made from the very bytes that were hashed
                                against the manifest; loads come only from here. VERSION is the
                                version's canonical spelling (``1.0`` and ``1`` are one version,
                                so one folder: ``manifest.norm``)

A folder is hashed once on its way in: ``put`` reads each listed file once, hashing it and writing
the same bytes into a hidden temp dir, then compares every hash with the manifest and renames the
copy into place. So what is checked is what is loaded: nothing another process does to the models
dir afterwards (rewrite a file, swap it for a link) reaches the copy, which lives in a directory
only ttsd's user can write. A copy found in the store later (after a restart, for a rollback) is
verified again before it loads (``manifest.verify``). After ``kill -9`` the store holds only
complete copies: a copy in progress is a hidden ``.*.partial`` dir, removed at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..errors import (
    ManifestError,
    Problem,
    SignatureError,
    TtsdError,
    VerifyError,
    is_system_oserror,
)
from ..fsutil import atomic_write_bytes, fsync_dir
from ..manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SIGNATURE,
    FileEntry,
    Manifest,
    check_name,
    check_version,
    hash_fd,
    inspect,
    norm,
    open_beneath,
    parse_manifest,
    problems_error,
    size_problem,
    verify,
)
from ..signing import read_signature

log = logging.getLogger("ttsd.store")
T = TypeVar("T")


def content_id(manifest: Manifest) -> str:
    """What a version *is*: the hashes of its files (two folders with equal ids hold equal bytes)."""
    listing = json.dumps({p: (e.sha256, e.size) for p, e in sorted(manifest.files.items())}, sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(self.root.stat().st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):  # copies others could change are not what was checked
            try:
                os.chmod(self.root, mode & ~(stat.S_IWGRP | stat.S_IWOTH))
            except OSError as exc:
                log.warning("%s can be written by other users and cannot be made private (%s)", self.root, exc)
        for leftover in self.root.glob(".*.partial"):  # a copy interrupted by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        self._rename_to_canonical()

    def _rename_to_canonical(self) -> None:
        """Copies stored under another spelling of their version (a store written before versions
        were folded: ``1.0`` beside ``1``) move to the canonical name; a second copy of one version
        is removed."""
        for voice in sorted(self.root.iterdir()):
            if voice.name.startswith(".") or voice.is_symlink() or not voice.is_dir():
                continue
            for folder in sorted(voice.iterdir()):
                canonical = voice / norm(folder.name)
                if canonical == folder or folder.is_symlink() or not folder.is_dir():
                    continue
                if os.path.lexists(canonical):
                    log.warning("%s is a second copy of %s; removing it", folder, canonical)
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    os.rename(folder, canonical)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / norm(version)

    def get(self, name: str, version: str) -> Path | None:
        path = self.path(name, version)
        return path if (path / MANIFEST).is_file() else None

    def scan(self) -> list[tuple[str, str, Path]]:
        """Every stored copy as (voice, version, folder): what the daemon can start from when its
        state is lost. Only names a manifest allows; the copies are verified before they load."""
        found: list[tuple[str, str, Path]] = []
        if not self.root.is_dir():
            return found
        for voice in sorted(self.root.iterdir()):
            if voice.name.startswith(".") or voice.is_symlink() or not voice.is_dir():
                continue
            for folder in sorted(voice.iterdir()):
                try:
                    check_name(voice.name)
                    check_version(folder.name)
                except ManifestError:
                    continue
                if not folder.is_symlink() and (folder / MANIFEST).is_file():
                    found.append((voice.name, folder.name, folder))
        return found

    def set_aside(self, name: str, version: str) -> Path | None:
        """Take a stored copy out of the store at once (one rename, under the caller's lock), to be
        deleted later with ``shutil.rmtree``: a copy of the same version made meanwhile goes to the
        canonical path, never into a directory being deleted. A crash leaves a ``.partial`` dir that
        the next start removes. None if there is no such copy or it cannot be moved."""
        path = self.path(name, version)
        if not path.is_dir() or path.is_symlink():
            return None
        aside = self.root / f".{name}-{version}.{uuid.uuid4().hex}.removed.partial"
        try:
            os.rename(path, aside)
        except OSError:
            return None
        return aside

    def set_voice_aside(self, name: str) -> Path | None:
        """``set_aside`` for every stored copy of voice ``name`` at once (``STATE/store/NAME``).
        None if the voice has no store dir. ``OSError`` if it cannot be moved; ``ManifestError``
        for a name that is not a voice's (it would name a path outside the store)."""
        check_name(name)
        path = self.root / name
        if not os.path.lexists(path):
            return None
        if path.is_symlink() or not path.is_dir():  # not a store dir ttsd made: the entry goes, never its target
            path.unlink()
            return None
        aside = self.root / f".{name}.{uuid.uuid4().hex}.removed.partial"
        os.rename(path, aside)
        return aside

    def remove(self, name: str, version: str) -> None:
        """Drop a stored copy (damaged, refused, or no longer a rollback target)."""
        path = self.path(name, version)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)

    def put(self, source: Path, manifest: Manifest) -> Path:
        """Copy ``source`` (which claims to be ``manifest``) into the store, hashing every byte on
        the way; returns the stored folder. ``VerifyError`` (nothing stored) when a file is
        missing, short or other than the manifest says. A copy of the same content already in
        the store is kept if it still verifies."""
        target = self.path(manifest.name, manifest.version)
        existing = self.get(manifest.name, manifest.version)
        if existing is not None:
            try:
                if content_id(verify(existing)) == content_id(manifest):
                    return existing
            except (TtsdError, OSError) as exc:
                if is_system_oserror(exc):
                    raise
                if existing.exists():  # else a prune set it aside meanwhile: nothing was damaged
                    log.warning("store copy %s is damaged (%s); copying it again", existing, exc)
            # damaged or different: replace (content checks happen before). Gone already: set aside
            # meanwhile (a prune of this version), and copied afresh below all the same
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(existing)
        inspect(source)  # no link, nothing missing, extra or short, before a byte is read (stat only)
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.name}-{manifest.version}.", suffix=".partial", dir=self.root))
        try:
            # every file is opened beneath this descriptor without following links: a folder or
            # file swapped for a link after the check above cannot make the copy read elsewhere
            root = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            try:
                _copy_manifest(root, source, tmp, manifest)
                problems = [
                    p
                    for rel, entry in sorted(manifest.files.items())
                    if (p := _copy_hashed(root, tmp, rel, entry)) is not None
                ]
            finally:
                os.close(root)
            if problems:
                raise problems_error(source, problems)
            self._copy_signature(source, tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() and not target.is_symlink():  # a leftover without a manifest (get() saw none)
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            os.rename(tmp, target)
            fsync_dir(target.parent)
            return target
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def offer_signature(self, source: Path, stored: Path, accept: Callable[[], T]) -> T | None:
        """Try the models-dir folder's ``model.sig`` in its store copy, when it differs from the
        copy's: a folder signed (again) after it was copied in. It stays when ``accept()`` (the
        signature check, which raises when it fails) passes; otherwise the copy's own signature is
        put back, so a junk file dropped beside a good folder cannot take its version down. None
        when the folder has no other signature to try. Loader thread."""
        try:
            data = read_signature(source)
        except SignatureError as exc:
            log.warning("%s: %s", source, exc)
            return None
        target = stored / SIGNATURE
        try:
            own: bytes | None = target.read_bytes()
        except FileNotFoundError:
            own = None
        if data is None or data == own:
            return None
        atomic_write_bytes(target, data)
        try:
            return accept()
        except BaseException:
            if own is None:
                target.unlink(missing_ok=True)
            else:
                atomic_write_bytes(target, own)
            raise

    @staticmethod
    def _copy_signature(source: Path, dest: Path) -> None:
        try:
            data = read_signature(source)
        except SignatureError as exc:
            log.warning("%s: %s", source, exc)
            return
        if data is None:
            return
        target = dest / SIGNATURE
        try:
            if target.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
        atomic_write_bytes(target, data)


def _copy_manifest(root: int, source: Path, tmp: Path, manifest: Manifest) -> None:
    """The source's ``ttsd.json`` bytes into the copy, if they still say exactly ``manifest``."""
    fd = open_beneath(root, MANIFEST)
    try:
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    try:
        copied = parse_manifest(json.loads(raw), str(source / MANIFEST))
    except (ValueError, RecursionError, ManifestError) as exc:
        raise VerifyError(
            f"{source}: {MANIFEST} changed while being copied into the store",
            [Problem("changed", MANIFEST, str(exc)[:200])],
        ) from exc
    if copied.to_json() != manifest.to_json():
        raise VerifyError(
            f"{source}: changed while being copied into the store",
            [Problem("changed", MANIFEST, "other than when it was read")],
        )
    _write_synced(tmp / MANIFEST, lambda out: out.write(raw))


def _copy_hashed(root: int, tmp: Path, rel: str, entry: FileEntry) -> Problem | None:
    """One listed file, hashed as it is copied; its problem, if any."""
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    result: list[tuple[int, str]] = []
    try:
        fd = open_beneath(root, rel)
    except FileNotFoundError:
        return Problem("missing", rel)
    except OSError as exc:
        if is_system_oserror(exc):
            raise
        return Problem("unsafe" if exc.errno == errno.ELOOP else "unreadable", rel, exc.strerror or str(exc))
    try:
        _write_synced(dest, lambda out: result.append(hash_fd(fd, entry.size, out.write)))
    finally:
        os.close(fd)
    size, digest = result[0]
    return size_problem(rel, entry, size, digest)


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with open(path, "xb") as out:
        write(out)
        out.flush()
        os.fsync(out.fileno())
