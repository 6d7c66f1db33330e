"""A version the fleet mirror withdrew leaves the box within one ``ttsd models get --upgrade``.

The daemon is told first, through its socket (``POST /v1/voices/NAME/withdraw``), of every
withdrawn version it knows that is not rolled back yet, whatever it is doing with it: the active
one is rolled back to the newest version this box may serve (``to``), a canary is ended, a load
for an upgrade is called off, a standby leaves the rollback targets. Each is marked rolled back on
disk, with the mirror's reason in the audit trail, so it is never served again by itself, across
restarts too (only ``ttsd activate`` serves it). Then the withdrawn folders leave the models dir.
A voice is never left with nothing to serve: when the box has no other version, it keeps the
withdrawn one, and ``get`` says why (``ConflictError``, exit 13, every timer run until the mirror
offers another).

With no daemon answering, the folders still go, and ``get`` says so; a daemon started later that
still serves the version from its store is rolled back by the next ``get`` that reaches it (it
asks the daemon what it knows, not only the models dir).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConflictError, DaemonError
from ..manifest import norm
from ..models_dir import scan
from .fleet_index import FleetVoice

REASON = "withdrawn by the fleet mirror"
KNOWN_WAIT = 120.0  # how long the daemon may take to see a version just put into the models dir
_GONE = ("rolled-back", "refused")  # states in which a version never serves by itself


def reason(fleet: FleetVoice, version: str) -> str:
    """What the box's audit trail says: the mirror's reason when the operator gave one."""
    given = fleet.withdrawn.get(norm(version), "")
    return REASON if given in ("", "withdrawn", REASON) else f"{REASON}: {given}"


@dataclass(frozen=True)
class _Seen:
    """What the daemon says of one voice."""

    active: str | None
    states: dict[str, str]  # normalised version -> state


def _seen(client: Any, name: str) -> _Seen:
    """The daemon's view of ``name``, its answer checked (a daemon is a program too: an answer of
    the wrong shape is a ``DaemonError``, never a traceback)."""
    status = client.status()
    voices = status.get("voices") if isinstance(status, dict) else None
    if not isinstance(voices, list):
        raise DaemonError("the daemon's status has no list of voices")
    voice = next((v for v in voices if isinstance(v, dict) and v.get("name") == name), None)
    if voice is None:
        return _Seen(None, {})
    active, versions = voice.get("active"), voice.get("versions")
    if (active is not None and not isinstance(active, str)) or not isinstance(versions, list):
        raise DaemonError(f"the daemon's status of {name} is not what ttsd serves")
    states = {
        norm(v["version"]): str(v.get("state"))
        for v in versions
        if isinstance(v, dict) and isinstance(v.get("version"), str)
    }
    return _Seen(active, states)


def _fallback(to: str | None, seen: _Seen, fleet: FleetVoice) -> str | None:
    """``to``, unless the daemon rolled it back or refused it: then the newest version the daemon
    knows that may serve (not withdrawn, not rolled back, not refused), if any."""
    if to is not None and seen.states.get(norm(to)) not in _GONE:
        return to
    from packaging.version import InvalidVersion, Version

    def newest_first(v: str) -> Version:
        try:
            return Version(v)
        except InvalidVersion:
            return Version("0")

    usable = [v for v, state in seen.states.items() if state not in _GONE and not fleet.is_withdrawn(v)]
    return max(usable, key=newest_first, default=None)


def apply(fleet: FleetVoice, models: Path, to: str | None, client: Any | None, step: Any) -> list[str]:
    """Take ``fleet``'s withdrawn versions off this box (see the module docstring); ``to`` is the
    version to go back to (None: the box has none). Returns what was done, one line each."""
    done: list[str] = []
    found = [
        (c.folder, c.manifest.version)
        for c in scan(models)
        if c.manifest is not None and c.manifest.name == fleet.name and fleet.is_withdrawn(c.manifest.version)
    ]
    folders = [folder for folder, _ in found]
    seen = None
    if client is not None:
        seen = _seen(client, fleet.name)
        pending = sorted(v for v, state in seen.states.items() if fleet.is_withdrawn(v) and state not in _GONE)
        active = seen.active
        if active is not None and fleet.is_withdrawn(active) and norm(active) not in pending:
            pending.append(norm(active))
        for version in pending:
            target = None
            if active is not None and norm(active) == version:
                target = _fallback(to, seen, fleet)
                if target is None:
                    raise ConflictError(
                        f"{fleet.name} {active} is {reason(fleet, active)}, but this box has no other "
                        "version of it to serve: it keeps serving it"
                    )
                deadline = time.monotonic() + KNOWN_WAIT
                while norm(target) not in seen.states:  # a version just fetched: the daemon checks it first
                    if time.monotonic() > deadline:
                        raise ConflictError(
                            f"the daemon did not take up {fleet.name} {target} within {KNOWN_WAIT:.0f} s"
                        )
                    time.sleep(0.5)
                    seen = _seen(client, fleet.name)
                step(f"the daemon serves {fleet.name} {active}, withdrawn: going back to {target}")
            result = client.control(
                fleet.name, "withdraw", {"version": version, "to": target, "reason": reason(fleet, version)}
            )
            now = result.get("active") if isinstance(result, dict) else None
            done.append(f"{fleet.name}: {version} withdrawn on the daemon (serving {now})")
    if folders and to is None and (seen is None or seen.active is None or fleet.is_withdrawn(seen.active)):
        raise ConflictError(
            f"{fleet.name} {', '.join(sorted(f.name for f in folders))} is {reason(fleet, found[0][1])}, "
            "but this box has no other version of it: it keeps it"
        )
    if folders and client is None:
        done.append(
            "no daemon answered on its socket (--socket, TTSD_SOCKET): one that serves a withdrawn "
            "version from its store is rolled back by the next get that reaches it"
        )
    for folder in folders:
        aside = folder.with_name(f".{folder.name}.withdrawn-{int(time.time())}")
        try:
            folder.rename(aside)  # out of the daemon's sight at once, then removed
        except OSError as exc:
            raise ConfigError(f"cannot remove the withdrawn {folder}: {exc.strerror or exc}") from exc
        shutil.rmtree(aside, ignore_errors=True)
        step(f"removed {folder.name} ({REASON})")
        done.append(f"removed {folder.name}")
    return done
