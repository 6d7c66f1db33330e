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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile
from inproc import FakeVoices, FrontEnds

from ttsd.errors import ResourceError
from ttsd.front import spool as spool_module
from ttsd.front.spool import BACKOFF_FIRST, SETTLE_SECONDS, Spool


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
    """Scan, let the clock pass the settle time, and scan again until incoming/ is empty (one
    request is served per pass at concurrency 1)."""
    for _ in range(passes):
        front.spool_pass()
        clock.now += SETTLE_SECONDS
        front.spool_pass()
        if not any(front.spool.dirs["incoming"].iterdir()):
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
    assert 'ttsd_spool_requests_total{outcome="failed"} 1.0' in voices.metrics.render().decode()


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
    assert [name for name, _ in front.spool._list_incoming()] == []
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


def test_prepare_after_a_restart_requeues_or_finishes_claimed_requests(front: FrontEnds, voices: FakeVoices,
                                                                       clock: Clock, tmp_path: Path) -> None:
    """A daemon stopped (or killed) with requests in work/: the next ``prepare`` puts each back
    into incoming/, except one whose outputs were published (out/ID.json with this very request's
    sha256), which goes to done/. Leftover temp outputs are removed; hidden files stay."""
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
    (dirs["work"] / ".hidden").write_text("not a request")

    restarted = Spool(dirs["incoming"].parent, voices.backend, concurrency=1)
    restarted.prepare()
    assert names(dirs["incoming"]) == ["broken.txt", "fresh.txt", "other.txt"]
    assert names(dirs["done"]) == ["served.txt"]
    assert names(dirs["work"]) == [".hidden"]
    assert names(dirs["out"]) == ["broken.json", "other.json", "served.json", "served.wav"]
    assert voices.jobs == []  # nothing was spoken again for the served one

    settle_and_serve(front, clock)
    assert "fresh.txt" in names(dirs["done"]) and (dirs["out"] / "fresh.json").is_file()
    errors = {p.name: json.loads(p.read_text())["error"]["code"] for p in dirs["failed"].glob("*.error.json")}
    assert errors == {"other.error.json": "duplicate", "broken.error.json": "duplicate"}  # never overwritten


@pytest.mark.parametrize("where", ["submit", "engine"])
def test_a_system_failure_requeues_the_request_and_pauses_the_spool(front: FrontEnds, voices: FakeVoices,
                                                                    clock: Clock, where: str) -> None:
    """1. The box fails while a request is served (submit raises ResourceError; or the engine
    hits a full disk, which the pool turns into one): the request goes back to incoming/, not to
    failed/, and the spool pauses BACKOFF_FIRST seconds. 2. Settled, it is not claimed during the
    pause. 3. A second failure doubles the pause. 4. After it, the request is served."""
    dirs = front.spool.dirs
    failure = OSError(errno.ENOSPC, "No space left on device")
    if where == "submit":
        voices.submit_error = ResourceError("writing failed: No space left on device", storage=True)
    else:
        voices.engine("joe", "1").fail_with = failure
    (dirs["incoming"] / "r1.txt").write_text("Hello there.")
    settle_and_serve(front, clock, passes=1)
    assert names(dirs["incoming"]) == ["r1.txt"] and names(dirs["failed"]) == names(dirs["work"]) == []
    assert len(voices.jobs) == 1 and front.spool._paused_until == clock.now + BACKOFF_FIRST

    clock.now += SETTLE_SECONDS
    front.spool_pass()
    clock.now = front.spool._paused_until - 0.01  # settled long ago, but paused
    front.spool_pass()
    assert names(dirs["incoming"]) == ["r1.txt"] and len(voices.jobs) == 1

    clock.now += 0.01
    front.spool_pass()  # claimed, fails again: paused twice as long
    assert len(voices.jobs) == 2 and names(dirs["incoming"]) == ["r1.txt"]
    assert front.spool._paused_until == clock.now + 2 * BACKOFF_FIRST

    voices.submit_error = voices.engine("joe", "1").fail_with = None
    clock.now += 2 * BACKOFF_FIRST
    settle_and_serve(front, clock)
    assert names(dirs["done"]) == ["r1.txt"] and front.spool._backoff == 0.0
    assert voices.model_failures() == []
    metrics = voices.metrics.render().decode()
    assert 'ttsd_spool_requests_total{outcome="retry"} 2.0' in metrics
    assert 'ttsd_spool_requests_total{outcome="ok"} 1.0' in metrics
