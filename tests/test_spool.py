"""The spool's state machine in-process: incoming/ -> work/ -> done/ or failed/, settling, restart
recovery and the pause after a system failure, over the fake backend of ``inproc`` and with the
spool's clock in the test's hands (no sleeps).

Hostile files (links, FIFOs, huge or oddly named files, a second request with a served ID) are in
``test_hostile_requests.py``; ``kill -9`` mid-request is in ``test_lifecycle.py``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile
from inproc import FakeVoices, FrontEnds

from ttsd.errors import BusyError, ResourceError
from ttsd.front import spool as spool_module
from ttsd.front.spool import BACKOFF_FIRST, BACKOFF_MAX, SETTLE_SECONDS, Spool, failed_names
from ttsd.front.spool_files import error_name


class Clock:
    """Stands in for the ``time`` module inside ``ttsd.front.spool``: its monotonic clock moves
    only when the test moves it; wall-clock time (for timings in ID.json) is the real one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(spool_module, "time", c)
    return c


@pytest.fixture
def voices(tmp_path: Path) -> Iterator[FakeVoices]:
    v = FakeVoices(tmp_path, {"joe": {"1": {}}, "ann": {"1": {"sample_rate": 22050}}}, default_voice="joe",
                   max_chars=200)
    yield v
    v.close()


@pytest.fixture
def front(voices: FakeVoices, tmp_path: Path, clock: Clock) -> Iterator[FrontEnds]:
    f = FrontEnds(voices.backend, tmp_path)
    yield f
    f.close()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def settle_and_serve(front: FrontEnds, clock: Clock, passes: int = 10) -> None:
    """Scan, let the clock pass the settle time, and scan again until incoming/ and work/ are
    empty (one request is served per pass at concurrency 1)."""
    for _ in range(passes):
        front.spool_pass()
        clock.now += SETTLE_SECONDS
        front.spool_pass()
        if not any(front.spool.dirs["incoming"].iterdir()) and not any(front.spool.dirs["work"].iterdir()):
            return


def test_a_txt_and_a_json_request_end_in_done_with_audio_and_metadata(front: FrontEnds, clock: Clock) -> None:
    dirs = front.spool.dirs
    (dirs["incoming"] / "r1.txt").write_text("Hello there. From a text file.")
    body = json.dumps({"text": "From a JSON file.", "voice": "ann", "format": "flac"}).encode()
    (dirs["incoming"] / "r2.json").write_bytes(body)
    (dirs["incoming"] / "r3.json").write_text(json.dumps({"text": "Streamed?", "stream": True}))
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt", "r2.json", "r3.json"]
    assert names(dirs["out"]) == ["r1.json", "r1.wav", "r2.flac", "r2.json", "r3.json", "r3.wav"]
    assert names(dirs["incoming"]) == names(dirs["work"]) == names(dirs["failed"]) == []
    r1 = json.loads((dirs["out"] / "r1.json").read_text())
    assert (r1["id"], r1["voice"], r1["version"], r1["format"], r1["sample_rate"]) == ("r1", "joe", "1", "wav", 16000)
    assert r1["request_sha256"] == hashlib.sha256(b"Hello there. From a text file.").hexdigest()
    wav = soundfile.info(io.BytesIO((dirs["out"] / "r1.wav").read_bytes()))
    assert wav.format == "WAV" and wav.duration == pytest.approx(r1["duration"], abs=1e-3) and wav.duration > 1
    r2 = json.loads((dirs["out"] / "r2.json").read_text())
    assert (r2["voice"], r2["format"], r2["sample_rate"]) == ("ann", "flac", 22050)
    assert r2["request_sha256"] == hashlib.sha256(body).hexdigest()
    assert soundfile.info(str(dirs["out"] / "r2.flac")).format == "FLAC"
    assert set(r1["timings"]) == {"queued", "synthesis", "total"}
    assert soundfile.info(str(dirs["out"] / "r3.wav")).format == "WAV"  # stream: ignored, a whole file


@pytest.mark.parametrize("name, content, code", [
    ("empty.txt", b"   ", "bad_request"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "bad_request"),
    ("long.txt", b"a" * 201, "text_too_long"),
    ("notjson.json", b"{not json", "bad_request"),
    ("fields.json", b'{"text": "hi", "colour": "red"}', "bad_request"),
    ("speed.json", b'{"text": "hi", "speed": 99}', "bad_request"),
    ("voice.json", b'{"text": "hi", "voice": "nobody"}', "unknown_voice"),
    ("version.json", b'{"text": "hi", "version": "7"}', "unknown_voice"),
    ("speaker.json", b'{"text": "hi", "speaker": 3}', "bad_request"),  # found with the lease held
    ("pauses.json", json.dumps({"text": "a. " * 20, "sentence_pause": 5}).encode(), "audio_too_long"),
])
def test_a_bad_request_ends_in_failed_with_its_code(front: FrontEnds, voices: FakeVoices, clock: Clock, name: str,
                                                    content: bytes, code: str) -> None:
    dirs = front.spool.dirs
    (dirs["incoming"] / name).write_bytes(content)
    settle_and_serve(front, clock)
    stem = name.rsplit(".", 1)[0]
    assert names(dirs["failed"]) == sorted([name, f"{stem}.error.json"])
    error = json.loads((dirs["failed"] / f"{stem}.error.json").read_text())["error"]
    assert error["code"] == code and error["message"]
    assert (dirs["failed"] / name).read_bytes() == content
    assert names(dirs["out"]) == names(dirs["done"]) == names(dirs["work"]) == []
    assert voices.model_failures() == []
    metrics = voices.metrics.render().decode()
    assert 'ttsd_spool_requests_total{outcome="failed"} 1.0' in metrics
    # in the request metrics too, as the other front ends' requests (the spool's were missing)
    assert re.search(rf'ttsd_requests_total{{outcome="{code}",route="spool",.*}} 1.0', metrics), metrics
    assert re.search(r'ttsd_request_failures_total{fault="request",route="spool",.*} 1.0', metrics), metrics


def test_dot_files_and_tmp_files_are_never_claimed(front: FrontEnds, clock: Clock) -> None:
    """Writers drop a request by writing a hidden or *.tmp file and renaming it: those are left
    alone, however long they stay, while a request beside them is served."""
    dirs = front.spool.dirs
    ignored = [".r3.txt", "r4.txt.tmp", "r5.tmp", ".r6.json.tmp"]
    for name in ignored:
        (dirs["incoming"] / name).write_text("Not yet.")
    (dirs["incoming"] / "r7.txt").write_text("Served.")
    for _ in range(5):
        front.spool_pass()
        clock.now += 10 * SETTLE_SECONDS
    assert [name for name, _ in front.spool._list_incoming()[0]] == []
    assert names(dirs["incoming"]) == sorted(ignored)
    assert names(dirs["done"]) == ["r7.txt"] and names(dirs["failed"]) == [] and names(dirs["work"]) == []


def test_a_file_still_changing_is_not_claimed_until_it_settles(front: FrontEnds, voices: FakeVoices,
                                                               clock: Clock) -> None:
    """1. A file appears: not claimed. 2. It grows before it settled: not claimed, and its settle
    time starts again. 3. Just short of that: not claimed. 4. Once it held still for
    SETTLE_SECONDS it is claimed, and what is spoken is the whole file."""
    dirs = front.spool.dirs
    request = dirs["incoming"] / "grow.txt"
    request.write_text("The first half,")
    front.spool_pass()
    clock.now += SETTLE_SECONDS * 0.8
    with open(request, "a") as f:
        f.write(" and the second half.")
    front.spool_pass()
    clock.now += SETTLE_SECONDS * 0.8
    front.spool_pass()
    assert names(dirs["incoming"]) == ["grow.txt"] and voices.jobs == []
    clock.now += SETTLE_SECONDS * 0.2
    front.spool_pass()
    assert names(dirs["incoming"]) == [] and names(dirs["done"]) == ["grow.txt"]
    meta = json.loads((dirs["out"] / "grow.json").read_text())
    assert meta["request_sha256"] == hashlib.sha256(b"The first half, and the second half.").hexdigest()
    assert [job.text for job in voices.jobs] == ["The first half, and the second half."]


def test_prepare_after_a_restart_serves_or_finishes_claimed_requests(front: FrontEnds, voices: FakeVoices,
                                                                     clock: Clock, tmp_path: Path) -> None:
    """A daemon stopped (or killed) with requests in work/: the next start serves each from
    there, first, except one whose outputs were published (out/ID.json with this very request's
    sha256), which goes to done/. A request with the same ID waiting in incoming/ is never
    overwritten (requeued by a rename, the claimed one replaced it). Leftover temp files of
    out/, done/ and failed/ are removed; hidden files stay."""
    dirs = front.spool.dirs
    (dirs["work"] / "fresh.txt").write_text("Never served.")
    (dirs["work"] / "served.txt").write_text("Served before the crash.")
    (dirs["out"] / "served.wav").write_bytes(b"RIFF")
    (dirs["out"] / "served.json").write_text(json.dumps(
        {"id": "served", "request_sha256": hashlib.sha256(b"Served before the crash.").hexdigest()}))
    (dirs["work"] / "other.txt").write_text("A new request with an old ID.")
    (dirs["out"] / "other.json").write_text(json.dumps({"id": "other", "request_sha256": "0" * 64}))
    (dirs["work"] / "broken.txt").write_text("Its metadata is not JSON.")
    (dirs["out"] / "broken.json").write_text("{")
    (dirs["out"] / ".fresh.wav.1234.tmp").write_bytes(b"half")
    (dirs["failed"] / ".x.error.json.abcd.tmp").write_bytes(b"half")
    (dirs["work"] / ".hidden").write_text("not a request")
    (dirs["incoming"] / "fresh.txt").write_text("A corrected request with the same ID.")
    (dirs["incoming"] / "gone.txt").mkdir()  # a folder with a claimed request's name
    (dirs["incoming"] / "gone.txt" / "x").write_text("")
    (dirs["work"] / "gone.txt").write_text("Claimed before the crash.")

    restarted = Spool(dirs["incoming"].parent, voices.backend, concurrency=1)
    restarted.prepare()  # never fails for what writers left
    assert names(dirs["incoming"]) == ["fresh.txt", "gone.txt"]
    assert (dirs["incoming"] / "fresh.txt").read_text() == "A corrected request with the same ID."
    assert names(dirs["done"]) == ["served.txt"]
    assert names(dirs["work"]) == [".hidden", "broken.txt", "fresh.txt", "gone.txt", "other.txt"]
    assert names(dirs["out"]) == ["broken.json", "other.json", "served.json", "served.wav"]
    assert names(dirs["failed"]) == []
    assert voices.jobs == []  # nothing was spoken again for the served one

    front.spool = restarted
    settle_and_serve(front, clock)
    assert [job.text for job in voices.jobs][:2] == ["Never served.", "Claimed before the crash."]  # work/ first
    assert {"fresh.txt", "gone.txt"} <= set(names(dirs["done"])) and (dirs["out"] / "fresh.json").is_file()
    errors = {p.name: json.loads(p.read_text())["error"]["code"] for p in dirs["failed"].glob("*.error.json")}
    assert errors == {"other.error.json": "duplicate", "broken.error.json": "duplicate",
                      "fresh.error.json": "duplicate", "gone.error.json": "bad_file"}, errors
    assert (dirs["failed"] / "fresh.txt").read_text() == "A corrected request with the same ID."
    assert (dirs["failed"] / "gone.txt" / "x").exists()


def test_nothing_in_failed_is_replaced(front: FrontEnds, clock: Clock) -> None:
    """A second failing request with an ID already in failed/ (the same name, or ID.txt beside
    ID.json) goes there as ID~N, with its own error file; a request named like an error file
    (y.error.json) is refused by its name and never replaces y's. Each replaced the other."""
    dirs = front.spool.dirs
    for name, content in [("z.txt", "   "), ("z.txt", "?!"), ("x.txt", "  "), ("x.json", "{"), ("y.txt", " "),
                          ("y.error.json", '{"error": {"code": "forged"}}'), ("abc.doc", "no request")]:
        (dirs["incoming"] / name).write_text(content)
        settle_and_serve(front, clock)
    forged, forged_error = failed_names("y.error.json")  # never under its own name: an error file's
    assert names(dirs["failed"]) == sorted([
        "z.txt", "z.error.json", "z~1.txt", "z~1.error.json", "x.txt", "x.error.json", "x~1.json",
        "x~1.error.json", "y.txt", "y.error.json", forged, forged_error, *failed_names("abc.doc")])
    assert not (dirs["failed"] / "abc.error.json").exists()  # no reason for a request "abc" that never was
    assert forged.endswith(".request") and forged_error == error_name("y.error.json")
    assert (dirs["failed"] / forged).read_text() == '{"error": {"code": "forged"}}'
    errors = {p.name: json.loads(p.read_text())["error"] for p in dirs["failed"].glob("*.error.json")}
    assert errors["z.error.json"]["message"] == "text is empty" and "nothing to speak" in errors["z~1.error.json"]["message"]
    assert errors["y.error.json"]["code"] == "bad_request"  # y's own, not the forged one
    assert errors["x~1.error.json"]["code"] == "bad_request" and "JSON" in errors["x~1.error.json"]["message"]


@pytest.mark.parametrize("where", ["submit", "engine"])
def test_a_system_failure_keeps_the_request_claimed_and_pauses_the_spool(front: FrontEnds, voices: FakeVoices,
                                                                         clock: Clock, where: str) -> None:
    """1. The box fails while a request is served (submit raises ResourceError; or the engine
    hits a full disk, which the pool turns into one): the request stays in work/, not failed/,
    and the spool pauses BACKOFF_FIRST seconds. 2. It is not served again during the pause, nor
    is a new request claimed. 3. A second failure doubles the pause. 4. After it, both are served,
    the claimed one first."""
    dirs = front.spool.dirs
    failure = OSError(errno.ENOSPC, "No space left on device")
    if where == "submit":
        voices.submit_error = ResourceError("writing failed: No space left on device", storage=True)
    else:
        voices.engine("joe", "1").fail_with = failure
    (dirs["incoming"] / "r1.txt").write_text("Hello there.")
    settle_and_serve(front, clock, passes=1)
    assert names(dirs["work"]) == ["r1.txt"] and names(dirs["failed"]) == names(dirs["incoming"]) == []
    assert len(voices.jobs) == 1 and front.spool._paused_until == clock.now + BACKOFF_FIRST

    (dirs["incoming"] / "r2.txt").write_text("Next in line.")
    front.spool_pass()
    clock.now = front.spool._paused_until - 0.01  # r2 settled long ago, but the spool is paused
    front.spool_pass()
    assert names(dirs["work"]) == ["r1.txt"] and names(dirs["incoming"]) == ["r2.txt"] and len(voices.jobs) == 1

    clock.now += 0.01
    front.spool_pass()  # r1 again (before r2), fails again: paused twice as long
    assert len(voices.jobs) == 2 and names(dirs["work"]) == ["r1.txt"] and names(dirs["incoming"]) == ["r2.txt"]
    assert front.spool._paused_until == clock.now + 2 * BACKOFF_FIRST

    voices.submit_error = voices.engine("joe", "1").fail_with = None
    clock.now += 2 * BACKOFF_FIRST
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt", "r2.txt"] and front.spool._backoff == 0.0
    assert [job.text for job in voices.jobs] == ["Hello there."] * 3 + ["Next in line."]
    assert voices.model_failures() == []
    metrics = voices.metrics.render().decode()
    assert 'ttsd_spool_requests_total{outcome="retry"} 2.0' in metrics
    assert 'ttsd_spool_requests_total{outcome="ok"} 2.0' in metrics
    assert re.search(r'ttsd_requests_total{outcome="ok",route="spool",.*} 2.0', metrics), metrics
    assert re.search(r'ttsd_request_duration_seconds_count{route="spool",.*} 2.0', metrics), metrics


def test_audio_that_did_not_fit_waits_for_room_and_audio_that_never_could_fails(
        front: FrontEnds, voices: FakeVoices, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. big's audio does not fit: it stays in work/ and is not spoken again while the disk has
    less room than it needs, but requests after it are served (it blocked the spool, spoken
    again every minute). 2. Room comes: it is served. 3. Audio larger than the whole filesystem
    fails at once with insufficient_storage."""
    dirs = front.spool.dirs
    free = {"bytes": 0}
    total_blocks = 1 << 30

    class Fs:
        f_frsize = 1

        @property
        def f_bavail(self) -> int:
            return free["bytes"]

        @property
        def f_bfree(self) -> int:
            return free["bytes"]

        @property
        def f_blocks(self) -> int:
            return total_blocks

    real_statvfs, real_write = spool_module.os.statvfs, spool_module.atomic_write_bytes
    monkeypatch.setattr(spool_module.os, "statvfs", lambda path: Fs() if str(path).startswith(str(dirs["out"]))
                        else real_statvfs(path))

    def write(path: Path, data: bytes, mode: int | None = None) -> None:
        if len(data) > free["bytes"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, mode)

    monkeypatch.setattr(spool_module, "atomic_write_bytes", write)
    (dirs["incoming"] / "big.txt").write_text("A long answer. " * 5)
    settle_and_serve(front, clock, passes=1)
    assert names(dirs["work"]) == ["big.txt"] and len(voices.jobs) == 1
    needs = front.spool._retry["big.txt"].needs
    assert needs > 1000
    free["bytes"] = needs // 2  # some room, not enough for big's audio: small ones fit
    (dirs["incoming"] / "small.txt").write_text("Hi.")
    clock.now += BACKOFF_MAX
    settle_and_serve(front, clock, passes=3)
    assert names(dirs["done"]) == ["small.txt"] and names(dirs["work"]) == ["big.txt"]
    assert [job.text for job in voices.jobs] == ["A long answer. " * 4 + "A long answer.", "Hi."]  # big: once
    free["bytes"] = needs + spool_module.ROOM_MARGIN
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["big.txt", "small.txt"] and len(voices.jobs) == 3

    total_blocks = 1000  # a filesystem smaller than the audio: it could never fit
    free["bytes"] = 0
    (dirs["incoming"] / "huge.txt").write_text("Too much. " * 5)
    clock.now += BACKOFF_MAX
    settle_and_serve(front, clock)
    error = json.loads((dirs["failed"] / "huge.error.json").read_text())["error"]
    assert error["code"] == "insufficient_storage" and "more than the spool's filesystem could ever hold" in error["message"]


def test_a_spool_folder_it_cannot_write_is_the_box_not_the_request(
        front: FrontEnds, voices: FakeVoices, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """out/ cannot be written (permissions, an immutable folder): the request stays in work/ and
    the spool pauses; it was failed for good as the request's 'bad_file'. A deleted out/ is made
    again at the next scan, and the request is served."""
    dirs = front.spool.dirs
    real_write = spool_module.atomic_write_bytes

    def denied(path: Path, data: bytes, mode: int | None = None) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(spool_module, "atomic_write_bytes", denied)
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    settle_and_serve(front, clock, passes=1)
    assert names(dirs["work"]) == ["r1.txt"] and names(dirs["failed"]) == []
    assert front.spool._paused_until > clock.now and voices.model_failures() == []
    monkeypatch.setattr(spool_module, "atomic_write_bytes", real_write)
    dirs["out"].rmdir()
    clock.now += BACKOFF_MAX
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt"] and (dirs["out"] / "r1.json").is_file()


def test_a_spool_folder_replaced_by_a_link_is_never_used(front: FrontEnds, clock: Clock, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """incoming/ replaced by a link to another folder: the spool does nothing (it drained that
    folder into failed/, and spoke what it could), says so once, and takes up its work again when
    incoming/ is a folder again."""
    dirs = front.spool.dirs
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.conf").write_text("keep me")
    (victim / "x.txt").write_text("not for the spool")
    dirs["incoming"].rename(tmp_path / "incoming.real")
    dirs["incoming"].symlink_to(victim)
    with caplog.at_level("ERROR", logger="ttsd.spool"):
        for _ in range(3):
            try:
                front.spool.scan_now()
            except Exception as exc:  # run() logs it once
                front.spool._folder_problem(f"spool scan failed: {exc}")
            clock.now += 1.0
    assert sorted(p.name for p in victim.iterdir()) == ["important.conf", "x.txt"]
    assert names(dirs["failed"]) == names(dirs["work"]) == []
    said = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(said) == 1 and "does nothing until it is a directory again" in said[0], said
    dirs["incoming"].unlink()
    (tmp_path / "incoming.real").rename(dirs["incoming"])
    (dirs["incoming"] / "r1.txt").write_text("Back to work.")
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt"]


def test_a_file_the_daemon_cannot_take_out_of_incoming_is_left_and_said_once(
        front: FrontEnds, voices: FakeVoices, clock: Clock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A sticky incoming/ holding another user's file: the daemon may link it into work/ but not
    remove it. The link is undone (it stayed in work/ with two names, and a restart could never
    serve it), the error is logged once, not at every scan, and once the file can be taken
    (UNCLAIMABLE_RETRY later) it is served."""
    dirs = front.spool.dirs
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        if str(path).startswith(str(dirs["incoming"])):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        real_unlink(path, *args, **kw)

    monkeypatch.setattr(spool_module.os, "unlink", unlink)
    (dirs["incoming"] / "theirs.txt").write_text("Someone else's request.")
    with caplog.at_level("ERROR", logger="ttsd.spool"):
        for _ in range(5):
            settle_and_serve(front, clock, passes=1)
    assert names(dirs["work"]) == [] and names(dirs["incoming"]) == ["theirs.txt"] and voices.jobs == []
    assert os.stat(dirs["incoming"] / "theirs.txt").st_nlink == 1
    said = [r.getMessage() for r in caplog.records if "cannot claim" in r.getMessage()]
    assert len(said) == 1 and "must be able to move files out of" in said[0], said
    monkeypatch.setattr(spool_module.os, "unlink", real_unlink)
    clock.now += spool_module.UNCLAIMABLE_RETRY
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["theirs.txt"]


def test_a_finished_request_wakes_the_spool(front: FrontEnds, clock: Clock) -> None:
    """The next request is claimed as soon as a slot frees, not at the next rescan (at most 4
    requests a second per worker otherwise)."""
    (front.spool.dirs["incoming"] / "r1.txt").write_text("Hello.")
    front.spool._wake.clear()
    settle_and_serve(front, clock)
    assert names(front.spool.dirs["done"]) == ["r1.txt"] and front.spool._wake.is_set()


def test_a_folder_swapped_for_a_link_while_a_request_is_spoken_is_not_written_through(
        front: FrontEnds, voices: FakeVoices, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """out/ becomes a link to another folder while a request is spoken: the outputs are not
    written there (as root they replaced that folder's files); the request waits in work/."""
    dirs = front.spool.dirs
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "r1.json").write_text('{"important": true}')
    publish = Spool._publish

    def swapped_first(self: Spool, *args: Any) -> None:
        dirs["out"].rename(tmp_path / "out.real")
        dirs["out"].symlink_to(victim)
        publish(self, *args)

    monkeypatch.setattr(Spool, "_publish", swapped_first)
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    settle_and_serve(front, clock, passes=1)
    assert (victim / "r1.json").read_text() == '{"important": true}' and sorted(os.listdir(victim)) == ["r1.json"]
    assert names(dirs["work"]) == ["r1.txt"] and names(dirs["failed"]) == []


def test_a_spool_folder_that_is_a_link_at_start_up_stops_nothing(front: FrontEnds, voices: FakeVoices, clock: Clock,
                                                                 tmp_path: Path) -> None:
    """work/ is a link when the daemon starts: prepare says so and returns (it stopped the daemon:
    an internal error, a restart loop); once work/ is a folder again the claimed requests in it
    are taken up."""
    dirs = front.spool.dirs
    (tmp_path / "elsewhere").mkdir()
    dirs["work"].rename(tmp_path / "work.real")
    (tmp_path / "work.real" / "left.txt").write_text("Claimed before the restart.")
    dirs["work"].symlink_to(tmp_path / "elsewhere")
    restarted = Spool(dirs["incoming"].parent, voices.backend, concurrency=1)
    restarted.prepare()
    restarted.scan_now()  # nothing happens, nothing raises
    dirs["work"].unlink()
    (tmp_path / "work.real").rename(dirs["work"])
    front.spool = restarted
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["left.txt"]


def test_a_busy_queue_does_not_spin_the_spool(front: FrontEnds, voices: FakeVoices, clock: Clock) -> None:
    """The queue refuses (BusyError): the request waits in work/ for the Retry-After before it is
    submitted again (it was resubmitted at once, in a loop that kept a core busy)."""
    dirs = front.spool.dirs
    voices.submit_error = BusyError("queue full", retry_after=1)
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    settle_and_serve(front, clock, passes=1)
    tries = len(voices.jobs)
    (dirs["incoming"] / "r2.txt").write_text("Next.")
    front.spool_pass()
    clock.now += SETTLE_SECONDS  # r2 settled, but the queue said to wait a second: nothing claimed
    for _ in range(20):  # the same instant: neither submitted again nor claimed
        front.spool_pass()
    assert len(voices.jobs) == tries and names(dirs["work"]) == ["r1.txt"] and names(dirs["incoming"]) == ["r2.txt"]
    voices.submit_error = None
    clock.now += 1.0
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt", "r2.txt"]


def test_a_request_never_lands_in_failed_without_its_reason(front: FrontEnds, clock: Clock,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The error file is written first: a full disk there keeps the request claimed, and nothing
    is in failed/ (the request was moved first, and stayed there without a reason for good)."""
    dirs = front.spool.dirs
    real = spool_module.atomic_write_text

    def full(path: Path, text: str, mode: int | None = None, *, exclusive: bool = False) -> None:
        if path.parent == dirs["failed"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text, mode, exclusive=exclusive)

    monkeypatch.setattr(spool_module, "atomic_write_text", full)
    (dirs["incoming"] / "empty.txt").write_text("   ")
    settle_and_serve(front, clock, passes=1)
    assert names(dirs["failed"]) == [] and names(dirs["work"]) == ["empty.txt"]
    monkeypatch.setattr(spool_module, "atomic_write_text", real)
    clock.now += BACKOFF_MAX
    settle_and_serve(front, clock)
    assert names(dirs["failed"]) == ["empty.error.json", "empty.txt"]


def test_files_it_cannot_claim_do_not_hide_the_rest(front: FrontEnds, monkeypatch: pytest.MonkeyPatch) -> None:
    """More unclaimable files than a scan's batch, first in the directory: the requests after
    them are still listed (they waited for good behind a thousand files of another user)."""
    monkeypatch.setattr(spool_module, "SCAN_BATCH", 10)
    incoming = front.spool.dirs["incoming"]
    skip = {}
    for i in range(30):
        (incoming / f"theirs{i}.txt").write_text("x")
        # tried just now by the spool's clock (the machine's own monotonic time is the boot's: on a
        # box up less than a quarter of an hour it was a retry long overdue)
        skip[f"theirs{i}.txt"] = ((incoming / f"theirs{i}.txt").stat().st_ino, spool_module.time.monotonic())
    (incoming / "mine.txt").write_text("y")
    found, complete, passed = front.spool._list_incoming(skip)
    assert [name for name, _ in found] == ["mine.txt"] and complete and len(passed) == 30


def test_a_second_daemon_on_the_spool_is_refused(front: FrontEnds, voices: FakeVoices) -> None:
    """It took over the first one's claimed requests and spoke them again."""
    from ttsd.errors import ConfigError

    front.spool.lock()
    second = Spool(front.spool.root, voices.backend, concurrency=1)
    with pytest.raises(ConfigError, match="another ttsd serves this spool"):
        second.lock()


def test_an_invalid_name_twice_goes_to_failed_both_times(front: FrontEnds, clock: Clock) -> None:
    """A name too long to take a ~N tag: the second stayed in work/ for good (ENAMETOOLONG); each
    goes to failed/ under its cleaned and hashed name."""
    dirs = front.spool.dirs
    long_name = "a" * 251 + ".txt"
    for _ in range(2):
        (dirs["incoming"] / long_name).write_text("hi")
        settle_and_serve(front, clock)
    request, error = failed_names(long_name)
    stem = request.removesuffix(".request")
    assert names(dirs["failed"]) == sorted([request, error, f"{stem}~1.request", f"{stem}~1.error.json"])
    assert names(dirs["work"]) == []


def test_audio_that_fits_the_filesystem_is_not_failed_for_the_margin(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """1.16 MB of audio on a 2.1 MB filesystem fits: it was failed as 'more than the filesystem
    holds' (the 1 MB margin was counted against it), and on an emptied disk it is spoken."""
    fs = {"blocks": 2_100_000, "free": 0}

    class Fs:
        f_frsize = 1
        f_blocks = property(lambda self: fs["blocks"])
        f_bfree = f_bavail = property(lambda self: fs["free"])

    monkeypatch.setattr(spool_module.os, "statvfs", lambda path: Fs())
    assert spool_module._never_fits(tmp_path, 1_160_000) is None
    assert spool_module._never_fits(tmp_path, 2_200_000) is not None
    assert not spool_module._room_for(tmp_path, 1_160_000)
    fs["free"] = fs["blocks"]
    assert spool_module._room_for(tmp_path, 1_160_000)  # the margin shrinks to what the disk has
    for needs in range(1_900_000, 2_100_001, 5_000):  # what may wait is what an emptied disk takes
        assert (spool_module._never_fits(tmp_path, needs) is None) == spool_module._room_for(tmp_path, needs)


def test_a_request_served_then_kept_by_a_failure_goes_to_done(front: FrontEnds, voices: FakeVoices, clock: Clock,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Its outputs were published, then the move to done/ failed (an I/O error, done/ swapped):
    served again from work/ it goes to done/, not to failed/ as a duplicate of itself, and is not
    spoken again."""
    dirs = front.spool.dirs
    place = Spool._place

    def broken(self: Spool, claimed: Path, folder: str) -> str:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Spool, "_place", broken)
    (dirs["incoming"] / "r1.txt").write_text("Hello.")
    settle_and_serve(front, clock, passes=1)
    assert names(dirs["work"]) == ["r1.txt"] and (dirs["out"] / "r1.json").is_file()
    monkeypatch.setattr(Spool, "_place", place)
    clock.now += BACKOFF_MAX
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt"] and names(dirs["failed"]) == [] and len(voices.jobs) == 1


def test_a_spool_on_a_filesystem_without_locks_is_served(front: FrontEnds, voices: FakeVoices,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """flock failing for another reason than a holder (NFS without lockd) was taken for a
    second daemon, and the daemon would not start."""
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    Spool(front.spool.root, voices.backend, concurrency=1).lock()  # no error: a warning


def test_a_reason_left_without_its_request_by_a_kill_is_removed_at_the_restart(
        front: FrontEnds, voices: FakeVoices, clock: Clock) -> None:
    """A request fails: its error file is written first, then the request is moved beside it. A
    kill -9 between the two left the reason alone in failed/ for good, while the request, still
    in work/, was served again. The restart removes such a reason (its ~N form too, and an
    invalid name's hashed one); a reason whose request is beside it, or whose request is not in
    work/ (removed by hand), stays."""
    dirs = front.spool.dirs
    (dirs["work"] / "late.txt").write_text("Failed, then killed before it moved.")
    (dirs["failed"] / "late~2.error.json").write_text('{"error": {"code": "bad_file", "message": "x"}}')
    (dirs["work"] / "bad name!.txt").write_text("An invalid name.")
    lone = failed_names("bad name!.txt")[1]
    (dirs["failed"] / lone).write_text('{"error": {"code": "bad_id", "message": "x"}}')
    (dirs["failed"] / "kept.txt").write_text("Failed for good.")
    (dirs["failed"] / "kept.error.json").write_text('{"error": {"code": "bad_file", "message": "x"}}')
    (dirs["failed"] / "alone.error.json").write_text('{"error": {"code": "bad_file", "message": "x"}}')

    restarted = Spool(dirs["incoming"].parent, voices.backend, concurrency=1)
    restarted.prepare()
    assert names(dirs["failed"]) == ["alone.error.json", "kept.error.json", "kept.txt"]
    front.spool = restarted
    settle_and_serve(front, clock)
    assert "late.txt" in names(dirs["done"])


def test_a_claim_cut_off_by_a_kill_is_finished_at_the_restart(front: FrontEnds, voices: FakeVoices,
                                                               clock: Clock) -> None:
    """A claim links the request into work/, then removes its name in incoming/. A kill -9 between
    the two left one file under both names; the restart failed the claimed name for its other
    hard link and served the other, so the request ended in failed/ (which a client polling for
    ID.error.json takes as its answer) and in done/. Now it is served once, from work/. A file in
    incoming/ that is a hard link to another file in work/ (another inode) or with a third link
    is not touched."""
    dirs = front.spool.dirs
    (dirs["work"] / "cut.txt").write_text("Claimed when the daemon was killed.")
    os.link(dirs["work"] / "cut.txt", dirs["incoming"] / "cut.txt")
    (dirs["work"] / "twice.txt").write_text("Claimed.")
    (dirs["incoming"] / "twice.txt").write_text("Another file with the same name.")
    outside = dirs["incoming"].parent / "elsewhere.txt"  # a writer's hard link to its own file
    outside.write_text("Not the spool's.")
    os.link(outside, dirs["work"] / "linked.txt")
    os.link(outside, dirs["incoming"] / "linked.txt")

    restarted = Spool(dirs["incoming"].parent, voices.backend, concurrency=1)
    restarted.prepare()
    assert names(dirs["incoming"]) == ["linked.txt", "twice.txt"]
    assert os.stat(dirs["work"] / "cut.txt").st_nlink == 1
    front.spool = restarted
    settle_and_serve(front, clock)
    assert [job.text for job in voices.jobs].count("Claimed when the daemon was killed.") == 1
    assert "cut.txt" in names(dirs["done"]) and (dirs["out"] / "cut.json").is_file()
    assert not any(p.name.startswith("cut") for p in dirs["failed"].iterdir())


def test_a_cut_off_claim_that_cannot_finish_is_undone(front: FrontEnds, voices: FakeVoices,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The name in incoming/ of a claim cut off by a kill cannot be removed (a sticky incoming/
    holding another user's file): the restart logged "cannot move it to done/" and left the request
    in work/, served never. The claim is undone, as a claim that fails is: work/ lets it go."""
    dirs = front.spool.dirs
    (dirs["work"] / "theirs.txt").write_text("Another user's request.")
    os.link(dirs["work"] / "theirs.txt", dirs["incoming"] / "theirs.txt")
    real_unlink = os.unlink

    def sticky(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path) == dirs["incoming"] / "theirs.txt":
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", sticky)
    restarted = Spool(dirs["incoming"].parent, voices.backend, concurrency=1)
    restarted.prepare()
    assert names(dirs["work"]) == [] and names(dirs["incoming"]) == ["theirs.txt"]
    assert os.stat(dirs["incoming"] / "theirs.txt").st_nlink == 1


def test_the_folders_the_spool_makes_take_its_group_permissions(tmp_path: Path, voices: FakeVoices) -> None:
    """docs/spool.md: a spool dir writable by its writers' group (mode 2770). Under the example
    unit's UMask=0027 the daemon made incoming/ 0750 and every writer in the group was refused."""
    root = tmp_path / "group-spool"
    root.mkdir()
    os.chmod(root, 0o2770)
    old = os.umask(0o027)
    try:
        Spool(root, voices.backend, concurrency=1).prepare()
    finally:
        os.umask(old)
    for name in ("incoming", "work", "out", "done", "failed"):
        assert (root / name).stat().st_mode & 0o7777 == 0o2770, name
