"""What a front end (HTTP, spool, Wyoming) may ask of the daemon, as callbacks the daemon wires up.

Front ends import this, not the manager: they can lease a model and submit a job, nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import BusyError, ColdVoiceError
from ..metrics import Metrics
from ..serving.serving_map import Lease
from .synth import Job, Result


class Acquire(Protocol):
    """``ServingMap.acquire``: a lease on a voice's version (pinned, else active or canary; a
    ``user`` key keeps one user on one version during a canary)."""

    def __call__(self, voice: str | None = None, version: str | None = None, *, user: str | None = None) -> Lease: ...


@dataclass(frozen=True)
class Backend:
    acquire: Acquire
    submit: Callable[[Job], Future[Result]]
    voices: Callable[[], list[dict[str, Any]]]
    ready: Callable[[], bool]
    status: Callable[[], dict[str, Any]]
    metrics: Metrics
    max_chars: int
    rollback: Callable[[str, str | None, str | None], Awaitable[dict[str, Any]]]  # voice, to, reason
    activate: Callable[[str, str], Awaitable[dict[str, Any]]]
    token: str | None = None  # required on TCP connections when set
    # the load of a voice the memory budget unloaded: started or joined, the voice kept while held
    wanting: Callable[[str], AbstractContextManager[Future[None]]] | None = None
    load_wait: float = 30.0  # seconds a request waits for that load
    # a version a fleet mirror withdrew: voice, version, to (if it is active), reason
    withdraw: Callable[[str, str, str | None, str], Awaitable[dict[str, Any]]] | None = None
    # ``ttsd models remove``: voice, reason
    remove: Callable[[str, str], Awaitable[dict[str, Any]]] | None = None
    max_audio_seconds: float | None = None  # of one request: a Wyoming text stream's sentences in all
    capacity: int | None = None  # requests the pool takes at once (workers + queue): a Wyoming address gets half
    # the outcome of a request that held no lease to its end (voice, version, ok): a text stream
    judge: Callable[[str, str, bool], None] | None = None
    # set just before a stop's grace runs out: a whole-file request still being spoken answers 503
    out_of_time: asyncio.Event | None = None

    async def lease(self, voice: str | None, version: str | None, *, user: str | None = None) -> Lease:
        """``acquire`` on the event loop, waiting when the voice must be loaded first (one shared
        load on a loader thread, never on the loop). The wait is bounded by ``load_wait``: then
        ``BusyError`` (503 + Retry-After), the system's fault; a voice that fails to load gives
        the load's own error (``LoadError``: the model's fault)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            try:
                return self.acquire(voice, version, user=user)
            except ColdVoiceError as cold:
                if self.wanting is None:
                    raise
                deadline = loop.time() + self.load_wait if deadline is None else deadline
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BusyError(f"voice {cold.voice} is still loading; retry shortly", retry_after=2) from None
                with self.wanting(cold.voice) as loaded:
                    waited = asyncio.wrap_future(loaded)
                    waited.add_done_callback(_retrieved)  # a request that stopped waiting must not log it
                    try:
                        await asyncio.wait_for(asyncio.shield(waited), remaining)
                    except TimeoutError:
                        raise BusyError(f"voice {cold.voice} is still loading; retry shortly", retry_after=2) from None
                    try:
                        return self.acquire(voice, version, user=user)  # while held: it cannot be unloaded first
                    except ColdVoiceError:
                        continue  # a newer version became active, parked: load that one


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
