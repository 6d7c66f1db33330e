"""The audit trail (``STATE/history.jsonl``): appended one line per event, never rewritten per
event; read back from its tail in bounded time and memory, whatever size a box left it at."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from ttsd.serving import history
from ttsd.serving.state import ServingState


def test_events_are_appended_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    """1. Three events: the file grows by one line each and stays the same file (not rewritten
    by rename). 2. A crash tore the last line: the next event starts on a line of its own, and a
    restart shows the intact entries only."""
    state = ServingState(tmp_path)
    state.load()
    state.record("voice", None, "1", "new version in the models dir")
    held = os.open(state.trail.path, os.O_RDONLY)  # the file as it is now
    try:
        state.record("voice", "1", "2", "new version in the models dir")
        state.record("voice", "2", "1", "rollback requested")
        after = os.fstat(held)
    finally:
        os.close(held)
    assert after.st_nlink == 1 and after.st_size == state.trail.path.stat().st_size  # grown, not replaced
    lines = state.trail.path.read_text().splitlines()
    assert [json.loads(line)["to"] for line in lines] == ["1", "2", "1"]
    with open(state.trail.path, "a") as handle:
        handle.write('{"voice": "voice", "fr')  # kill -9 mid-write
    state.record("voice", "1", "3", "new version in the models dir")
    restarted = ServingState(tmp_path)
    restarted.load()
    assert [h["to"] for h in restarted.history()] == ["1", "2", "1", "3"]


def test_a_huge_trail_is_read_from_its_tail_and_cut_back(tmp_path: Path) -> None:
    """A 64 MB trail (a box left alone for years, or damage): start-up reads its tail only
    (bounded memory and time), shows the newest entries, and the next event cuts the file back
    to its newest lines."""
    line = json.dumps({"time": "2026-01-01T00:00:00+0000", "voice": "v", "from": "1", "to": "2",
                       "why": "x" * 200}) + "\n"
    path = tmp_path / "history.jsonl"
    count = (64 << 20) // len(line)
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(line.replace('"to": "2"', f'"to": "{i}"'))
    state = ServingState(tmp_path)
    tracemalloc.start()
    started = time.monotonic()
    state.load()
    took = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * history.TAIL_BYTES and took < 1.0, (peak, took)
    assert [h["to"] for h in state.history(3)] == [str(i) for i in range(count - 3, count)]
    state.record("v", "1", "new", "rollback requested")
    assert os.path.getsize(path) <= history.ROTATE_BYTES
    assert state.history(1)[0]["to"] == "new"
    restarted = ServingState(tmp_path)
    restarted.load()
    assert [h["to"] for h in restarted.history(2)] == [str(count - 1), "new"]


def test_a_fifo_in_place_of_the_trail_stops_nothing(tmp_path: Path) -> None:
    """A FIFO at history.jsonl hung the daemon's start for good (the open waited for a writer),
    and would have filled and blocked each write. It is an unreadable trail: said, and left."""
    import threading

    os.mkfifo(tmp_path / "history.jsonl")
    state = ServingState(tmp_path)
    done = threading.Event()

    def start() -> None:
        state.load()
        state.record("voice", None, "1", "new version in the models dir")
        for _ in range(2000):  # more than a pipe's buffer
            state.record("voice", "1", "1", "x" * 100)
        done.set()

    threading.Thread(target=start, daemon=True).start()
    assert done.wait(20), "start-up waited on the FIFO"
    assert [h["to"] for h in state.history(1)] == ["1"]


def test_a_disk_that_takes_part_of_a_batch_loses_no_line_and_repeats_none(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk is full, then has a little room: write(2) takes part of the pending lines and says
    how much. The rest were dropped from memory as if written; now each line is written once."""
    import errno

    trail = history.AuditTrail(tmp_path / "history.jsonl")
    real_write, room = os.write, {"left": 0}

    def write(fd: int, data: bytes) -> int:
        if room["left"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = min(len(data), room["left"])
        room["left"] -= taken
        return real_write(fd, data[:taken])

    monkeypatch.setattr(history.os, "write", write)
    for i in range(5):  # the disk is full: kept in memory
        trail.record({"voice": "v", "from": str(i), "to": str(i + 1), "why": "x"})
    room["left"] = 150  # a little room: part of a line too
    trail.record({"voice": "v", "from": "5", "to": "6", "why": "x"})
    room["left"] = 1 << 20
    trail.record({"voice": "v", "from": "6", "to": "7", "why": "x"})
    monkeypatch.undo()
    restarted = history.AuditTrail(tmp_path / "history.jsonl")
    restarted.load()
    assert [entry["from"] for entry in restarted.recent()] == [str(i) for i in range(7)]


def test_entries_ttsd_did_not_write_are_skipped(tmp_path: Path) -> None:
    """Lines edited in by hand: NaN or infinity (which /v1/status passed on, and browsers' JSON
    parser refused: the status page said "daemon unreachable"), or values of the wrong types."""
    path = tmp_path / "history.jsonl"
    good = {"time": "2026-12-07T10:00:00+0000", "voice": "v", "from": "1", "to": "2", "why": "x", "load_seconds": 1.5}
    lines = [
        json.dumps(good),
        '{"voice": "v", "from": "1", "to": "2", "why": "nan", "load_seconds": NaN}',
        '{"voice": "v", "from": 1e400, "to": "2", "why": "x"}',
        '{"voice": ["x"], "from": "1", "to": "2", "why": "x"}',
        '{"time": 5, "voice": "v", "from": "1", "to": "2", "why": "x"}',
        '{"voice": "v", "from": {"a": 1}, "to": "2", "why": "x"}',
        '{"voice": "v", "from": "1", "to": "2", "why": "x", "extra": [1, 2]}',
        json.dumps({**good, "to": None}),
    ]
    path.write_text("\n".join(lines) + "\n")
    trail = history.AuditTrail(path)
    trail.load()
    assert trail.recent() == [good, {**good, "to": None}]
    json.dumps(trail.recent(), allow_nan=False)
