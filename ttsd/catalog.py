"""Find model folders in a models directory by voice name (reads manifests only; no loading)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from .errors import ConfigError, TtsdError
from .manifest import Manifest, check_version, read_manifest


@dataclass(frozen=True)
class Candidate:
    folder: Path
    manifest: Manifest | None
    problem: str = ""


def scan(models_dir: Path) -> list[Candidate]:
    """Every non-hidden folder under ``models_dir`` with its manifest, or why it has none."""
    if not models_dir.is_dir():
        return []
    found = []
    for folder in sorted(models_dir.iterdir()):
        if folder.name.startswith(".") or folder.name.endswith(".partial") or not folder.is_dir():
            continue
        try:
            found.append(Candidate(folder, read_manifest(folder)))
        except TtsdError as exc:
            found.append(Candidate(folder, None, str(exc)))
    return found


def find_voice(models_dir: Path, name: str, version: str | None = None) -> Path:
    """Folder of voice ``name`` (its newest version, or ``version``) in ``models_dir``."""
    candidates = scan(models_dir)
    matches = [c for c in candidates if c.manifest and c.manifest.name == name]
    if version is not None:
        wanted = Version(check_version(version))
        matches = [c for c in matches if c.manifest and c.manifest.parsed_version == wanted]
    if not matches:
        known = sorted({c.manifest.name for c in candidates if c.manifest})
        hint = f" (voices there: {', '.join(known)})" if known else ""
        what = f"{name} version {version}" if version else name
        raise ConfigError(f"no voice {what} in {models_dir}{hint}")
    return max(matches, key=lambda c: c.manifest.parsed_version).folder  # type: ignore[union-attr]
