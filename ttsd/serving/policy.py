"""The manager's decisions as pure functions: given records (read under the table's lock by the
caller), what should happen. Nothing here locks, loads, writes or logs.

TF Serving keeps its ``AspiredVersionPolicy`` the same way: a function of a snapshot, so each rule
can be tested on plain data and the manager only carries the decisions out.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from packaging.version import Version

from .versions import ModelVersion, Policy, State, norm, order, parsed


class Outcome(Enum):
    """What one request's outcome means for the version that served it."""

    NONE = "none"
    PROMOTE = "promote"  # a canary passed its requests
    END_CANARY = "end-canary"  # a canary failed one
    ROLLBACK = "rollback"  # a new active version fails too often


def judge(state: State, requests: int, failures: int, ok: bool, policy: Policy) -> tuple[Outcome, int, int]:
    """Count one request's outcome against a version in ``state`` whose window so far is
    ``requests``/``failures``: the outcome and the window's new counts."""
    if state is State.CANARY:
        requests += 1
        if not ok:
            return Outcome.END_CANARY, requests, failures + 1
        return (Outcome.PROMOTE if requests == policy.canary_requests else Outcome.NONE), requests, failures
    window = policy.auto_rollback_requests
    if state is State.ACTIVE and window and requests < window:
        requests, failures = requests + 1, failures + (not ok)
        if failures > policy.auto_rollback_share * window:
            return Outcome.ROLLBACK, window, failures  # the window is full: it fires once
        return Outcome.NONE, requests, failures
    return Outcome.NONE, requests, failures


def newer(candidates: Iterable[ModelVersion], active: ModelVersion | None) -> list[ModelVersion]:
    """Candidates newer than the active version (all of them when there is none), newest first:
    the order to try them in."""
    floor = parsed(active.version) if active is not None else None
    return sorted((m for m in candidates if floor is None or order(m) > floor), key=order, reverse=True)


def fallback_order(versions: Iterable[ModelVersion], rolled_back: Iterable[str], now: float) -> list[ModelVersion]:
    """What a voice with no active version may serve, newest first: versions that are stored or
    have a folder, never refused, rolled back or incomplete, and deferred ones only when due."""
    marked = {norm(v) for v in rolled_back}
    return sorted(
        (
            m
            for m in versions
            if m.state not in (State.REFUSED, State.ROLLED_BACK, State.INCOMPLETE)
            and norm(m.version) not in marked
            and (m.store_copy is not None or m.folder is not None)
            and (m.state is not State.DEFERRED or m.retry_at <= now)
        ),
        key=order,
        reverse=True,
    )


MEMORY_TRIES = 3  # loads in a row that ran out of memory before a version waits for SIGHUP


def retry_due(versions: Iterable[ModelVersion], active: ModelVersion | None, now: float) -> ModelVersion | None:
    """The newest deferred version whose back-off is over, if it is newer than the active one.
    Beside an active version, not one whose load ran out of memory ``MEMORY_TRIES`` times in a
    row (``Lifecycle.defer``): SIGHUP gives it its tries again (``ModelManager.retry_now``)."""
    floor = parsed(active.version) if active is not None else Version("0")
    due = [
        m
        for m in versions
        if m.state is State.DEFERRED
        and m.retry_at <= now
        and m.folder is not None
        and (active is None or (order(m) > floor and m.short_of_memory < MEMORY_TRIES))
    ]
    return max(due, key=order) if due else None


def beyond_keep(standby: Iterable[ModelVersion], keep: int) -> list[ModelVersion]:
    """Rollback targets over ``keep``: the oldest go."""
    return sorted(standby, key=order, reverse=True)[keep:]


def backoff(previous: float) -> float:
    """The next wait before retrying a deferred version: 10 s, doubling up to five minutes."""
    return min(300.0, previous * 2 if previous else 10.0)
