"""The model folder manifest ``ttsd.json``: what a folder claims to be, and the check that it is.

A model folder is ``ttsd.json`` plus the files it lists, each with its sha256 and size::

    {"format": 1, "name": "en_US-joe-medium", "version": "1", "engine": "vits",
     "sample_rate": 22050, "files": {"config.json": {"sha256": "...", "size": 1234}, ...},
     "warmup": ["optional sentences"], "description": "...", "license": "..."}

``verify`` refuses a folder that does not match exactly: a listed file missing or changed, an
unlisted file, a symlink, a pickle weight file (safetensors only), or a path escaping the folder.
The one file a folder may hold beyond its list is a signature, ``model.sig`` (an OpenSSF
model-signing bundle over every other file, ``ttsd.json`` included; checked by ``ttsd.signing``
when the daemon has trusted keys). Plain data only: no torch here.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.utils import canonicalize_version
from packaging.version import InvalidVersion, Version

from .errors import ManifestError, Problem, VerifyError, is_system_oserror
from .fsutil import SHARED, atomic_write_text
from .safe_read import MAX_ENTRIES, hash_fd, hash_listed, open_beneath, open_listed, sha256_file, walk

# what the store, the signature check and the CLI read from here
__all__ = ["MAX_ENTRIES", "hash_fd", "hash_listed", "open_beneath", "open_listed", "sha256_file"]

MANIFEST = "ttsd.json"
FORMAT = 1
# Weight formats that unpickle arbitrary code when loaded; ttsd loads safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_MANIFEST_BYTES = 1 << 20
SIGNATURE = "model.sig"  # model_signing's default name; it cannot be listed, since it signs the list
MAX_SIGNATURE_BYTES = 1 << 20  # a key-signed bundle is ~2 KB, a Sigstore one with a certificate ~10 KB
_KNOWN = frozenset(
    {"format", "name", "version", "engine", "sample_rate", "files", "warmup", "description", "license", "precision"}
)
PRECISIONS = ("auto", "fp32", "bf16")  # see ttsd.engines.precision


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A parsed ``ttsd.json``."""

    name: str
    version: str
    engine: str
    sample_rate: int
    files: dict[str, FileEntry]
    warmup: tuple[str, ...] = ()
    description: str = ""
    license: str = ""
    precision: str = "auto"  # the voice's default number format (ttsd.engines.precision)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "engine": self.engine,
            "sample_rate": self.sample_rate,
            "files": {path: {"sha256": e.sha256, "size": e.size} for path, e in sorted(self.files.items())},
        }
        if self.warmup:
            data["warmup"] = list(self.warmup)
        if self.description:
            data["description"] = self.description
        if self.license:
            data["license"] = self.license
        if self.precision != "auto":
            data["precision"] = self.precision
        data.update(self.extra)
        return data


MAX_NAME = 100  # characters of a voice name (Piper's longest are about 40)


def check_name(name: str) -> str:
    """A voice name is used in paths, URLs, log lines and metric labels: letters, digits, ``-``,
    ``_`` and ``.`` only, at most ``MAX_NAME`` of them (a name of 20,000 made every metric line
    that long, for good)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith(".") or len(name) > MAX_NAME:
        shown = repr(name) if len(name) <= 80 else repr(name[:60]) + "…"
        raise ManifestError(
            f"invalid voice name {shown}: use at most {MAX_NAME} letters, digits, '-', '_' and '.' (not leading)"
        )
    return name


def check_version(version: str) -> str:
    """A PEP 440 version of at most 64 characters (it names a folder and is compared as numbers:
    thousands of digits would make packaging's int() raise ValueError), in letters, digits, ``.``,
    ``-`` and ``_``: a local part (``5+hotfix1``) or an epoch (``1!2``) names no path a fleet
    mirror can serve (one such version made every box refuse the mirror's whole index)."""
    try:
        if not isinstance(version, str) or len(version) > 64 or not all(c.isalnum() or c in "._-" for c in version):
            raise InvalidVersion(version)
        Version(version)
    except (InvalidVersion, ValueError, TypeError) as exc:
        shown = repr(version) if len(repr(version)) <= 80 else repr(version)[:70] + "…"
        raise ManifestError(
            f"invalid version {shown}: must be a PEP 440 version such as 1, 1.2 or 2.0.1 (at most 64 characters; "
            "no local part '+' or epoch '!')"
        ) from exc
    return version


def norm(version: str) -> str:
    """A version's canonical spelling, as PEP 440 compares versions: ``1.0`` and ``1`` are the same
    version (a request for version "1.0" gets the loaded "1", and both name one store folder)."""
    try:
        return canonicalize_version(Version(version))
    except (InvalidVersion, ValueError, TypeError):  # ValueError: thousands of digits (a typo, or worse)
        return version


def _safe_relpath(rel: str) -> str:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts or rel != path.as_posix():
        raise ManifestError(f"{MANIFEST}: file path {rel!r} is not a plain path inside the folder")
    return rel


# a digest is compared, and a fetch names its partial file by it: anything but hex is refused here
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def parse_manifest(data: Any, source: str = MANIFEST) -> Manifest:
    """Build a ``Manifest`` from decoded JSON, with one clear error for the first problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: must be a JSON object")
    for key, kind in (("name", str), ("version", str), ("engine", str), ("sample_rate", int), ("files", dict)):
        if key not in data:
            raise ManifestError(f"{source}: missing required field {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ManifestError(f"{source}: field {key!r} must be a {kind.__name__}")
    if data.get("format", FORMAT) != FORMAT:
        raise ManifestError(f"{source}: format {data.get('format')!r} is not supported (expected {FORMAT})")
    check_name(data["name"])
    check_version(data["version"])
    if data["sample_rate"] <= 0:
        raise ManifestError(f"{source}: sample_rate must be positive")
    if len(data["files"]) > MAX_ENTRIES:
        raise ManifestError(f"{source}: lists more than {MAX_ENTRIES} files")
    files: dict[str, FileEntry] = {}
    for rel, entry in data["files"].items():
        _safe_relpath(rel)
        if rel == MANIFEST:
            raise ManifestError(f"{source}: the manifest cannot list itself")
        if rel == SIGNATURE:
            raise ManifestError(
                f"{source}: {SIGNATURE} is the folder's signature and cannot be listed (a signature covers the list)"
            )
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _HEX64.fullmatch(entry["sha256"])
            or not isinstance(entry.get("size"), int)
            or isinstance(entry["size"], bool)
            or entry["size"] < 0
        ):
            raise ManifestError(f"{source}: entry for {rel!r} needs a 64-hex 'sha256' and a 'size' of 0 or more")
        files[rel] = FileEntry(sha256=entry["sha256"].lower(), size=entry["size"])
    if not files:
        raise ManifestError(f"{source}: lists no files")
    # "a/b" and "a/b/c" (or "ttsd.json/x"): a path that is a file and a folder at once
    folders = {parent.as_posix() for rel in files for parent in PurePosixPath(rel).parents if parent.parts}
    if clash := sorted(folders & (set(files) | {MANIFEST, SIGNATURE})):
        raise ManifestError(f"{source}: {clash[0]!r} is listed as a file and as a folder")
    warmup = data.get("warmup", [])
    if (
        not isinstance(warmup, list)
        or not all(isinstance(s, str) and len(s) <= 500 for s in warmup)
        or len(warmup) > 20
    ):
        raise ManifestError(f"{source}: 'warmup' must be a list of at most 20 sentences of at most 500 characters")
    precision = data.get("precision", "auto")
    if precision not in PRECISIONS:
        raise ManifestError(f"{source}: 'precision' must be one of {', '.join(PRECISIONS)}")
    return Manifest(
        name=check_name(data["name"]),
        version=check_version(data["version"]),
        engine=data["engine"],
        sample_rate=data["sample_rate"],
        files=files,
        warmup=tuple(warmup),
        description=str(data.get("description", "")),
        license=str(data.get("license", "")),
        precision=precision,
        extra={k: v for k, v in data.items() if k not in _KNOWN},
    )


def read_manifest(folder: Path) -> Manifest:
    """Read and parse ``folder/ttsd.json`` (no file checks: see ``verify``)."""
    path = folder / MANIFEST
    if path.is_symlink():
        raise ManifestError(f"{path}: is a symlink")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST} (not a ttsd model folder; see 'ttsd models pack')") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
        text = os.read(fd, MAX_MANIFEST_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read ({exc})") from exc
    finally:
        os.close(fd)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return parse_manifest(data, str(path))


def size_problem(rel: str, entry: FileEntry, size: int, digest: str) -> Problem | None:
    """The problem with a listed file that read as ``size`` bytes hashing to ``digest``, if any."""
    if size < entry.size:
        return Problem("short", rel, f"size {size}, manifest says {entry.size}")
    if size != entry.size:
        return Problem("changed", rel, f"size {size}, manifest says {entry.size}")
    if digest != entry.sha256:
        return Problem("changed", rel, "sha256 differs from manifest")
    return None


def problems_error(folder: Path, problems: list[Problem]) -> VerifyError:
    """One ``VerifyError`` for ``problems``: the first in the message, all in ``problems``."""
    first = str(problems[0])
    summary = first if len(problems) == 1 else f"{first} (and {len(problems) - 1} more)"
    return VerifyError(f"{folder}: {summary}", problems)


def inspect(folder: Path) -> Manifest:
    """Everything ``verify`` checks except the bytes: the manifest, the file list (nothing
    missing, extra or unsafe, no pickle weights) and every file's size, from ``stat`` alone.
    Cheap enough to run at every rescan; the bytes are hashed once, when the store copies the
    folder (``ModelStore.put``)."""
    manifest, problems = inspect_folder(folder)
    if problems:
        raise problems_error(folder, problems)
    return manifest


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def inspect_folder(folder: Path) -> tuple[Manifest, list[Problem]]:
    """``inspect``'s findings without raising for them: the manifest (``ManifestError`` if it
    cannot be read) and every problem found from ``stat`` alone."""
    if folder.is_symlink():  # first: a link to nowhere is refused as a link, not as no folder
        raise VerifyError(
            f"{folder}: is a symlink; a model folder must be a real folder (copy it in)",
            [Problem("unsafe", str(folder), "symlink")],
        )
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a directory")
    manifest = read_manifest(folder)
    try:
        present, unsafe = walk(folder)
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST} (the folder went away while it was checked)") from None
    problems = list(unsafe)
    present_set = set(present) - {MANIFEST, SIGNATURE}
    if SIGNATURE in present and (size := _size(folder / SIGNATURE)) > MAX_SIGNATURE_BYTES:
        problems.append(Problem("unsafe", SIGNATURE, f"{size} bytes: larger than any signature"))
    pickles = {rel for rel in present_set | set(manifest.files) if rel.lower().endswith(PICKLE_SUFFIXES)}
    problems += [Problem("pickle", rel, "only safetensors are loaded") for rel in sorted(pickles)]
    for rel in sorted(present_set - set(manifest.files) - pickles):  # a pickle file is said once, as that
        problems.append(Problem("extra", rel, f"not listed in {MANIFEST}"))
    unsafe_paths = {p.path for p in unsafe}
    for rel, entry in sorted(manifest.files.items()):
        if rel not in present_set:
            if rel in unsafe_paths:
                continue
            try:  # a folder where a file is listed is no copy in progress: it was waited for as one
                is_dir = stat.S_ISDIR((folder / rel).lstat().st_mode)
            except OSError:
                is_dir = False
            problems.append(Problem("unsafe", rel, "a directory, not a file") if is_dir else Problem("missing", rel))
            continue
        try:
            size = (folder / rel).lstat().st_size
        except FileNotFoundError:  # deleted while we looked: a copy in progress, or going away
            problems.append(Problem("missing", rel))
            continue
        if (problem := size_problem(rel, entry, size, entry.sha256)) is not None:
            problems.append(problem)
    return manifest, problems


def verify(folder: Path) -> Manifest:
    """Check ``folder`` against its manifest, every byte, and return the manifest.

    Raises ``ManifestError`` for a bad manifest, and ``VerifyError`` listing every problem
    (missing, extra, changed, unsafe files) otherwise. Reads every byte: call it off the
    request path.
    """
    manifest, found = inspect_folder(folder)
    problems = [p for p in found if p.kind not in ("short", "changed")]
    skip = {p.path for p in problems}  # missing or unsafe: nothing to hash
    for rel, entry in sorted(manifest.files.items()):
        if rel in skip:
            continue
        try:
            size, digest = hash_listed(folder / rel, entry.size)
        except FileNotFoundError:
            problems.append(Problem("missing", rel))
            continue
        except OSError as exc:
            if is_system_oserror(exc):
                raise  # the box's problem, not the folder's
            problems.append(Problem("unreadable", rel, exc.strerror or str(exc)))
            continue
        if (problem := size_problem(rel, entry, size, digest)) is not None:
            problems.append(problem)
    if problems:
        raise problems_error(folder, problems)
    return manifest


def pack(
    folder: Path,
    *,
    name: str,
    version: str,
    engine: str,
    sample_rate: int,
    warmup: tuple[str, ...] = (),
    description: str = "",
    license: str = "",
    precision: str = "auto",
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``folder/ttsd.json`` listing every file in ``folder`` with its sha256.

    ``extra`` adds fields of the maker's own (``ttsd models get`` records where a voice came
    from); a reader keeps them in ``Manifest.extra``. Refuses folders with symlinks or pickle
    weights rather than writing a manifest that ``verify`` would reject. The manifest is written
    tmp + fsync + rename.
    """
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a directory")
    present, unsafe = walk(folder)
    if unsafe:
        raise VerifyError(f"{folder}: cannot pack {unsafe[0].path} ({unsafe[0].detail})", unsafe)
    if extra and _KNOWN & set(extra):
        raise ManifestError(f"{folder}: extra manifest fields cannot replace {sorted(_KNOWN & set(extra))}")
    files = {}
    for rel in present:
        if rel in (MANIFEST, SIGNATURE) or Path(rel).name.startswith(f".{MANIFEST}"):
            continue
        if rel.lower().endswith(PICKLE_SUFFIXES):
            raise VerifyError(
                f"{folder}: {rel} is a pickle weight file; convert it to safetensors first "
                "(transformers: model.save_pretrained(dir, safe_serialization=True))",
                [Problem("pickle", rel)],
            )
        files[rel] = FileEntry(sha256=sha256_file(folder / rel), size=(folder / rel).stat().st_size)
    manifest = Manifest(
        name=check_name(name),
        version=check_version(version),
        engine=engine,
        sample_rate=sample_rate,
        files=files,
        warmup=tuple(warmup),
        description=description,
        license=license,
        precision=precision,
        extra=dict(extra or {}),
    )
    parse_manifest(manifest.to_json())  # same rules as reading it back
    # readable as the folder's other files are (the umask decides): a daemon running as its own
    # user must read a folder an admin packed as root
    text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(folder / MANIFEST, text, mode=SHARED)
    return manifest
