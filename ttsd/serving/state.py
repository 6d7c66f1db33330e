"""ttsd's persisted serving state, under the state dir:

    STATE/state.json            per voice: active version, previous actives (rollback stack),
                                rolled-back versions; per version: content hash, state, reason
    STATE/history.jsonl         audit trail: time, voice, from, to, why, durations

Every write is tmp + fsync + rename (``fsutil``), so after ``kill -9`` either file is the old one
or the new one, never half of each.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ManifestError, resource_error
from ..fsutil import atomic_write_text
from ..manifest import check_name, check_version

log = logging.getLogger("ttsd.state")
HISTORY_LIMIT = 2000


@dataclass
class VoiceRecord:
    active: str | None = None
    previous: list[str] = field(default_factory=list)  # earlier actives, most recent last
    rolled_back: list[str] = field(default_factory=list)  # never auto-promoted again

    def copy(self) -> VoiceRecord:
        return VoiceRecord(self.active, list(self.previous), list(self.rolled_back))


@dataclass
class VersionRecord:
    content: str
    state: str
    reason: str = ""


class ServingState:
    """``state.json`` and ``history.jsonl``. Called from the manager's loader thread only.

    ``state.json`` is outside input like any other file: a damaged one (wrong shape, bad names,
    not a file at all) is moved aside as ``state.json.unreadable-TIME``, what can be read of it is
    kept, and the manager starts from the store. ``commit`` persists a voice's new record before
    it takes effect; ``save`` and ``record`` are retried at the next call when the disk is full."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "state.json"
        self.history_path = root / "history.jsonl"
        self.voices: dict[str, VoiceRecord] = {}
        self.versions: dict[str, VersionRecord] = {}  # "name/version"
        self._history: list[str] = []
        self._written = ""  # last state.json text, so an unchanged state is not rewritten
        self._history_written = True

    def load(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        problems: list[str] = []
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            problems.append("not a regular file")
        elif self.path.exists():
            try:
                text = self.path.read_text(encoding="utf-8")
                data = json.loads(text)
            except (OSError, ValueError, RecursionError) as exc:
                problems.append(f"unreadable ({exc})")
            else:
                self.voices, self.versions = _parse_state(data, problems)
                if not problems:
                    self._written = text
        if problems:
            # Written atomically by us, so this is outside damage: keep it for a human, start anyway.
            aside = self.path.with_name(f"state.json.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                os.replace(self.path, aside)
            except OSError as exc:
                aside = Path(f"(could not move it aside: {exc})")
            log.error("%s: %s; kept %d voice(s) and %d version(s) of it, the rest comes from the store; "
                      "the damaged file is at %s", self.path, "; ".join(problems[:3]), len(self.voices),
                      len(self.versions), aside)
        if self.history_path.is_file() and not self.history_path.is_symlink():
            try:
                lines = self.history_path.read_text(encoding="utf-8", errors="replace").splitlines()
                self._history = [line for line in lines if line.strip()][-HISTORY_LIMIT:]
            except OSError as exc:
                log.error("%s is unreadable (%s); starting a new audit trail", self.history_path, exc)

    def voice(self, name: str) -> VoiceRecord:
        return self.voices.setdefault(name, VoiceRecord())

    def _text(self, voices: dict[str, VoiceRecord]) -> str:
        data = {"format": 1, "voices": {k: asdict(v) for k, v in sorted(voices.items())},
                "versions": {k: asdict(v) for k, v in sorted(self.versions.items())}}
        return json.dumps(data, indent=1) + "\n"

    def commit(self, name: str, record: VoiceRecord) -> None:
        """Persist ``record`` as voice ``name``'s, then take it: a transition that must survive a
        restart is on disk before it happens. ``ResourceError`` (nothing changed) if it cannot be
        written."""
        text = self._text({**self.voices, name: record})
        try:
            atomic_write_text(self.path, text)
        except OSError as exc:
            raise resource_error(exc, f"recording the change in {self.path}") from exc
        self.voices[name] = record
        self._written = text

    def save(self) -> bool:
        """Write the state if it changed; False (logged, retried at the next call) if it cannot be."""
        text = self._text(self.voices)
        if text == self._written:  # the models dir is rescanned every few seconds: spare the flash
            return True
        try:
            atomic_write_text(self.path, text)
        except OSError as exc:
            log.error("cannot write %s (%s); the change is in effect and will be written when it can",
                      self.path, exc.strerror or exc)
            return False
        self._written = text
        return True

    def record(self, voice: str, from_version: str | None, to_version: str | None, why: str,
               **details: Any) -> None:
        """Append to the audit trail (best effort: a full disk delays the write, never the change)."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "voice": voice, "from": from_version,
                 "to": to_version, "why": why, **details}
        self._history = [*self._history, json.dumps(entry)][-HISTORY_LIMIT:]
        self._flush_history()

    def _flush_history(self) -> None:
        try:
            atomic_write_text(self.history_path, "\n".join(self._history) + "\n")
            self._history_written = True
        except OSError as exc:
            if self._history_written:
                log.error("cannot write %s (%s); the audit trail is kept in memory until it can",
                          self.history_path, exc.strerror or exc)
            self._history_written = False

    def history(self) -> list[dict[str, Any]]:
        result = []
        for line in self._history:
            try:
                result.append(json.loads(line))
            except ValueError:
                continue
        return result


def _parse_state(data: Any, problems: list[str]) -> tuple[dict[str, VoiceRecord], dict[str, VersionRecord]]:
    """What can be trusted of a decoded ``state.json``; each thing that cannot goes to ``problems``.
    Names and versions become store paths, so they must be what a manifest allows."""
    voices: dict[str, VoiceRecord] = {}
    versions: dict[str, VersionRecord] = {}
    if not isinstance(data, dict):
        problems.append(f"not a JSON object but {type(data).__name__}")
        return voices, versions
    raw_voices, raw_versions = data.get("voices", {}), data.get("versions", {})
    if not isinstance(raw_voices, dict) or not isinstance(raw_versions, dict):
        problems.append("'voices' and 'versions' must be objects")
        return voices, versions
    for name, v in raw_voices.items():
        try:
            check_name(name)
            if not isinstance(v, dict) or set(v) - {"active", "previous", "rolled_back"}:
                raise ValueError("not a voice record")
            active = v.get("active")
            lists = [v.get("previous", []), v.get("rolled_back", [])]
            if active is not None:
                check_version(active)
            for versions_list in lists:
                if not isinstance(versions_list, list):
                    raise ValueError("version lists must be lists")
                for item in versions_list:
                    check_version(item)
            voices[name] = VoiceRecord(active, *lists)
        except (ValueError, TypeError, ManifestError) as exc:
            problems.append(f"voice {name!r}: {exc}")
    for key, v in raw_versions.items():
        try:
            name, _, version = key.partition("/")
            check_name(name)
            check_version(version)
            if not (isinstance(v, dict) and isinstance(v.get("content"), str) and isinstance(v.get("state"), str)
                    and isinstance(v.get("reason", ""), str)) or set(v) - {"content", "state", "reason"}:
                raise ValueError("not a version record")
            versions[key] = VersionRecord(v["content"], v["state"], v.get("reason", ""))
        except (ValueError, TypeError, ManifestError) as exc:
            problems.append(f"version {key!r}: {exc}")
    return voices, versions
