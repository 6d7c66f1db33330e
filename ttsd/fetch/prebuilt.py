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

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..errors import (
    CatalogError,
    ConfigError,
    ManifestError,
    ResourceError,
    VoiceExistsError,
)
from ..fsutil import atomic_write_bytes, atomic_write_text, current_umask, fsync_dir
from ..manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    Manifest,
    check_name,
    check_version,
    parse_manifest,
    sha256_file,
    verify,
)
from .download import Mirror, download, fetch_small
from .index import CatalogFile, check_remote_path

INDEX_FILE = "ttsd-index.json"
MAX_INDEX_BYTES = 4 << 20
MAX_FILE_BYTES = 4 << 30  # any one file of a folder
FORMAT = 1
_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Prebuilt:
    """One voice's newest folder on the mirror."""

    name: str
    version: str
    path: str  # the folder, under the mirror
    manifest: CatalogFile
    signature: CatalogFile | None


def _pinned(entry: object, rel: str, limit: int, where: str) -> CatalogFile:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be an object with 'size' and 'sha256'")
    size, digest = entry.get("size"), entry.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= limit:
        raise CatalogError(f"{where}: 'size' must be a whole number from 1 to {limit}")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
        raise CatalogError(f"{where}: 'sha256' must be 64 lower-case hex digits")
    return CatalogFile(check_remote_path(rel), size, sha256=digest)


def parse_index(raw: bytes, source: str) -> dict[str, Prebuilt]:
    """The mirror's ``ttsd-index.json``, every field checked (``CatalogError`` for the first bad one)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CatalogError(f"{source}: not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("voices"), dict):
        raise CatalogError(f"{source}: not a ttsd index (format {FORMAT} with a 'voices' object)")
    voices: dict[str, Prebuilt] = {}
    for name, entry in data["voices"].items():
        where = f"{source}: voice {str(name)[:60]!r}"
        try:
            check_name(name)
            if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
                raise CatalogError(f"{where}: needs a 'version' string")
            version = check_version(entry["version"])
        except ManifestError as exc:
            raise CatalogError(f"{where}: {exc}") from None
        path = check_remote_path(entry.get("path"))
        signature = entry.get("signature")
        voices[name] = Prebuilt(
            name,
            version,
            path,
            _pinned(entry.get("manifest"), f"{path}/{MANIFEST}", MAX_MANIFEST_BYTES, where),
            None if signature is None else _pinned(signature, f"{path}/{SIGNATURE}", MAX_SIGNATURE_BYTES, where),
        )
    return voices


def load_index(mirror: Mirror) -> dict[str, Prebuilt]:
    """The mirror's index; ``NotOnMirror`` when it has none (a plain Piper mirror)."""
    return parse_index(fetch_small(mirror, INDEX_FILE, MAX_INDEX_BYTES), mirror.url(INDEX_FILE))


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
    work = downloads / f"{entry.name}-{entry.version}"
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    step = reporter.step if reporter is not None else (lambda _m: None)

    def fetch(file: CatalogFile, rel: str) -> Path:
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    need = sum(e.size for e in manifest.files.values())
    models.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(models).free
    if free < 2 * need + (16 << 20):  # the downloads and the folder
        raise ResourceError(
            f"{models}: {free >> 20} MiB free, {entry.name} {entry.version} needs {(2 * need >> 20) + 16} MiB",
            storage=True,
        )
    for rel, item in sorted(manifest.files.items()):
        if item.size > MAX_FILE_BYTES:
            raise CatalogError(f"{entry.name} {entry.version}: {rel} is larger than {MAX_FILE_BYTES} bytes")
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
def publish(folder: Path, mirror_dir: Path, trust: Any = None) -> Prebuilt:
    """Copy ``folder`` (verified, and signed by ``trust`` when given) to ``mirror_dir`` and name it
    in the index as its voice's newest version. The same version published again with the same
    content is a no-op; with other content it is refused (boxes may have it already)."""
    manifest = verify(folder)
    if trust is not None:
        trust.check(folder, manifest)
    else:  # boxes would refuse a signature that no longer covers the folder: refuse it here first
        from ..signing import check_coverage

        check_coverage(folder, manifest)
    signed = (folder / SIGNATURE).is_file()
    rel = f"ttsd/{manifest.name}/{manifest.version}"
    target = mirror_dir / rel
    index_path = mirror_dir / INDEX_FILE
    index: dict[str, Any] = {"format": FORMAT, "voices": {}}
    if index_path.is_file():
        raw = index_path.read_bytes()
        parse_index(raw, str(index_path))  # a broken index is not extended
        index = json.loads(raw)
    if target.exists():
        if sha256_file(target / MANIFEST) != sha256_file(folder / MANIFEST):
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
    entry = {
        "version": manifest.version,
        "path": rel,
        "manifest": {"size": (target / MANIFEST).stat().st_size, "sha256": sha256_file(target / MANIFEST)},
    }
    if (target / SIGNATURE).is_file():
        entry["signature"] = {"size": (target / SIGNATURE).stat().st_size, "sha256": sha256_file(target / SIGNATURE)}
    current = index["voices"].get(manifest.name)
    if current is None or Version(current["version"]) <= manifest.parsed_version:
        index["voices"][manifest.name] = entry
        atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True) + "\n", mode=0o644)
    return parse_index(index_path.read_bytes(), str(index_path))[manifest.name]
