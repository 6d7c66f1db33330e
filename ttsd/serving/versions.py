"""Versions as the manager sees them: their states, their records, the policy, and version order.

Every version of every voice has one explicit ``State`` (TF Serving's ``kNew → kLoading → kReady
→ kQuiescing → kDisabled``, or ``kError``, in ttsd's words below). Plain data: records change only
under the version table's lock (``table.py``); nothing here loads or serves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from ..engines import Engine
from ..manifest import Manifest, norm

Key = tuple[str, str]  # (voice, normalised version)


class State(str, Enum):
    INCOMPLETE = "incomplete"
    VERIFYING = "verifying"
    LOADING = "loading"
    WARMING = "warming"
    CANARY = "canary"  # loaded, serving a share of requests before promotion
    ACTIVE = "active"
    STANDBY = "standby"  # loaded, kept as a rollback target
    AVAILABLE = "available"  # known (stored, or a folder in the models dir), not loaded
    RETIRED = "retired"  # replaced; unloaded when its last request ends
    REFUSED = "refused"  # its content cannot serve (fails verification, loading or warm-up)
    DEFERRED = "deferred"  # could not come up for the box's reasons (disk full, damaged copy): retried
    ROLLED_BACK = "rolled-back"


COMING_UP = (State.VERIFYING, State.LOADING, State.WARMING)


@dataclass(frozen=True)
class Policy:
    keep: int = 1  # previous versions kept loaded for instant rollback
    swap: str = "availability"  # or "memory": unload the old version before loading the new one
    settle: float = 1.0  # start-up waits up to ~3x this for folders still being copied in
    auto_rollback_requests: int = 20  # watch this many first requests of a new version (0 = off)
    auto_rollback_share: float = 0.25  # roll back when more than this share of them fail
    canary: dict[str, float] = field(default_factory=dict)  # voice (or "*") -> share of requests
    canary_requests: int = 20  # clean canary requests before full promotion

    def canary_share(self, name: str) -> float:
        return self.canary.get(name, self.canary.get("*", 0.0))


# ``ModelVersion.requests`` of an active version that is not on trial. Only a new version made
# active by an upgrade's swap or a canary's promotion is judged by its first requests (the
# auto-rollback). One a restart resumes, a fall-back or a rollback goes to, or an operator
# activates served before or was chosen: judged again, weeks of serving were undone by a few
# failures after a reboot, and an operator's choice by the daemon.
NOT_ON_TRIAL = sys.maxsize


@dataclass
class ModelVersion:
    """The manager's record of one version (mutable; changed only under the table's lock)."""

    name: str
    version: str
    state: State
    content: str = ""
    reason: str = ""
    folder: Path | None = None  # its folder in the models dir, while there is one
    store_copy: Path | None = None  # its copy in the store (``ModelStore``)
    manifest: Manifest | None = None
    engine: Engine[Any] | None = None
    requests: int = 0  # since it became active or canary (the auto-rollback and canary window)
    failures: int = 0
    served_since_load: int = 0  # requests it served, and failed through its own fault, since it was loaded
    model_failures: int = 0
    load_seconds: float = 0.0
    rss: int = 0  # RSS bytes its last load added (measured around the load; 0: never loaded here)
    retry_at: float = 0.0  # DEFERRED: monotonic time of the next try
    short_of_memory: int = 0  # loads in a row that ran out of memory (``Lifecycle.defer``)
    backoff: float = 0.0
    fresh: bool = False  # found in the store but not in the saved state: not judged yet
    signer: str = ""  # who signed it, once verified against a trusted key (``ttsd.signing``)
    # refused for its signature: the digest of the folder's model.sig then ("" for none), so a
    # folder signed again is judged again; None when not refused for its signature
    refused_signature: str | None = None
    signature_failure: str = ""  # its kind (SignatureError.kind), for the metric
    # refused for its folder (a file that fails its checksum, missing or unlisted files, a copy
    # that never completed), not for its content: the folder's ``source.fingerprint`` then, so it
    # is judged again once the folder changed, before or after a restart ("" : at the next look);
    # None when not refused for its folder (``Intake.take``)
    refused_folder: str | None = None
    seen: str = ""  # its folder's fingerprint when the source last handed it over (what a refusal marks)

    @property
    def key(self) -> Key:
        return (self.name, norm(self.version))

    def describe(self, in_flight: int) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state.value,
            "reason": self.reason or None,
            "in_flight": in_flight,
            "source": str(self.folder) if self.folder else None,
            "content": self.content or None,
            "load_seconds": round(self.load_seconds, 2) or None,
            "rss_bytes": self.rss or None,
            "served": self.served_since_load,
            "model_failures": self.model_failures,
            "signer": self.signer or None,
        }


def order(model: ModelVersion) -> Version:
    """Sort key: newest last."""
    return parsed(model.version)


def parsed(version: str) -> Version:
    """``version`` as PEP 440 orders it (an unparsable one sorts first)."""
    try:
        return Version(version)
    except (InvalidVersion, ValueError):
        return Version("0")


Listener = Callable[[str, ModelVersion], None]

__all__ = ["COMING_UP", "Key", "Listener", "ModelVersion", "Policy", "State", "norm", "order", "parsed"]
