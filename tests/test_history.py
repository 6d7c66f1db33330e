"""The audit trail (``STATE/history.jsonl``): appended one line per event, never rewritten per
event; read back from its tail in bounded time and memory, whatever size a box left it at."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

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
