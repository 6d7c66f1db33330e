"""Hostile requests, in-process: whatever a client sends (JSON of any shape, any field value,
any header) or drops into the spool, the answer is 2xx or 4xx, never 5xx, and no request error is
ever counted against the model (six counted failures would roll the good new version back).

The daemon's real parts serve here (Daemon wiring, manager, pool, aiohttp app, spool) on a tiny
multi-speaker VITS model, so the engine's own checks (speaker, seed) are exercised too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import plausible, save_tiny_vits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import FrontEnds
from test_spool import Clock, clock  # noqa: F401 - clock is a fixture

from ttsd.config import ServeConfig
from ttsd.daemon import Daemon
from ttsd.front.spool import SETTLE_SECONDS

FIELDS = ["text", "voice", "version", "format", "stream", "speed", "speaker", "noise_scale", "noise_w", "seed",
          "sentence_pause", "user"]
OPENAI_FIELDS = ["model", "input", "voice", "response_format", "speed", "user", "stream_format", "stream"]


class Harness:
    """A daemon's front ends in-process (``inproc.FrontEnds``), on one event loop kept for the whole module."""

    def __init__(self, root: Path) -> None:
        models = root / "models"
        for version in ("1", "2"):
            save_tiny_vits(models / f"tiny-{version}", version=version, edit=plausible, num_speakers=3,
                           speaker_embedding_size=4, noise_scale_duration=0.0)
        config = ServeConfig(models=models, state=root / "state", cache=root / "cache", socket=root / "s.sock",
                             max_chars=120, max_audio_seconds=30, seed_builtin=False, settle=0.0,
                             auto_rollback_requests=1000, auto_rollback_share=0.005)
        self.daemon = Daemon(config)
        self.daemon.manager.start()
        self.front = FrontEnds(self.daemon.backend(), root)
        self.spool = self.front.spool

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """The status and the JSON (or audio) of the answer. A streamed answer whose synthesis
        failed after its first audio (audio over --max-audio-seconds is found out as it is made)
        is cut short, as it must be: its status stands, the body is None."""
        try:
            reply = self.front.post(path, raw=body, headers=headers, tcp=True)
        except aiohttp.ClientPayloadError:
            return 200, None
        kind = reply.headers.get("Content-Type", "")
        return reply.status, reply.json() if kind.startswith("application/json") else reply.body

    def run(self, coro: Any) -> Any:
        return self.front.run(coro)

    def version_2(self) -> dict[str, Any]:
        voice = next(v for v in self.daemon.manager.snapshot() if v["name"] == "tiny")
        assert voice["active"] == "2", "a request error was counted: the good version was rolled back"
        return next(v for v in voice["versions"] if v["version"] == "2")

    def close(self) -> None:
        self.front.close()
        self.daemon.pool.shutdown()
        self.daemon.manager.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("hostile"))
    yield h
    h.close()


def check(status: int, body: Any, *, openai: bool = False) -> None:
    """2xx or 4xx, and an error in the route's shape (OpenAI's adds type and param)."""
    assert 200 <= status < 500, (status, body)
    if status >= 400:
        assert set(body["error"]) == ({"code", "message", "type", "param"} if openai else {"code", "message"}), body
        if openai:
            assert body["error"]["type"] == "invalid_request_error", body


scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
           | st.floats(allow_nan=False) | st.text(max_size=30) | st.sampled_from(["²", "1", "0", "-1", "wav", "pcm"]))


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(scalars, _containers, max_leaves=12)
texts = st.text(alphabet="abcdefghij ,.!?'²\u0301\n\t", min_size=0, max_size=60) | json_values
field_values = {name: (texts if name == "text" else json_values) for name in FIELDS}
requests_ = st.fixed_dictionaries({}, optional=field_values) | json_values
openai_requests = st.fixed_dictionaries({}, optional={n: texts if n == "input" else json_values
                                                      for n in OPENAI_FIELDS})
COMMON = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.slow
@settings(COMMON, max_examples=250)
@given(body=requests_, version_header=st.none() | st.text(max_size=80), user_header=st.none() | st.text(max_size=300))
def test_any_synthesize_request_is_answered_2xx_or_4xx(harness: Harness, body: Any, version_header: str | None,
                                                       user_header: str | None) -> None:
    headers = {}
    for name, value in (("X-Ttsd-Version", version_header), ("X-Ttsd-User", user_header)):
        if value is not None and value.isprintable() and value.isascii():
            headers[name] = value
    check(*harness.post("/v1/synthesize", json.dumps(body).encode(), headers))
    assert harness.version_2()["model_failures"] == 0


@settings(COMMON, max_examples=80)
@given(body=openai_requests)
def test_any_openai_request_is_answered_2xx_or_4xx(harness: Harness, body: Any) -> None:
    check(*harness.post("/v1/audio/speech", json.dumps(body).encode()), openai=True)
    assert harness.version_2()["model_failures"] == 0


@settings(COMMON, max_examples=60)
@given(raw=st.binary(max_size=200) | st.sampled_from([
    b"[" * 100_000, b'{"text": "hi", "speed": NaN}', b'{"text": "hi", "speed": 1e400}', b"\xff\xfe{}",
    b'{"text": "hi", "seed": ' + b"9" * 5000 + b"}"]))
def test_any_bytes_as_a_body_are_a_400(harness: Harness, raw: bytes) -> None:
    status, body = harness.post("/v1/synthesize", raw)
    check(status, body)


def test_a_number_too_long_is_refused_in_the_request_s_words() -> None:
    """Python refuses 4,300 digits itself, and its message told the client to call
    sys.set_int_max_str_digits(); a number of more than 40 digits is refused, saying so."""
    from ttsd.errors import RequestError
    from ttsd.front.speech_request import parse_json

    for digits in (41, 5000):
        with pytest.raises(RequestError, match=f"a number of {digits} digits; at most 40") as info:
            parse_json(b'{"text": "hi", "seed": -' + b"9" * digits + b"}")
        assert "sys." not in str(info.value)
    assert parse_json(b'{"seed": 18446744073709551615}') == {"seed": 2**64 - 1}


@pytest.mark.parametrize("body, code", [
    ({"text": "hello", "seed": 1180591620717411303424}, "bad_request"),  # outside int64: was a 500 and counted
    ({"text": "hello", "speaker": "²"}, "bad_request"),  # "²".isdigit() but not an index: was a 500
    ({"text": "hello", "speaker": 7}, "bad_request"),
    ({"text": "hello", "speaker": "alice"}, "bad_request"),
    ({"text": "hello", "speed": 10 ** 400}, "bad_request"),  # OverflowError: was a plain-text 500
    ({"text": "hello", "sentence_pause": 10 ** 400}, "bad_request"),
    ({"text": "hello", "seed": -1}, "bad_request"),
    ({"text": "a. " * 40, "sentence_pause": 5}, "audio_too_long"),  # 39 pauses of 5 s > 30 s
])
def test_each_finding_is_the_request_s_fault(harness: Harness, body: dict[str, Any], code: str) -> None:
    status, reply = harness.post("/v1/synthesize", json.dumps(body).encode())
    assert (status // 100, reply["error"]["code"]) == (4, code), reply
    assert harness.version_2()["model_failures"] == 0


def test_valid_options_still_speak(harness: Harness) -> None:
    status, wav = harness.post("/v1/synthesize", json.dumps(
        {"text": "hello there", "speaker": "2", "seed": 2 ** 64 - 1, "speed": 4, "sentence_pause": 5}).encode())
    assert status == 200 and wav[:4] == b"RIFF"


names = st.text(min_size=1, max_size=240).map(lambda s: s.replace("/", "_").replace("\x00", "_")) \
    | st.sampled_from(["r1.txt", "r1.json", "x.TXT", "a" * 230 + ".txt", "new\nline.txt", "-dash.json"])


@pytest.mark.slow
@settings(COMMON, max_examples=120)
@given(name=names, content=st.binary(max_size=120) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({}, optional=field_values).map(lambda v: json.dumps(v).encode()))
def test_any_spool_file_ends_done_or_failed_with_a_request_reason(harness: Harness, name: str,
                                                                  content: bytes) -> None:
    spool = harness.spool
    if name.startswith(".") or name.endswith(".tmp") or len(os.fsencode(name)) > 250:
        return  # never claimed (writers' temp files) or not a possible file name
    from ttsd.front.spool import failed_names

    claimed = spool.dirs["work"] / name
    claimed.write_bytes(content)
    harness.run(spool._serve(claimed))
    assert not claimed.exists() and not (spool.dirs["incoming"] / name).exists()
    where = [d for d, n in (("done", name), ("failed", failed_names(name)[0])) if (spool.dirs[d] / n).exists()]
    assert len(where) == 1
    if where == ["done"]:
        (spool.dirs["out"] / f"{Path(name).stem}.json").unlink()  # let the next example reuse the ID
    else:
        errors = [json.loads(p.read_text())["error"] for p in spool.dirs["failed"].glob("*.error.json")]
        assert errors and all(e["code"] not in ("internal", "synthesis_failed") for e in errors), errors
        for p in spool.dirs["failed"].iterdir():
            p.unlink()
    (spool.dirs["done"] / name).unlink(missing_ok=True)
    assert harness.version_2()["model_failures"] == 0


def scan_and_serve(harness: Harness, clock: Clock | None = None) -> None:  # noqa: F811 - the fixture's name
    """Scan and serve until incoming/ is empty. A regular file must keep its size for
    SETTLE_SECONDS before it is claimed: with ``clock`` (the spool's, see test_spool.py) the test
    moves time on, otherwise it waits."""

    async def go() -> None:
        for _ in range(40):
            harness.spool.scan_now()
            await harness.spool.drain()
            if not any(harness.spool.dirs["incoming"].iterdir()):
                return
            if clock is not None:
                clock.now += SETTLE_SECONDS
            else:
                await asyncio.sleep(0.1)
    harness.run(go())


def error_of(harness: Harness, name: str) -> dict[str, str]:
    from ttsd.front.spool_files import error_name as _error_name

    return json.loads((harness.spool.dirs["failed"] / _error_name(name)).read_text())["error"]


@pytest.mark.slow
def test_spool_never_follows_a_link_or_reads_an_oversized_or_special_file(harness: Harness, tmp_path: Path) -> None:
    """1. A symbolic and a hard link to a secret, a FIFO, a directory and a 2 MiB file are dropped
    into incoming/. 2. Each is claimed and refused with its reason; the secret is never spoken,
    the FIFO never blocks the spool, and the big file is refused from its size."""
    incoming = harness.spool.dirs["incoming"]
    secret = tmp_path / "secret.txt"
    secret.write_text("the token is hunter2")
    (incoming / "link.txt").symlink_to(secret)
    os.mkfifo(incoming / "pipe.txt")
    (incoming / "big.txt").write_bytes(b"a" * (2 << 20))
    os.link(secret, incoming / "hard.txt")  # a hard link: O_NOFOLLOW does not see it
    (incoming / "dir.txt").mkdir()
    scan_and_serve(harness)
    assert "other hard links" in error_of(harness, "hard.txt")["message"]
    assert "not a regular file" in error_of(harness, "dir.txt")["message"]
    assert "symbolic link" in error_of(harness, "link.txt")["message"]
    assert "not a regular file" in error_of(harness, "pipe.txt")["message"]
    assert error_of(harness, "big.txt")["code"] == "too_large"
    assert (harness.spool.dirs["failed"] / "link.txt").is_symlink()  # the link itself moved, not its target
    assert secret.read_text() == "the token is hunter2" and not list(harness.spool.dirs["out"].glob("link*"))
    assert not list(harness.spool.dirs["out"].glob("hard*"))
    # the hard link's name is removed, not kept in failed/ as a second name of the secret
    assert not (harness.spool.dirs["failed"] / "hard.txt").exists() and secret.stat().st_nlink == 1


@pytest.mark.slow
def test_spool_refuses_a_second_request_with_a_served_id(harness: Harness) -> None:
    """1. r7.txt is served. 2. r7.json arrives: it would overwrite out/r7.wav, so it is refused.
    3. Names too long for an error file, or with a newline, still end in failed/ with a reason."""
    spool = harness.spool
    (spool.dirs["incoming"] / "r7.txt").write_text("hello there")
    scan_and_serve(harness)
    wav = (spool.dirs["out"] / "r7.wav").read_bytes()
    (spool.dirs["incoming"] / "r7.json").write_text(json.dumps({"text": "a different text", "format": "wav"}))
    long_name, newline = "n" * 240 + ".txt", "two\nlines.txt"
    (spool.dirs["incoming"] / long_name).write_text("hello")
    (spool.dirs["incoming"] / newline).write_text("hello")
    scan_and_serve(harness)
    assert error_of(harness, "r7.json")["code"] == "duplicate"
    assert (spool.dirs["out"] / "r7.wav").read_bytes() == wav
    from ttsd.front.spool import failed_names

    assert error_of(harness, long_name)["code"] == "bad_name"
    assert (spool.dirs["failed"] / failed_names(long_name)[0]).exists()  # under its hashed name
    assert "two\\nlines.txt" in error_of(harness, newline)["message"]
    assert not list(spool.dirs["work"].iterdir()) and not list(spool.dirs["incoming"].iterdir())


def test_spool_outputs_follow_the_umask(harness: Harness) -> None:
    old = os.umask(0o027)
    try:
        (harness.spool.dirs["incoming"] / "shared.txt").write_text("hello")
        scan_and_serve(harness)
    finally:
        os.umask(old)
    for name in ("shared.wav", "shared.json"):
        assert (harness.spool.dirs["out"] / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.slow
def test_a_second_request_with_an_id_in_service_waits_and_never_overwrites_it(harness: Harness, clock: Clock) -> None:  # noqa: F811
    """With --workers 2 a second race.txt, dropped while the first was being served, was moved
    over it in work/: the first request file was lost and the outputs mixed. Now it waits in
    incoming/ while the ID is in service, then meets the first one's outputs and is refused."""
    spool = harness.spool
    spool.concurrency = 2
    try:
        first, second = "hello there first", "a second and different request"
        (spool.dirs["incoming"] / "race.txt").write_text(first)

        async def go() -> None:
            spool.scan_now()  # seen
            clock.now += SETTLE_SECONDS
            spool.scan_now()  # settled: claimed, and served until the next await
            assert "race" in spool._serving
            (spool.dirs["incoming"] / "race.txt").write_text(second)
            spool.scan_now()
            clock.now += SETTLE_SECONDS
            spool.scan_now()  # settled too, but its ID is in service
            assert (spool.dirs["incoming"] / "race.txt").read_text() == second  # not claimed meanwhile
            await spool.drain()

        harness.run(go())
        scan_and_serve(harness, clock)
        assert (spool.dirs["done"] / "race.txt").read_text() == first
        assert error_of(harness, "race.txt")["code"] == "duplicate"
        assert (spool.dirs["failed"] / "race.txt").read_text() == second
    finally:
        spool.concurrency = 1


def test_a_stream_that_fails_after_its_first_audio_is_cut_off_not_mixed(harness: Harness,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The audio limit is crossed after streaming began (status 200 already sent): the connection
    is dropped without the final chunk, so the client knows; it is counted as the request's fault,
    and nothing is logged as an internal error."""
    import aiohttp

    body = {"text": "hello there. " * 9, "speed": 0.25, "sentence_pause": 2.5}  # pauses alone: 20 of 30 s
    status, reply = harness.post("/v1/synthesize", json.dumps(body).encode())
    assert (status, reply["error"]["code"]) == (413, "audio_too_long"), "the text must cross the 30 s limit"

    async def stream() -> tuple[int, bool]:
        async with harness.front.tcp.post("/v1/synthesize", json={**body, "stream": True}) as resp:
            try:
                await resp.read()
                return resp.status, False
            except aiohttp.ClientPayloadError:
                return resp.status, True

    with caplog.at_level(logging.WARNING):
        status, cut = harness.run(stream())
    assert status == 200 and cut
    assert "internal error" not in caplog.text and "after its first audio" in caplog.text
    assert harness.version_2()["model_failures"] == 0


@pytest.mark.slow
def test_a_client_gone_mid_body_is_not_an_internal_error(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    host, port = harness.front.host, harness.front.port
    with caplog.at_level(logging.DEBUG, logger="ttsd.http"):
        with socket.create_connection((host, port), timeout=5) as conn:
            conn.sendall(b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\":")
        harness.run(asyncio.sleep(0.3))
    assert "internal error" not in caplog.text
    status, _ = harness.post("/v1/synthesize", json.dumps({"text": "still here"}).encode())
    assert status == 200


MALFORMED = [
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", "8190 bytes"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"b" * 20000 + b"\r\n\r\n", "8190 bytes"),
    (b"GET / HTTP/9.1\r\nHost: localhost\r\n\r\n", "Invalid HTTP version"),
    (b"POST /v1/synthesize HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
]


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "unix"])
def test_a_request_aiohttp_cannot_parse_gets_a_json_400_and_one_short_log_line(
        harness: Harness, caplog: pytest.LogCaptureFixture, tcp: bool) -> None:
    """Framing no HTTP parser takes is answered as every other error (JSON, the same status),
    without the framework's traceback; twenty times over are a few warning lines, the rest at
    debug: a client that needs no token cannot flood the log."""

    async def send(raw: bytes) -> bytes:
        if tcp:
            reader, writer = await asyncio.open_connection(harness.front.host, harness.front.port)
        else:
            reader, writer = await asyncio.open_unix_connection(str(harness.front.socket))
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the connection is closed after it
        writer.close()
        return answer

    with caplog.at_level(logging.DEBUG):
        for raw, said in MALFORMED:
            head, _, body = harness.run(send(raw)).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 400 ") and b"application/json" in head, head
            error = json.loads(body)["error"]
            assert error["code"] == "bad_http" and said in error["message"] and len(error["message"]) < 260, error
        for _ in range(20):
            harness.run(send(MALFORMED[0][0]))
    records = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(records) == 25 and all("\n" not in r.getMessage() and not r.exc_info for r in records)
    assert sum(r.levelno == logging.WARNING for r in records) <= 6  # once a minute after the first five
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.WARNING]
    status, _ = harness.post("/v1/synthesize", json.dumps({"text": "still here"}).encode())
    assert status == 200


@pytest.mark.parametrize("voice, body, status", [
    ("tiny", {"version": "x" * 100}, 400),  # kept in the state: a real version only
    ("tiny", {"version": ["2"]}, 400),
    ("tiny", {"version": "9", "reason": "line\nbreak"}, 400),
    ("tiny", {"version": "9", "reason": "r" * 301}, 400),
    ("nobody", {"version": "1"}, 404),  # nothing is recorded for a voice the daemon never had
])
def test_a_bad_withdrawal_is_refused_and_nothing_is_recorded(harness: Harness, voice: str, body: dict[str, Any],
                                                             status: int) -> None:
    reply = harness.front.post(f"/v1/voices/{voice}/withdraw", raw=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    assert reply.status == status, reply.body[:300]
    record = harness.daemon.manager.state.voice(voice)
    assert record.rolled_back == () and "nobody" not in harness.daemon.manager.state.voices()
    assert harness.version_2()["state"] == "active"


def test_http_1_0_gets_the_whole_answer_and_real_statuses(harness: Harness) -> None:
    """HTTP/1.0 has no chunked encoding (nginx speaks it to upstreams by default): a streamed
    request, as the OpenAI route's default is, gets the whole file with its length, so a failure
    is a real status, not a stream cut off that looks whole at the close. It was a 500 with a
    traceback in the log for every such request."""

    async def send(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(harness.front.socket))
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)  # up to the close
        writer.close()
        return answer

    for path, body in [("/v1/synthesize", {"text": "Hi there.", "stream": True}),
                       ("/v1/audio/speech", {"input": "Hi there.", "model": "tts-1", "response_format": "wav"})]:
        data = json.dumps(body).encode()
        head, _, audio = harness.run(send(
            f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data)).partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"200" and b"chunked" not in head.lower(), head
        assert audio[:4] == b"RIFF" and len(audio) > 10_000, (path, audio[:100])
        assert f"content-length: {len(audio)}".encode() in head.lower(), head
    data = json.dumps({"text": "a. " * 40, "sentence_pause": 5, "stream": True}).encode()  # over 30 s of audio
    head, _, body = harness.run(send(
        f"POST /v1/synthesize HTTP/1.0\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)).partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"413" and json.loads(body)["error"]["code"] == "audio_too_long", head


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(harness: Harness) -> None:
    """Content-Length: 10 GB is a 413 at once, not a 408 after the body's 30 s."""

    async def send() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(harness.front.socket))
        writer.write(b"POST /v1/synthesize HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000000\r\n\r\n{")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        writer.close()
        return answer

    head, _, body = harness.run(send()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and json.loads(body)["error"]["code"] == "body_too_large", head
