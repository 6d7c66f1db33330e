"""Old answers leave the spool (``--spool-keep-days``): what goes, in which order, and what never
does. Ages are change times, which a test cannot set: the cut-off is placed between files made
a moment apart instead."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from inproc import FakeVoices, FrontEnds

from ttsd.front import spool as spool_module
from ttsd.front import spool_prune
from ttsd.front.spool import SETTLE_SECONDS, Spool
from ttsd.front.spool_prune import DAY, age, interval, prune

FOLDERS = ("incoming", "work", "out", "done", "failed")


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / "spool" / name for name in FOLDERS}
    for path in made.values():
        path.mkdir(parents=True)
    return made


def make(path: Path, text: str = "x") -> float:
    """Write ``path``; its change time."""
    path.write_text(text)
    return os.lstat(path).st_ctime


def between(earlier: float, later: float) -> float:
    """A cut-off after ``earlier`` and before ``later``: those change times must differ."""
    assert later > earlier, "the filesystem gave both files one change time"
    return (earlier + later) / 2


def tick() -> None:
    time.sleep(0.02)  # change times a filesystem tells apart (nanoseconds on ext4, tmpfs, xfs)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_files_older_than_the_cutoff_go_from_out_done_and_failed_and_nothing_else(dirs: dict[str, Path]) -> None:
    for folder in ("out", "done", "failed"):
        make(dirs[folder] / "old.txt")
    (dirs["done"] / "old-folder").mkdir()  # never the spool's: left
    make(dirs["out"] / ".r9.wav.tmp")  # a temp file being written: never touched
    make(dirs["incoming"] / "waiting.txt")
    make(dirs["work"] / "claimed.txt")
    tick()
    cutoff = time.time()
    tick()
    for folder in ("out", "done", "failed"):
        make(dirs[folder] / "young.txt")
    pruned = prune(dirs, 3600, cutoff + 3600)
    assert pruned.removed == {"out": 1, "done": 1, "failed": 1} and pruned.total == 3 and not pruned.problems
    assert names(dirs["out"]) == [".r9.wav.tmp", "young.txt"]
    assert names(dirs["done"]) == ["old-folder", "young.txt"]
    assert names(dirs["failed"]) == ["young.txt"]
    assert names(dirs["incoming"]) == ["waiting.txt"] and names(dirs["work"]) == ["claimed.txt"]


def test_an_answers_audio_stays_while_its_metadata_does(dirs: dict[str, Path]) -> None:
    """out/ID.json marks a complete answer: the audio, written first, is a moment older, and a
    cut-off between the two must not leave ID.json without its audio."""
    out = dirs["out"]
    audio = make(out / "a.b.wav")  # IDs may hold dots
    tick()
    meta = make(out / "a.b.json")
    tick()
    lone = make(out / "orphan.flac")  # no ID.json: goes by its own age
    pruned = prune(dirs, 10, between(audio, meta) + 10)
    assert names(out) == ["a.b.json", "a.b.wav", "orphan.flac"] and pruned.total == 0
    assert prune(dirs, 10, between(meta, lone) + 10).total == 2
    assert names(out) == ["orphan.flac"]


def test_a_failed_request_is_never_left_without_its_reason(dirs: dict[str, Path]) -> None:
    """The reason is written before the request is moved beside it: a cut-off between the two
    keeps the reason; past both, both go (the ~N and hashed-name forms too)."""
    failed = dirs["failed"]
    reason = make(failed / "r1~2.error.json")
    make(failed / "x-0123456789ab.error.json")
    tick()
    request = make(failed / "r1~2.txt")
    make(failed / "x-0123456789ab.request")
    tick()
    alone = make(failed / "alone.error.json")  # its request removed by hand: goes by its own age
    prune(dirs, 10, between(reason, request) + 10)
    assert names(failed) == sorted(["r1~2.error.json", "r1~2.txt", "x-0123456789ab.error.json",
                                    "x-0123456789ab.request", "alone.error.json"])
    assert prune(dirs, 10, between(request, alone) + 10).total == 4
    assert names(failed) == ["alone.error.json"]
    assert prune(dirs, 10, time.time() + 11).total == 1


def test_an_answer_written_anew_while_the_old_one_goes_is_kept_whole(dirs: dict[str, Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The old out/r1.json goes first; were r1 served again at that moment (its ID free now), its
    new audio and metadata were listed old and the new audio went after its metadata arrived."""
    out = dirs["out"]
    make(out / "r1.wav", "old audio")
    make(out / "r1.json", "old meta")
    tick()
    unlink = os.unlink

    def served_again(path: str, *, dir_fd: int | None = None) -> None:
        unlink(path, dir_fd=dir_fd)
        if path == "r1.json":
            for name, text in (("r1.wav", "new audio"), ("r1.json", "new meta")):  # as atomic_write does
                make(out / f".{name}.tmp", text)
                os.replace(out / f".{name}.tmp", out / name)

    monkeypatch.setattr(spool_prune.os, "unlink", served_again)
    prune(dirs, 10, time.time() + 10 - 0.01)
    assert names(out) == ["r1.json", "r1.wav"] and (out / "r1.wav").read_text() == "new audio"


def test_a_request_that_cannot_be_removed_keeps_its_reason(dirs: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    failed = dirs["failed"]
    make(failed / "r1.error.json")
    make(failed / "r1.txt")
    make(failed / "r2.error.json")
    make(failed / "r2.txt")
    unlink = os.unlink

    def stuck(path: str, *, dir_fd: int | None = None) -> None:
        if path == "r1.txt":
            raise PermissionError(errno.EPERM, "Operation not permitted")
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(spool_prune.os, "unlink", stuck)
    pruned = prune(dirs, 10, time.time() + 11)
    assert names(failed) == ["r1.error.json", "r1.txt"] and pruned.total == 2
    assert pruned.problems == ["failed/: old files cannot be removed (Operation not permitted)"]


def test_links_are_removed_never_followed(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A link in done/ is removed, not what it points to; a folder swapped for a link is not
    entered (its target's files stay) and is said."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make(elsewhere / "precious.txt")
    (dirs["done"] / "link.txt").symlink_to(elsewhere / "precious.txt")
    (dirs["done"] / "dangling.txt").symlink_to(tmp_path / "nothing")
    dirs["out"].rmdir()
    dirs["out"].symlink_to(elsewhere)
    pruned = prune(dirs, 10, time.time() + 11)
    assert names(dirs["done"]) == [] and names(elsewhere) == ["precious.txt"]
    assert pruned.problems == ["out/: a symbolic link"] and pruned.removed == {"done": 2, "failed": 0}


def test_how_often_and_how_it_is_said() -> None:
    assert interval(7 * DAY) == 3600 and interval(48) == 2 and interval(3) == 1
    assert (age(7 * DAY), age(DAY), age(0.5 * DAY), age(30)) == ("7 days", "1 day", "12 h", "30 s")


# -- in the spool ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now, self.ahead = 1000.0, 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time() + self.ahead


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(spool_module, "time", c)
    return c


@pytest.fixture
def front(tmp_path: Path, clock: Clock) -> Iterator[FrontEnds]:
    voices = FakeVoices(tmp_path, {"joe": {"1": {}}}, default_voice="joe", max_chars=200)
    f = FrontEnds(voices.backend, tmp_path)
    f.spool = Spool(f.spool.root, voices.backend, concurrency=1, keep_seconds=DAY)
    f.spool.prepare()
    yield f
    f.close()
    voices.close()


def serve(front: FrontEnds, clock: Clock) -> None:
    for _ in range(3):
        front.spool_pass()
        clock.now += SETTLE_SECONDS


def test_the_spool_removes_answers_a_day_old_at_most_hourly_and_an_id_may_then_come_again(
        front: FrontEnds, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    dirs = front.spool.dirs
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    (dirs["incoming"] / "bad.json").write_text("{not json")
    serve(front, clock)
    assert names(dirs["out"]) == ["r1.json", "r1.wav"] and names(dirs["done"]) == ["r1.txt"]
    assert names(dirs["failed"]) == ["bad.error.json", "bad.json"]
    clock.ahead = DAY + 1  # a day later, by the wall clock, and up a day; the last look was under an hour ago
    clock.now += DAY + 1 - 3600
    with caplog.at_level("INFO", logger="ttsd.spool"):
        front.spool_pass()
        assert names(dirs["out"]) == ["r1.json", "r1.wav"]
        clock.now += 3600
        front.spool_pass()
    assert names(dirs["out"]) == names(dirs["done"]) == names(dirs["failed"]) == []
    said = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert said == ["spool: removed 5 files older than 1 day (out/ 2, done/ 1, failed/ 2)"], said
    (dirs["incoming"] / "r1.txt").write_text("Hello again.")  # its answer is gone: no duplicate
    serve(front, clock)
    assert json.loads((dirs["out"] / "r1.json").read_text())["duration"] > 0 and names(dirs["failed"]) == []


def test_a_clock_set_forward_while_it_runs_removes_nothing_of_this_run(front: FrontEnds, clock: Clock) -> None:
    """A box without a real-time clock starts in the past and NTP moves it on: what this run
    wrote is younger than its uptime, however old its change time looks."""
    dirs = front.spool.dirs
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    serve(front, clock)
    clock.ahead = 400 * DAY  # the clock jumped; the daemon has been up for minutes
    clock.now += 3600
    front.spool_pass()
    assert names(dirs["out"]) == ["r1.json", "r1.wav"] and names(dirs["done"]) == ["r1.txt"]
    clock.now += DAY  # up a day now: as old as the wall clock says, at least a day
    front.spool_pass()
    assert names(dirs["out"]) == names(dirs["done"]) == []


def test_an_answer_waiting_in_work_keeps_its_metadata(front: FrontEnds, clock: Clock,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Published, then kept in work/ because done/ could not take it: pruning its out/ID.json
    would have it spoken again at its next try."""
    dirs = front.spool.dirs
    place = Spool._place

    def broken(self: Spool, claimed: Path, folder: str) -> str:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Spool, "_place", broken)
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    front.spool_pass()
    clock.now += SETTLE_SECONDS
    front.spool_pass()
    assert names(dirs["work"]) == ["r1.txt"] and names(dirs["out"]) == ["r1.json", "r1.wav"]
    published = (dirs["out"] / "r1.json").read_text()
    clock.ahead, clock.now = 2 * DAY, clock.now + 2 * DAY
    front.spool_pass()
    assert names(dirs["out"]) == ["r1.json", "r1.wav"]
    monkeypatch.setattr(Spool, "_place", place)
    clock.now += 60
    front.spool_pass()
    assert names(dirs["done"]) == ["r1.txt"] and (dirs["out"] / "r1.json").read_text() == published  # not spoken again


def test_a_problem_is_said_once_while_it_lasts(front: FrontEnds, caplog: pytest.LogCaptureFixture) -> None:
    from ttsd.front.spool_prune import Pruned

    stuck = Pruned({"done": 0}, ["done/: old files cannot be removed (Operation not permitted)"])
    with caplog.at_level("WARNING", logger="ttsd.spool"):
        for pruned in (stuck, stuck, Pruned({"done": 1}), stuck):
            front.spool._pruned(pruned)
    said = [r.getMessage() for r in caplog.records if "old answers stay" in r.getMessage()]
    assert len(said) == 2, said  # once, then again once it came back


def test_a_stop_ends_a_removal(dirs: dict[str, Path]) -> None:
    import threading

    for i in range(50):
        make(dirs["done"] / f"r{i}.txt")
    stop = threading.Event()
    stop.set()
    assert prune(dirs, 10, time.time() + 11, stop=stop).total == 0 and len(names(dirs["done"])) == 50


def test_without_keep_days_nothing_is_removed(front: FrontEnds, clock: Clock) -> None:
    dirs = front.spool.dirs
    front.spool.keep_seconds = 0.0
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    serve(front, clock)
    clock.ahead, clock.now = 1000 * DAY, clock.now + 1000 * DAY
    front.spool_pass()
    assert names(dirs["out"]) == ["r1.json", "r1.wav"] and names(dirs["done"]) == ["r1.txt"]


def test_a_failure_removing_old_answers_is_said_and_stops_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the removal (any exception) ended its task for good, and then made the spool's own
    task fail at the stop: it is logged, and the spool serves and stops as before."""
    import asyncio

    voices = FakeVoices(tmp_path, {"joe": {"1": {}}}, default_voice="joe", max_chars=200)
    front = FrontEnds(voices.backend, tmp_path)
    try:
        spool = Spool(front.spool.root, voices.backend, concurrency=1, keep_seconds=DAY)
        spool.prepare()

        def broken(*args: object, **kw: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(spool_module, "prune", broken)

        async def go() -> None:
            task = asyncio.get_running_loop().create_task(spool.run())
            (spool.dirs["incoming"] / "r1.txt").write_text("Hello.")
            for _ in range(100):
                if (spool.dirs["out"] / "r1.json").exists():
                    break
                spool._wake.set()
                await asyncio.sleep(0.1)
            spool.stop()
            await asyncio.wait_for(task, 10)  # no exception
            await spool.drain()

        with caplog.at_level("ERROR", logger="ttsd.spool"):
            front.run(go())
        assert (spool.dirs["out"] / "r1.json").exists()
        assert "spool: removing old answers failed" in caplog.text
    finally:
        front.close()
        voices.close()
