"""A version the fleet mirror withdrew leaves the box within one ``ttsd models get --upgrade``.

The daemon is told first, through its socket: if it serves the withdrawn version, it rolls back to
the newest version this box may serve (``to``), and marks the withdrawn one rolled back, on disk,
with "withdrawn by the fleet mirror" in its audit trail, so it is never promoted again by itself,
across restarts too. Then the withdrawn folders leave the models dir. A voice is never left with
nothing to serve: when the box has no other version, it keeps the withdrawn one, and ``get`` says
why (``ConflictError``, exit 13, every timer run until the mirror offers another).

With no daemon answering, the folders still go; a daemon started later from a state dir that
still serves the version from its store copy is rolled back by the next ``get`` (it asks the
daemon what it serves, not only the models dir).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConflictError
from ..manifest import norm
from ..models_dir import scan
from .fleet_index import FleetVoice

REASON = "withdrawn by the fleet mirror"
KNOWN_WAIT = 120.0  # how long the daemon may take to see a version just put into the models dir


def _serving(client: Any, name: str) -> tuple[str | None, set[str]]:
    """The version the daemon serves for ``name`` (None: none) and the versions it knows."""
    voice = next((v for v in client.status().get("voices", []) if v.get("name") == name), None)
    if voice is None:
        return None, set()
    return voice.get("active"), {norm(str(v.get("version"))) for v in voice.get("versions", [])}


def apply(fleet: FleetVoice, models: Path, to: str | None, client: Any | None, step: Any) -> list[str]:
    """Take ``fleet``'s withdrawn versions off this box (see the module docstring); ``to`` is the
    version to go back to (None: the box has none). Returns what was done, one line each."""
    done: list[str] = []
    folders = [
        c.folder
        for c in scan(models)
        if c.manifest is not None and c.manifest.name == fleet.name and fleet.is_withdrawn(c.manifest.version)
    ]
    active = None
    if client is not None:
        active, known = _serving(client, fleet.name)
        if active is not None and fleet.is_withdrawn(active):
            if to is None:
                raise ConflictError(
                    f"{fleet.name} {active} is withdrawn by the fleet mirror ({fleet.withdrawn[norm(active)]}), "
                    "but this box has no other version of it: it keeps serving it"
                )
            deadline = time.monotonic() + KNOWN_WAIT
            while norm(to) not in known:  # a version just fetched: the daemon checks it first
                if time.monotonic() > deadline:
                    raise ConflictError(f"the daemon did not take up {fleet.name} {to} within {KNOWN_WAIT:.0f} s")
                time.sleep(0.5)
                _, known = _serving(client, fleet.name)
            step(f"the daemon serves {fleet.name} {active}, withdrawn: rolling back to {to}")
            result = client.control(fleet.name, "rollback", {"to": to, "reason": REASON})
            done.append(f"{fleet.name}: {result['from']} -> {result['to']} ({REASON})")
    if to is None and folders and (client is None or active is None):
        raise ConflictError(
            f"{fleet.name} {', '.join(sorted(f.name for f in folders))} is withdrawn by the fleet mirror, "
            "but this box has no other version of it: it keeps it"
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
