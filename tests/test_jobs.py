"""``ttsd.serving.jobs``: one job per voice at a time; a superseding job calls off a background one
instead of waiting for it; urgent jobs never wait behind another voice's background work."""

from __future__ import annotations

import threading
import time

import pytest

from ttsd.serving.jobs import Jobs
from ttsd.serving.pacing import Superseded, Ticket


def _busy_until(stop: threading.Event, log: list[str], name: str) -> object:
    def work(ticket: Ticket) -> str:
        log.append(f"{name} started")
        while not stop.is_set():
            sum(range(100))  # Python calls: where a called-off job stops
        log.append(f"{name} ended")
        return name

    return work


def test_one_job_per_voice_in_order() -> None:
    """1. A background job of voice a runs. 2. A second job of a, not superseding, waits for it.
    3. When the first ends, the second runs."""
    jobs, log, stop = Jobs(serving=lambda: False), [], threading.Event()
    first = jobs.start("a", "first", _busy_until(stop, log, "first"), urgent=False)
    second = jobs.start("a", "second", lambda _t: log.append("second ran"), urgent=False)
    time.sleep(0.2)
    assert log == ["first started"] and jobs.busy("a")
    stop.set()
    assert first.result(5) == "first" and second.result(5) is None
    assert log == ["first started", "first ended", "second ran"] and not jobs.busy("a")


def test_a_superseding_job_calls_off_a_background_job_of_its_voice() -> None:
    """1. An upgrade (background) runs, never ending by itself. 2. A newer one supersedes it: the
    first ends with Superseded naming the newer job, and the newer one runs."""
    jobs, log = Jobs(serving=lambda: False), []
    first = jobs.start("a", "upgrade to 3", _busy_until(threading.Event(), log, "3"), urgent=False)
    time.sleep(0.1)
    second = jobs.start("a", "upgrade to 4", lambda _t: "4", urgent=False, supersede=True)
    assert second.result(5) == "4"
    with pytest.raises(Superseded, match="upgrade to 4"):
        first.result(0)


@pytest.mark.slow
def test_urgent_jobs_are_not_called_off_and_do_not_wait_behind_another_voices_background_job() -> None:
    """1. Voice a's background job holds the background lane. 2. Voice b's urgent job runs at once
    beside it. 3. An urgent job of a is not called off by a superseding one; that one waits."""
    jobs, log, stop = Jobs(serving=lambda: False), [], threading.Event()
    jobs.start("a", "upgrade of a", _busy_until(stop, log, "a"), urgent=False)
    time.sleep(0.1)
    assert jobs.start("b", "b for a request", lambda _t: "b", urgent=True).result(2) == "b"
    urgent_stop = threading.Event()
    urgent = jobs.start("c", "c for a request", _busy_until(urgent_stop, log, "c"), urgent=True)
    later = jobs.start("c", "upgrade of c", lambda _t: "later", urgent=False, supersede=True)
    time.sleep(0.2)
    assert not urgent.done() and not later.done()
    urgent_stop.set()
    stop.set()
    assert urgent.result(5) == "c" and later.result(5) == "later"


def test_a_job_made_urgent_leaves_the_background_queue() -> None:
    """1. Voice a's background job holds the background lane. 2. Voice b's background job waits for
    it. 3. A request now wants b (``hurry``): b's job moves to the urgent lane and runs."""
    jobs, log, stop = Jobs(serving=lambda: False), [], threading.Event()
    jobs.start("a", "upgrade of a", _busy_until(stop, log, "a"), urgent=False)
    time.sleep(0.1)
    waiting = jobs.start("b", "upgrade of b", lambda _t: "b", urgent=False)
    time.sleep(0.2)
    assert not waiting.done()
    jobs.hurry("b")
    assert waiting.result(2) == "b"
    stop.set()
    assert jobs.wait(5)


def test_cancel_calls_off_background_jobs_only() -> None:
    jobs, log, stop = Jobs(serving=lambda: False), [], threading.Event()
    background = jobs.start("a", "upgrade of a", _busy_until(threading.Event(), log, "a"), urgent=False)
    urgent = jobs.start("b", "load of b", _busy_until(stop, log, "b"), urgent=True)
    time.sleep(0.1)
    assert len(jobs.cancel("a", "rollback of a")) == 1 and jobs.cancel("b", "rollback of b") == []
    with pytest.raises(Superseded, match="rollback of a"):
        background.result(5)
    stop.set()
    assert urgent.result(5) == "b"


def test_supersede_and_hurry_reach_the_running_job_behind_a_queued_one() -> None:
    """1. Voice a's job A runs; job B waits behind it. 2. A superseding job C calls off both A and
    B (not only the newest), so it does not wait for A to finish. 3. With A' running and B'
    queued, ``hurry`` reaches A' too: the request waits for the job that actually runs."""
    jobs, log = Jobs(serving=lambda: False), []
    first = jobs.start("a", "A", _busy_until(threading.Event(), log, "A"), urgent=False)
    queued = jobs.start("a", "B", lambda _t: "B", urgent=False)
    time.sleep(0.1)
    third = jobs.start("a", "C", lambda _t: "C", urgent=False, supersede=True)
    assert third.result(5) == "C"
    for future in (first, queued):
        with pytest.raises(Superseded, match="C"):
            future.result(0)

    stop = threading.Event()
    tickets: list[Ticket] = []

    def running(ticket: Ticket) -> str:
        tickets.append(ticket)
        stop.wait(5)
        return "A'"

    first = jobs.start("a", "A'", running, urgent=False)
    jobs.start("a", "B'", lambda _t: "B'", urgent=False)
    wait_until = time.monotonic() + 5
    while not tickets and time.monotonic() < wait_until:
        time.sleep(0.01)
    jobs.hurry("a")
    assert tickets and tickets[0].hurried and not tickets[0].urgent  # still called off by a rollback
    stop.set()
    assert first.result(5) == "A'" and jobs.wait(5)


def test_a_withdrawal_by_version_does_not_call_off_the_restarts_load_of_rollback_targets() -> None:
    """A fleet withdrawal calls off the jobs bringing its version up (``cancel`` by version). The
    restart's job loading rollback targets names the one it loads as its target too, and a
    withdrawal of that one called the whole job off: the voice's other targets never loaded. It
    leaves a withdrawn target out itself; only a cancel of every job of the voice stops it."""
    jobs = Jobs(lambda: False)
    started, stop = threading.Event(), threading.Event()

    def stand_by(ticket: Ticket) -> None:
        ticket.stands_by, ticket.target = True, "1"
        started.set()
        stop.wait(10)
        ticket.check()

    future = jobs.start("voice", "rollback targets of voice", stand_by, urgent=False)
    assert started.wait(10)
    assert jobs.cancel("voice", "withdrawn", version="1") == []
    assert len(jobs.cancel("voice", "shutting down")) == 1
    stop.set()
    with pytest.raises(Superseded):
        future.result(10)
