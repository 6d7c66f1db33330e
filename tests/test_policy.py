"""The manager's rules as pure functions (``ttsd.serving.policy``), on plain records and explicit
clocks: what a request's outcome means for its version, which version to try, when to retry."""

from __future__ import annotations

from pathlib import Path

from ttsd.serving.policy import Outcome, backoff, beyond_keep, fallback_order, judge, newer, retry_due
from ttsd.serving.versions import ModelVersion, Policy, State


def v(version: str, state: State = State.AVAILABLE, *, stored: bool = True, retry_at: float = 0.0) -> ModelVersion:
    return ModelVersion("voice", version, state, store_copy=Path("/store") if stored else None, retry_at=retry_at)


def test_a_canary_is_promoted_after_its_requests_and_ended_by_one_failure() -> None:
    policy = Policy(canary_requests=3)
    counts = (0, 0)
    outcomes = []
    for _ in range(3):
        outcome, *counts = judge(State.CANARY, *counts, True, policy)
        outcomes.append(outcome)
    assert outcomes == [Outcome.NONE, Outcome.NONE, Outcome.PROMOTE]
    assert judge(State.CANARY, 1, 0, False, policy) == (Outcome.END_CANARY, 2, 1)


def test_a_new_active_version_is_rolled_back_once_when_too_many_of_its_first_requests_fail() -> None:
    """Window 8, share 0.25: the third failure (3 > 2) rolls back, once; after the window nothing counts."""
    policy = Policy(auto_rollback_requests=8, auto_rollback_share=0.25)
    requests = failures = 0
    seen = []
    for ok in (True, False, False, True, False, False):
        outcome, requests, failures = judge(State.ACTIVE, requests, failures, ok, policy)
        seen.append(outcome)
    assert seen == [Outcome.NONE] * 4 + [Outcome.ROLLBACK, Outcome.NONE]
    assert requests == 8  # the window is full: it fired once
    assert judge(State.STANDBY, 0, 0, False, policy) == (Outcome.NONE, 0, 0)
    assert judge(State.ACTIVE, 0, 0, False, Policy(auto_rollback_requests=0))[0] is Outcome.NONE


def test_newer_versions_newest_first() -> None:
    found = [v("1.5"), v("2"), v("10"), v("1")]
    assert [m.version for m in newer(found, v("1.5"))] == ["10", "2"]
    assert [m.version for m in newer(found, None)] == ["10", "2", "1.5", "1"]


def test_fall_back_takes_what_can_serve_newest_first_and_deferred_ones_only_when_due() -> None:
    versions = [v("1"), v("2", State.REFUSED), v("3", State.ROLLED_BACK), v("4"), v("5", stored=False),
                v("6", State.DEFERRED, retry_at=100.0), v("7", State.INCOMPLETE), v("8")]
    versions[4].folder = None
    now = 50.0
    assert [m.version for m in fallback_order(versions, rolled_back=["8.0"], now=now)] == ["4", "1"]
    assert [m.version for m in fallback_order(versions, rolled_back=[], now=150.0)] == ["8", "6", "4", "1"]


def test_a_deferred_version_is_retried_when_due_and_newer_than_the_active_one() -> None:
    deferred = [v("2", State.DEFERRED, retry_at=10.0), v("3", State.DEFERRED, retry_at=20.0)]
    for m in deferred:
        m.folder = Path(f"/models/voice-{m.version}")
    assert retry_due(deferred, v("1", State.ACTIVE), now=5.0) is None
    assert retry_due(deferred, v("1", State.ACTIVE), now=15.0).version == "2"  # type: ignore[union-attr]
    assert retry_due(deferred, v("1", State.ACTIVE), now=25.0).version == "3"  # type: ignore[union-attr]
    assert retry_due(deferred, v("3", State.ACTIVE), now=25.0) is None
    # one whose load ran out of memory three times in a row: not beside a serving version; for a
    # voice with nothing to serve it is, as it has no service to lose
    deferred[1].short_of_memory = 3
    assert retry_due(deferred, v("1", State.ACTIVE), now=25.0).version == "2"  # type: ignore[union-attr]
    assert retry_due(deferred, None, now=25.0).version == "3"  # type: ignore[union-attr]


def test_back_off_doubles_to_five_minutes_and_keep_drops_the_oldest() -> None:
    waits, wait = [], 0.0
    for _ in range(7):
        wait = backoff(wait)
        waits.append(wait)
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert [m.version for m in beyond_keep([v("1"), v("3"), v("2")], keep=1)] == ["2", "1"]
