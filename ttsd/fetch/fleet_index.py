"""A fleet mirror's ``ttsd-index.json``: every published version of each voice, the share of boxes
each goes to, and the withdrawn ones.

    {"format": 1, "voices": {"joe": {
        "versions": {
            "1": {"path": "ttsd/joe/1", "manifest": {"size": …, "sha256": …}, "signature": {…}},
            "2": {"path": "ttsd/joe/2", "manifest": {…}, "share": 0.05},
            "0.9": {"withdrawn": "clipped consonants"}},
        "version": "1", "path": "ttsd/joe/1", "manifest": {…}, "signature": {…}}}}

``versions`` is what boxes follow (``FleetVoice.target``): a box takes the newest version that is
not withdrawn and whose ``share`` (default 1) includes it, by the rule gray release uses for users
(``ttsd.shares``: sha256 of voice, version and box id into [0, 1), below the share), so widening
a share keeps every box that had the version and each version picks its own boxes. A withdrawn
version is never taken, and a box that has one goes back (``ttsd.fetch.withdraw``).

The fields beside ``versions`` name one version for ttsd releases that predate staged rollout:
the newest version out to every box, else the newest that is not withdrawn. An index without
``versions`` (written by those releases) is one version at share 1.

The index is remote data: bounded, every field checked (``CatalogError`` names the first bad one),
paths plain segments under the mirror, shares finite numbers in [0, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from packaging.version import Version

from ..errors import CatalogError, ManifestError
from ..manifest import MANIFEST, MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, SIGNATURE, check_name, check_version, norm
from ..shares import within
from .index import CatalogFile, check_remote_path, display_text

INDEX_FILE = "ttsd-index.json"
FORMAT = 1
MAX_VERSIONS = 1000  # per voice
MAX_REASON = 200
_HEX64 = frozenset("0123456789abcdef")
_LEGACY = ("version", "path", "manifest", "signature")


@dataclass(frozen=True)
class Prebuilt:
    """One published version of a voice: its folder on the mirror and the share of boxes it goes to."""

    name: str
    version: str
    path: str  # the folder, under the mirror
    manifest: CatalogFile
    signature: CatalogFile | None
    share: float = 1.0


@dataclass(frozen=True)
class FleetVoice:
    """A voice on a fleet mirror: its published versions (newest first) and its withdrawn ones."""

    name: str
    versions: tuple[Prebuilt, ...]
    withdrawn: dict[str, str] = field(default_factory=dict)  # normalised version -> why

    def newest(self) -> Prebuilt | None:
        """The newest version that is not withdrawn, whatever its share."""
        return self.versions[0] if self.versions else None

    def target(self, box: str) -> Prebuilt | None:
        """The newest version this box may take: not withdrawn, and its share includes the box."""
        return next((p for p in self.versions if within(p.share, self.name, norm(p.version), box)), None)

    def is_withdrawn(self, version: str) -> bool:
        return norm(version) in self.withdrawn


def _pinned(entry: object, rel: str, limit: int, where: str) -> CatalogFile:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be an object with 'size' and 'sha256'")
    size, digest = entry.get("size"), entry.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= limit:
        raise CatalogError(f"{where}: 'size' must be a whole number from 1 to {limit}")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
        raise CatalogError(f"{where}: 'sha256' must be 64 lower-case hex digits")
    return CatalogFile(check_remote_path(rel), size, sha256=digest)


def check_share(value: object, where: str) -> float:
    """A share: a finite number from 0 to 1 (not a bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CatalogError(f"{where}: 'share' must be a number from 0 to 1")
    if not 0.0 <= value <= 1.0:
        raise CatalogError(f"{where}: 'share' {value} is outside 0 to 1")
    return float(value)


def clean_reason(text: str) -> str:
    """A withdrawal's reason as boxes show it: ``display_text`` on one line, at most ``MAX_REASON``
    characters; "withdrawn" when nothing printable is left (still withdrawn, and written back so)."""
    return " ".join(display_text(text).split())[:MAX_REASON] or "withdrawn"


def _reason(value: object, where: str) -> str:
    """A withdrawal's reason as the index gives it (``true`` or a short text)."""
    if value is True:
        return "withdrawn"
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: 'withdrawn' must be true or a short reason")
    return clean_reason(value)


def _version_entry(name: str, version: str, entry: object, where: str) -> Prebuilt:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be an object")
    path = check_remote_path(entry.get("path"))
    signature = entry.get("signature")
    return Prebuilt(
        name,
        version,
        path,
        _pinned(entry.get("manifest"), f"{path}/{MANIFEST}", MAX_MANIFEST_BYTES, where),
        None if signature is None else _pinned(signature, f"{path}/{SIGNATURE}", MAX_SIGNATURE_BYTES, where),
        check_share(entry.get("share", 1.0), where),
    )


def _voice(name: object, entry: object, source: str) -> FleetVoice:
    where = f"{source}: voice {str(name)[:60]!r}"
    try:
        check_name(name)  # type: ignore[arg-type]
    except ManifestError as exc:
        raise CatalogError(f"{where}: {exc}") from None
    assert isinstance(name, str)
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be an object")
    listed = entry.get("versions")
    if listed is None:  # an index from before staged rollout: its one version, to every box
        if not isinstance(entry.get("version"), str):
            raise CatalogError(f"{where}: needs a 'version' string")
        listed = {entry["version"]: {k: v for k, v in entry.items() if k != "version"}}
    if not isinstance(listed, dict) or len(listed) > MAX_VERSIONS:
        raise CatalogError(f"{where}: 'versions' must be an object of at most {MAX_VERSIONS} versions")
    versions: dict[str, Prebuilt] = {}
    withdrawn: dict[str, str] = {}
    for version, item in listed.items():
        at = f"{where} version {str(version)[:70]!r}"
        try:
            if not isinstance(version, str) or any(c.isspace() for c in version):
                raise ManifestError("a version has no spaces or line breaks")
            check_version(version)
        except ManifestError as exc:
            raise CatalogError(f"{at}: {exc}") from None
        key = norm(version)
        if key in versions or key in withdrawn:
            raise CatalogError(f"{at}: listed twice")
        if isinstance(item, dict) and "withdrawn" in item:
            withdrawn[key] = _reason(item["withdrawn"], at)
        else:
            versions[key] = _version_entry(name, version, item, at)
    newest_first = tuple(sorted(versions.values(), key=lambda p: Version(p.version), reverse=True))
    return FleetVoice(name, newest_first, withdrawn)


def parse_index(raw: bytes, source: str) -> dict[str, FleetVoice]:
    """The mirror's ``ttsd-index.json``, every field checked (``CatalogError`` for the first bad one)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CatalogError(f"{source}: not valid JSON ({str(exc)[:100]})") from None
    if (
        not isinstance(data, dict)
        or type(data.get("format")) is not int
        or data["format"] != FORMAT
        or not isinstance(data.get("voices"), dict)
    ):
        raise CatalogError(f"{source}: not a ttsd index (format {FORMAT} with a 'voices' object)")
    return {name: _voice(name, entry, source) for name, entry in data["voices"].items()}


# -- writing (the build machine's side) --------------------------------------------------------------
def entry_json(p: Prebuilt) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": p.path, "manifest": {"size": p.manifest.size, "sha256": p.manifest.sha256}}
    if p.signature is not None:
        entry["signature"] = {"size": p.signature.size, "sha256": p.signature.sha256}
    if p.share < 1.0:
        entry["share"] = p.share
    return entry


def voice_json(voice: FleetVoice) -> dict[str, Any]:
    """A voice's index entry: ``versions``, and beside it the one version older ttsd releases take
    (the newest out to every box, else the newest not withdrawn; none when all are withdrawn)."""
    listed: dict[str, Any] = {p.version: entry_json(p) for p in voice.versions}
    for version, why in voice.withdrawn.items():
        listed[version] = {"withdrawn": why}
    entry: dict[str, Any] = {"versions": dict(sorted(listed.items(), key=lambda kv: Version(kv[0])))}
    legacy = next((p for p in voice.versions if p.share >= 1.0), voice.newest())
    if legacy is not None:
        entry.update({"version": legacy.version, **entry_json(legacy)})
        entry.pop("share", None)
    return entry


def index_json(voices: dict[str, FleetVoice]) -> str:
    return (
        json.dumps({"format": FORMAT, "voices": {n: voice_json(v) for n, v in sorted(voices.items())}}, indent=1) + "\n"
    )
