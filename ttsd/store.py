"""ttsd's private model store and its persisted serving state, under the state dir.

    STATE/store/NAME/VERSION/   verified copies of model folders; loads come only from here, so a
                                folder cannot change between check and load, and rollback works
                                after the folder is deleted from the models dir
    STATE/state.json            per voice: active version, previous actives (rollback stack),
                                rolled-back versions; per version: content hash, state, reason
    STATE/history.jsonl         audit trail: time, voice, from, to, why, durations

Every write is tmp + fsync + rename; a copy into the store is built in a hidden temp dir and
renamed into place, so after ``kill -9`` the store holds only complete, verified copies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import VerifyError
from .fsutil import atomic_write_text, fsync_dir
from .manifest import MANIFEST, Manifest, verify

log = logging.getLogger("ttsd.store")
HISTORY_LIMIT = 2000


def content_id(manifest: Manifest) -> str:
    """What a version *is*: the hashes of its files (two folders with equal ids hold equal bytes)."""
    listing = json.dumps({p: (e.sha256, e.size) for p, e in sorted(manifest.files.items())}, sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*.partial"):  # a copy interrupted by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def get(self, name: str, version: str) -> Path | None:
        path = self.path(name, version)
        return path if (path / MANIFEST).is_file() else None

    def put(self, source: Path, manifest: Manifest) -> Path:
        """Copy ``source`` into the store and verify the copy; returns the stored folder."""
        target = self.path(manifest.name, manifest.version)
        existing = self.get(manifest.name, manifest.version)
        if existing is not None:
            try:
                if content_id(verify(existing)) == content_id(manifest):
                    return existing
            except VerifyError:
                pass
            shutil.rmtree(existing)  # damaged or different: replace (content checks happen before)
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.name}-{manifest.version}.", suffix=".partial",
                                    dir=self.root))
        try:
            for rel in [MANIFEST, *manifest.files]:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / rel, dest, follow_symlinks=False)
                with open(dest, "rb") as handle:
                    os.fsync(handle.fileno())
            copied = verify(tmp)  # the bytes we will load are the bytes we checked
            if content_id(copied) != content_id(manifest):
                raise VerifyError(f"{source}: changed while being copied into the store")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, target)
            fsync_dir(target.parent)
            return target
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@dataclass
class VoiceRecord:
    active: str | None = None
    previous: list[str] = field(default_factory=list)  # earlier actives, most recent last
    rolled_back: list[str] = field(default_factory=list)  # never auto-promoted again


@dataclass
class VersionRecord:
    content: str
    state: str
    reason: str = ""


class ServingState:
    """``state.json`` and ``history.jsonl``. Called from the manager's loader thread only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "state.json"
        self.history_path = root / "history.jsonl"
        self.voices: dict[str, VoiceRecord] = {}
        self.versions: dict[str, VersionRecord] = {}  # "name/version"
        self._history: list[str] = []
        self._written = ""  # last state.json text, so an unchanged state is not rewritten

    def load(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            try:
                text = self.path.read_text(encoding="utf-8")
                data = json.loads(text)
                self.voices = {k: VoiceRecord(**v) for k, v in data.get("voices", {}).items()}
                self.versions = {k: VersionRecord(**v) for k, v in data.get("versions", {}).items()}
                self._written = text
            except (ValueError, TypeError) as exc:
                # Written atomically, so this is outside damage: start fresh rather than not at all.
                log.error("%s is unreadable (%s); starting with no saved state", self.path, exc)
        if self.history_path.is_file():
            lines = self.history_path.read_text(encoding="utf-8", errors="replace").splitlines()
            self._history = [line for line in lines if line.strip()][-HISTORY_LIMIT:]

    def voice(self, name: str) -> VoiceRecord:
        return self.voices.setdefault(name, VoiceRecord())

    def save(self) -> None:
        data = {"format": 1, "voices": {k: asdict(v) for k, v in sorted(self.voices.items())},
                "versions": {k: asdict(v) for k, v in sorted(self.versions.items())}}
        text = json.dumps(data, indent=1) + "\n"
        if text != self._written:  # the models dir is rescanned every few seconds: spare the flash
            atomic_write_text(self.path, text)
            self._written = text

    def record(self, voice: str, from_version: str | None, to_version: str | None, why: str,
               **details: Any) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "voice": voice, "from": from_version,
                 "to": to_version, "why": why, **details}
        self._history = [*self._history, json.dumps(entry)][-HISTORY_LIMIT:]
        atomic_write_text(self.history_path, "\n".join(self._history) + "\n")

    def history(self) -> list[dict[str, Any]]:
        result = []
        for line in self._history:
            try:
                result.append(json.loads(line))
            except ValueError:
                continue
        return result
