"""The models dir's layout: which entries are model folders, and finding a voice among them by
name (reads manifests only; nothing is verified or loaded here).

A candidate is a top-level folder whose name does not start with ``.`` and does not end with
``.partial``: those are someone's work in progress (``ttsd models get``, ``rsync`` and the
built-in seed build there, then rename into place). The source, the watcher and the CLI all use
this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from .errors import TtsdError, UnknownVoiceError
from .manifest import Manifest, check_version, read_manifest


def is_candidate_name(name: str) -> bool:
    """Whether a top-level entry of the models dir with this name may be a model folder."""
    return bool(name) and not name.startswith(".") and not name.endswith(".partial")


def is_under_candidate(path: Path, models_dir: Path) -> bool:
    """Whether ``path`` (a file event's path) lies inside a candidate folder of ``models_dir``."""
    try:
        top = path.relative_to(models_dir).parts[0]
    except (ValueError, IndexError):
        return False
    return is_candidate_name(top)


def candidate_folders(models_dir: Path) -> list[Path]:
    """Candidate folders of ``models_dir``, sorted by name. Every symbolic link is listed too (to
    a folder, a file, nowhere, itself), so that the check refuses it with a reason: one left out
    was a voice missing without a word (a link to a disk not mounted yet)."""
    if not models_dir.is_dir():
        return []
    return sorted(
        path for path in models_dir.iterdir() if is_candidate_name(path.name) and (path.is_symlink() or path.is_dir())
    )


@dataclass(frozen=True)
class Candidate:
    folder: Path
    manifest: Manifest | None
    problem: str = ""


def scan(models_dir: Path) -> list[Candidate]:
    """Every candidate folder under ``models_dir`` with its manifest, or why it has none."""
    found = []
    for folder in candidate_folders(models_dir):
        if folder.is_symlink():  # the daemon refuses it whatever it points to (manifest.inspect_folder)
            found.append(Candidate(folder, None, "is a symlink; a model folder must be a real folder (copy it in)"))
            continue
        try:
            found.append(Candidate(folder, read_manifest(folder)))
        except TtsdError as exc:
            found.append(Candidate(folder, None, str(exc)))
    return found


def holds_voices(models_dir: Path) -> bool:
    """Whether the models dir holds anything put there as a voice: a folder with a manifest, or a
    link (refused as one, but the user's, so the dir is not empty: the built-in voice is not
    seeded beside it)."""
    return any(c.manifest is not None or c.folder.is_symlink() for c in scan(models_dir))


def find_versions(models_dir: Path, name: str, version: str | None = None) -> list[tuple[str, Path]]:
    """(version, folder) of voice ``name`` in ``models_dir``, newest first (only ``version``'s
    when given); ``UnknownVoiceError`` when there is none."""
    candidates = scan(models_dir)
    matches = [c for c in candidates if c.manifest and c.manifest.name == name]
    if version is not None:
        wanted = Version(check_version(version))
        matches = [c for c in matches if c.manifest and c.manifest.parsed_version == wanted]
    if not matches:
        known = sorted({c.manifest.name for c in candidates if c.manifest})
        hint = f" (voices there: {', '.join(known)})" if known else ""
        what = f"{name} version {version}" if version else name
        raise UnknownVoiceError(f"no voice {what} in {models_dir}{hint}")
    ordered = sorted(
        ((c.manifest.parsed_version, c.manifest.version, c.folder) for c in matches if c.manifest), reverse=True
    )
    return [(shown, folder) for _, shown, folder in ordered]
