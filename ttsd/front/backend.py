"""What a front end (HTTP, spool) may ask of the daemon, as callbacks the daemon wires up.

Front ends import this, not the manager: they can lease a model and submit a job, nothing more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from ..metrics import Metrics
from ..serving.serving_map import Lease
from .synth import Job, Result


class Acquire(Protocol):
    """``ServingMap.acquire``: a lease on a voice's version (pinned, else active or canary; a
    ``user`` key keeps one user on one version during a canary)."""

    def __call__(self, voice: str | None = None, version: str | None = None, *,
                 user: str | None = None) -> Lease: ...


@dataclass(frozen=True)
class Backend:
    acquire: Acquire
    submit: Callable[[Job], Future[Result]]
    voices: Callable[[], list[dict[str, Any]]]
    ready: Callable[[], bool]
    status: Callable[[], dict[str, Any]]
    metrics: Metrics
    max_chars: int
    rollback: Callable[[str, str | None], Awaitable[dict[str, Any]]]
    activate: Callable[[str, str], Awaitable[dict[str, Any]]]
    token: str | None = None  # required on TCP connections when set
