"""ttsd's persisted serving state, under the state dir:

    STATE/state.json            per voice: active version, previous actives (rollback stack),
                                rolled-back versions, the canary in progress; per version: content
                                hash, state, reason
    STATE/history.jsonl         audit trail: time, voice, from, to, why, durations (``history.py``)
    STATE/lock                  held (``flock``) by the one daemon using this state dir; its PID

``state.json`` is written tmp + fsync + rename (``fsutil``), so after ``kill -9`` it is the old one
or the new one, never half of each.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ManifestError, StateLockedError, resource_error
from ..fsutil import atomic_write_text
from ..manifest import check_name, check_version, norm
from ..safe_read import read_small
from .history import AuditTrail
from .pacing import Guard

log = logging.getLogger("ttsd.state")


@dataclass(frozen=True)
class VoiceRecord:
    active: str | None = None
    previous: tuple[str, ...] = ()  # earlier actives, most recent last
    rolled_back: tuple[str, ...] = ()  # never auto-promoted again
    canary: str | None = None  # a canary in progress: resumed, with its users, after a restart
    rolling_to: str | None = None  # a rollback's target while it loads: a restart finishes the rollback

    def but(self, **changes: Any) -> VoiceRecord:
        """A copy with ``changes`` (lists become tuples: a record is never changed in place)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return replace(self, **fields)

    def marked(self, version: str) -> VoiceRecord:
        """A copy with ``version`` marked rolled back (once, in any spelling of it)."""
        if norm(version) in {norm(v) for v in self.rolled_back}:
            return self
        return self.but(rolled_back=(*self.rolled_back, version))

    def withdrawn(self, version: str) -> VoiceRecord:
        """A copy with ``version`` marked rolled back (once) and off the rollback targets: it
        serves again only through an operator's ``activate`` or ``rollback --to``."""
        key = norm(version)
        return self.marked(version).but(previous=[v for v in self.previous if norm(v) != key])


@dataclass(frozen=True)
class VersionRecord:
    content: str
    state: str
    reason: str = ""
    folder: str | None = None  # refused for its folder's files: its fingerprint (``ModelVersion.refused_folder``)


MAX_STATE_BYTES = 16 << 20  # state.json of a box with thousands of versions is well under 1 MB


class ServingState:
    """``state.json`` and the audit trail. Thread-safe: every method takes ``_lock`` briefly, and
    records are frozen, so a caller's copy never changes under it.

    ``state.json`` is outside input like any other file: a damaged one (wrong shape, bad names,
    not a file at all) is moved aside as ``state.json.unreadable-TIME``; the state comes from its
    copy, ``state.backup.json`` (written after each change, off the swap's path), when that is
    whole; else what can be read of the damaged one is kept, and the manager starts from the
    store. A lost ``state.json`` comes back from the copy too: the rollback marks in it are what
    keeps a version an operator rolled back from serving again. ``commit`` persists a voice's new
    record before it takes effect; ``save`` and ``record`` are retried at the next call when the
    disk is full."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "state.json"
        self.backup = root / "state.backup.json"
        self.trail = AuditTrail(root / "history.jsonl")
        self._lock = Guard(threading.RLock())
        self._voices: dict[str, VoiceRecord] = {}
        self._versions: dict[str, VersionRecord] = {}  # "name/version"
        self._written = ""  # last state.json text, so an unchanged state is not rewritten
        self._backed = ""  # last state.backup.json text

    @staticmethod
    def _read(
        path: Path, problems: list[str], newer: set[str] | None = None
    ) -> tuple[str, dict[str, VoiceRecord], dict[str, VersionRecord]] | None:
        """``path``'s text and records (what can be trusted of them, with ``problems`` said, and the
        keys it has that this ttsd does not know in ``newer``); None when there is no such file."""
        if path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append("not a regular file")
            return "", {}, {}
        if not path.exists():
            return None
        try:
            text = read_small(path, MAX_STATE_BYTES).decode("utf-8")
            data = json.loads(text)
        except (OSError, ValueError, RecursionError) as exc:
            problems.append(f"unreadable ({exc})")
            return "", {}, {}
        voices, versions = parse_state(data, problems, newer)
        return text, voices, versions

    def load(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        problems: list[str] = []
        newer: set[str] = set()
        with self._lock:
            found = self._read(self.path, problems, newer)
            if found is not None:
                text, self._voices, self._versions = found
                if not problems:
                    self._written = text
            copy_problems: list[str] = []
            copy_newer: set[str] = set()
            copy = self._read(self.backup, copy_problems, copy_newer)
            # what the copy holds now (a box upgraded from before it, or whose last copy failed to
            # be written, has none or an old one: the next save writes it, changed state or not)
            self._backed = copy[0] if copy is not None and not copy_problems else ""
            if (problems or found is None) and copy is not None and not copy_problems:
                text, self._voices, self._versions = copy
                log.warning(
                    "%s: %s; the state is taken from its copy, %s",
                    self.path,
                    "; ".join(problems[:3]) or "missing",
                    self.backup.name,
                )
                _newer_keys(copy_newer)
                if problems:
                    self._aside(problems, restored=True)
                return self.trail.load()
            _newer_keys(newer)
            if problems:
                self._aside(problems)
                if copy_problems and copy is not None:  # damaged too: kept for a human, not written over
                    self._aside(copy_problems, path=self.backup, state_was="damaged")
            elif copy_problems and found is not None:  # the copy alone is damaged: written again from state.json
                log.warning(
                    "%s: %s; it is written again from %s", self.backup, "; ".join(copy_problems[:3]), self.path.name
                )
            elif copy_problems:  # both gone: what was lost is said, and the damaged copy kept for a human
                self._aside(copy_problems, path=self.backup)
        self.trail.load()

    def _aside(
        self, problems: list[str], restored: bool = False, path: Path | None = None, state_was: str = "missing"
    ) -> None:
        """The damaged ``state.json``, or its damaged copy (``path``: when ``state.json`` is
        ``state_was`` missing or damaged too), moved aside for a human (both are written
        atomically by ttsd, so the damage came from outside), and said; the daemon starts anyway."""
        damaged = path or self.path
        aside = damaged.with_name(f"{damaged.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(damaged, aside)
        except OSError as exc:
            aside = Path(f"(could not move it aside: {exc})")
        if path is not None:
            log.error(
                "%s is %s and its copy %s is damaged (%s): the state comes from %s, and the rollback "
                "marks lost with them are not known (history.jsonl has them); the damaged copy is at %s",
                self.path,
                state_was,
                damaged.name,
                "; ".join(problems[:3]),
                "what could be trusted of it and the store" if state_was == "damaged" else "the store",
                aside,
            )
            return
        if restored:
            log.error(
                "%s was damaged (%s); the state came from its copy; the damaged file is at %s",
                self.path,
                "; ".join(problems[:3]),
                aside,
            )
            return
        log.error(
            "%s: %s; kept %d voice(s) and %d version(s) of it, the rest comes from the store; "
            "the damaged file is at %s",
            self.path,
            "; ".join(problems[:3]),
            len(self._voices),
            len(self._versions),
            aside,
        )

    # -- reading -------------------------------------------------------------------------------
    def voice(self, name: str) -> VoiceRecord:
        with self._lock:
            return self._voices.get(name, VoiceRecord())

    def voices(self) -> dict[str, VoiceRecord]:
        with self._lock:
            return dict(self._voices)

    def versions(self) -> dict[str, VersionRecord]:
        with self._lock:
            return dict(self._versions)

    # -- changing ------------------------------------------------------------------------------
    def commit(self, name: str, record: VoiceRecord) -> None:
        """Persist ``record`` as voice ``name``'s, then take it: a transition that must survive a
        restart is on disk before it happens. ``ResourceError`` (nothing changed) if it cannot be
        written."""
        with self._lock:
            text = self._text({**self._voices, name: record}, self._versions)
            try:
                atomic_write_text(self.path, text)
            except OSError as exc:
                raise resource_error(exc, f"recording the change in {self.path}") from exc
            self._voices[name] = record
            self._written = text

    def check_writable(self) -> None:
        """``ResourceError`` if ``state.json`` cannot be written now (the state dir is full): it is
        written again as it stands, so a ``commit`` right after very likely fits too (a disk that
        fills in between still refuses that one)."""
        with self._lock:
            text = self._text(self._voices, self._versions)
            try:
                atomic_write_text(self.path, text)
            except OSError as exc:
                raise resource_error(exc, f"recording the change in {self.path}") from exc
            self._written = text

    def put(self, name: str, record: VoiceRecord) -> None:
        """Take ``record`` now; it is written at the next ``save`` (changes that must not wait for
        disk space: automatic rollbacks, canary results, resuming)."""
        with self._lock:
            self._voices[name] = record

    def drop(self, name: str, keep: VoiceRecord | None = None) -> None:
        """Voice ``name``'s record goes (at the next save), or becomes ``keep``."""
        with self._lock:
            if keep is None:
                self._voices.pop(name, None)
            else:
                self._voices[name] = keep

    def set_versions(self, records: dict[str, VersionRecord]) -> None:
        """Every version's record, as the manager knows them now (written at the next ``save``)."""
        with self._lock:
            self._versions.update(records)

    def forget_versions(self, keys: Iterable[str]) -> None:
        """Versions ("name/version") that can never serve again leave the record (at the next save)."""
        with self._lock:
            for key in keys:
                self._versions.pop(key, None)

    def save(self) -> bool:
        """Write the state if it changed; False (logged, retried at the next call) if it cannot be."""
        with self._lock:
            text = self._text(self._voices, self._versions)
            if text == self._written == self._backed:  # rescanned every few seconds: spare the flash
                return True
            for path in (self.path, self.backup):  # the copy after the state: never ahead of it
                if text == (self._written if path is self.path else self._backed):
                    continue
                try:
                    atomic_write_text(path, text)
                except OSError as exc:
                    log.error(
                        "cannot write %s (%s); the change is in effect and will be written when it can",
                        path,
                        exc.strerror or exc,
                    )
                    return False
                if path is self.path:
                    self._written = text
                else:
                    self._backed = text
            return True

    def record(
        self,
        voice: str,
        from_version: str | None,
        to_version: str | None,
        why: str,
        *,
        write: bool = True,
        **details: Any,
    ) -> None:
        """Append to the audit trail (best effort: a full disk delays the write, never the change).
        ``write=False``: written at the next ``AuditTrail.flush``."""
        self.trail.record({"voice": voice, "from": from_version, "to": to_version, "why": why, **details}, write=write)

    def history(self, count: int = 20) -> list[dict[str, Any]]:
        """The newest ``count`` audit entries, oldest first (from memory: never reads the disk)."""
        return self.trail.recent(count)

    @staticmethod
    def _text(voices: dict[str, VoiceRecord], versions: dict[str, VersionRecord]) -> str:
        data = {
            "format": 1,
            "voices": {k: _voice_json(v) for k, v in sorted(voices.items())},
            "versions": {k: _version_json(v) for k, v in sorted(versions.items())},
        }
        return json.dumps(data, indent=1) + "\n"


def read_state(root: Path) -> tuple[dict[str, VoiceRecord], dict[str, VersionRecord]]:
    """The voices' and versions' records of the state in ``root``, read only (a command beside the
    daemon, or without one): ``state.json``, else its copy when it is damaged or lost; best
    effort."""
    for path in (root / "state.json", root / "state.backup.json"):
        problems: list[str] = []
        found = ServingState._read(path, problems)
        if found is not None and not problems:
            return found[1], found[2]
    return {}, {}


class StateDirLock:
    """One daemon per state dir: an exclusive ``flock`` on ``STATE/lock``, held for the process's
    life (the kernel lets go of it when the process ends, ``kill -9`` included, so there is never
    a stale lock to clean up). The file holds the holder's PID, for the message a second daemon
    prints."""

    def __init__(self, root: Path) -> None:
        self.path = root / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """``StateLockedError`` naming the holder when another process holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise ConfigError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            raise StateLockedError(
                f"another ttsd{f' (pid {holder})' if holder.isdigit() else ''} is using "
                f"the state dir {self.path.parent}; stop it or give this one its own --state"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _version_json(record: VersionRecord) -> dict[str, Any]:
    data = asdict(record)
    if record.folder is None:  # only when set: a ttsd before this one moved a state.json with it aside
        del data["folder"]
    return data


def _voice_json(record: VoiceRecord) -> dict[str, Any]:
    data: dict[str, Any] = {
        "active": record.active,
        "previous": list(record.previous),
        "rolled_back": list(record.rolled_back),
    }
    if record.canary is not None:  # only when there is one: a state.json an older ttsd can still read
        data["canary"] = record.canary
    if record.rolling_to is not None:  # only while a rollback's target loads, for the same reason
        data["rolling_to"] = record.rolling_to
    return data


_VOICE_KEYS = {"active", "previous", "rolled_back", "canary", "rolling_to"}
_VERSION_KEYS = {"content", "state", "reason", "folder"}


def parse_state(
    data: Any, problems: list[str], newer: set[str] | None = None
) -> tuple[dict[str, VoiceRecord], dict[str, VersionRecord]]:
    """What can be trusted of a decoded ``state.json``; each thing that cannot goes to ``problems``,
    and each key this ttsd does not know to ``newer`` (a newer ttsd's: left out, not damage).
    Names and versions become store paths, so they must be what a manifest allows."""
    voices: dict[str, VoiceRecord] = {}
    versions: dict[str, VersionRecord] = {}
    newer = set() if newer is None else newer
    if not isinstance(data, dict):
        problems.append(f"not a JSON object but {type(data).__name__}")
        return voices, versions
    newer.update(str(k) for k in set(data) - {"format", "voices", "versions"})
    raw_voices, raw_versions = data.get("voices", {}), data.get("versions", {})
    if not isinstance(raw_voices, dict) or not isinstance(raw_versions, dict):
        problems.append("'voices' and 'versions' must be objects")
        return voices, versions
    for name, v in raw_voices.items():
        try:
            check_name(name)
            if not isinstance(v, dict):
                raise ValueError("not a voice record")
            newer.update(f"voices.*.{k}" for k in set(v) - _VOICE_KEYS)
            active, canary, rolling_to = v.get("active"), v.get("canary"), v.get("rolling_to")
            lists = [v.get("previous", []), v.get("rolled_back", [])]
            for one in (active, canary, rolling_to):
                if one is not None:
                    check_version(one)
            for versions_list in lists:
                if not isinstance(versions_list, list):
                    raise ValueError("version lists must be lists")
                for item in versions_list:
                    check_version(item)
            voices[name] = VoiceRecord(active, tuple(lists[0]), tuple(lists[1]), canary, rolling_to)
        except (ValueError, TypeError, ManifestError) as exc:
            problems.append(f"voice {name!r}: {exc}")
    for key, v in raw_versions.items():
        try:
            name, _, version = key.partition("/")
            check_name(name)
            check_version(version)
            if not (
                isinstance(v, dict)
                and isinstance(v.get("content"), str)
                and isinstance(v.get("state"), str)
                and isinstance(v.get("reason", ""), str)
                and isinstance(v.get("folder", ""), str)
                and len(v.get("folder", "")) <= 64
            ):
                raise ValueError("not a version record")
            newer.update(f"versions.*.{k}" for k in set(v) - _VERSION_KEYS)
            versions[key] = VersionRecord(v["content"], v["state"], v.get("reason", ""), v.get("folder"))
        except (ValueError, TypeError, ManifestError) as exc:
            problems.append(f"version {key!r}: {exc}")
    return voices, versions


def _newer_keys(newer: set[str]) -> None:
    """Said once, for the file the state came from: a newer ttsd's keys (then downgraded); its
    records are kept, for what this one knows of them."""
    if newer:
        shown = sorted(repr(k[:40]) for k in newer)
        log.warning(
            "state.json has keys this ttsd does not know, left out (written by a newer ttsd?): %s",
            ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else ""),
        )
