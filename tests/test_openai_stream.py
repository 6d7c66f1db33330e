"""``POST /v1/audio/speech`` streams, as OpenAI's endpoint does: the official ``openai`` client's
``with_streaming_response`` gets each format's audio as the voice makes it (chunked, no
Content-Length), ``stream_format: "sse"`` wraps the same bytes in OpenAI's server-sent events,
errors before the first byte are JSON in OpenAI's shape, one after it cuts the stream, and a
client that hangs up cancels the rest (issue 28, item 1).

Most tests run over ``FakeVoices`` (see ``inproc``): sentence-by-sentence tone voices behind a
valve, so "the first audio came before the second sentence was made" is shown without timing.
The timing itself is measured once, on a real tiny VITS voice behind the daemon's own wiring.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import numpy as np
import openai
import pytest
import soundfile
from conftest import plausible, save_tiny_vits
from inproc import FakeVoices, FrontEnds, until
from openai import OpenAI
from test_formats import SLACK, seconds

from ttsd import encoding
from ttsd.audio import wav_stream_header
from ttsd.config import ServeConfig
from ttsd.daemon import Daemon

VOICES = {"joe": {"1": {"tone": 440}}, "ann": {"1": {"tone": 550, "sample_rate": 22050}}}
LONG = " ".join(f"Sentence {i} keeps the worker busy." for i in range(12))
TYPES = {"pcm": "audio/L16", "wav": "audio/wav", "opus": "audio/opus", "aac": "audio/aac", "mp3": "audio/mpeg",
         "flac": "audio/flac", "ogg": "audio/ogg"}
T = TypeVar("T")


@pytest.fixture
def voices(tmp_path: Path) -> Iterator[FakeVoices]:
    v = FakeVoices(tmp_path, VOICES, default_voice="joe")
    yield v
    v.close()


def client_of(front: FrontEnds) -> OpenAI:
    return OpenAI(base_url=f"http://{front.host}:{front.port}/v1", api_key="unused", max_retries=0, timeout=60)


def in_thread(front: FrontEnds, call: Callable[[], T]) -> T:
    """A blocking client call, with the server's event loop running meanwhile."""
    return front.run(asyncio.to_thread(call))


def speech(client: OpenAI, fmt: str, text: str = LONG, **extra: Any) -> Any:
    """``with_streaming_response.create`` (a context manager) for the default voice."""
    return client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=text, response_format=fmt, extra_body=extra or None)  # type: ignore[arg-type]


def events(body: bytes) -> list[dict[str, Any]]:
    """An SSE body's events: each ``data:`` line's JSON (ttsd sends no other field)."""
    blocks = [b for b in body.split(b"\n\n") if b]
    assert all(b.startswith(b"data: ") and b.count(b"\n") == 0 for b in blocks), body[:200]
    return [json.loads(b[len(b"data: "):]) for b in blocks]


def audio_of(found: list[dict[str, Any]]) -> bytes:
    """The audio the deltas carry; the last event, alone, is the done event."""
    assert [e["type"] for e in found] == ["speech.audio.delta"] * (len(found) - 1) + ["speech.audio.done"]
    assert all(set(e) == {"type", "audio"} for e in found[:-1])
    return b"".join(base64.b64decode(e["audio"]) for e in found[:-1])


def metric(front: FrontEnds, line: str) -> bool:
    return line in front.get("/metrics").body.decode()


# -- audio as it is made -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pcm", "wav", "opus", "aac", "mp3"])
def test_each_streamable_format_arrives_as_the_voice_speaks(api: FrontEnds, voices: FakeVoices, fmt: str) -> None:
    """1. 12 sentences; the voice may make one. The official client's first bytes arrive, chunked
    and without Content-Length, while the second sentence is not made. 2. The rest: pcm is
    exactly the audio the voice made in streamed pieces, wav that behind a streaming header, the
    encoded formats one continuous file as long as it."""
    joe = voices.engine("joe", "1")
    client = client_of(api)

    def go() -> tuple[httpx2.Headers, int, bytes]:
        joe.valve.close()
        joe.valve.allow(1)
        with speech(client, fmt) as reply:
            chunks = reply.iter_bytes()
            first = next(chunks)
            made_then = joe.rendered
            joe.valve.open()
            return reply.headers, made_then, first + b"".join(chunks)

    headers, made_then, body = in_thread(api, go)
    assert made_then == 1, "the first audio waited for the second sentence"
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert headers["content-type"].split(";")[0] == TYPES[fmt] and headers["x-ttsd-voice"] == "joe"
    made = joe.expected(LONG, pieces=True)
    if fmt == "pcm":
        assert body == made
    elif fmt == "wav":
        assert body == wav_stream_header(16000) + made
    else:
        assert seconds(body, fmt, 16000) == pytest.approx(len(made) / 2 / 16000, abs=SLACK)
    assert metric(api, 'ttsd_requests_total{outcome="ok",route="openai",version="1",voice="joe"} 1.0')
    client.close()


def test_the_stream_is_the_same_audio_as_the_whole_file_and_as_the_native_route_s(api: FrontEnds,
                                                                                  voices: FakeVoices) -> None:
    """1. pcm streamed (the default) is byte for byte /v1/synthesize's streamed pcm, and the wav
    stream reads (soundfile) as the same samples. 2. ``"stream": false`` asks for the whole file:
    Content-Length and the audio headers, as long as the stream and the same waveform, only
    scaled (whole sentences are peak-normalised; streamed pieces take the voice's warm-up gain)."""
    client = client_of(api)

    def get(fmt: str, **extra: Any) -> tuple[httpx2.Headers, bytes]:
        with speech(client, fmt, **extra) as reply:
            return reply.headers, reply.read()

    _, streamed = in_thread(api, lambda: get("pcm"))
    _, wav = in_thread(api, lambda: get("wav"))
    headers, whole = in_thread(api, lambda: get("pcm", stream=False))
    native = api.post("/v1/synthesize", {"text": LONG, "format": "pcm", "stream": True})
    assert streamed == native.body
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert rate == 16000 and samples.tobytes() == streamed
    assert int(headers["content-length"]) == len(whole) and "transfer-encoding" not in headers
    assert float(headers["x-ttsd-audio-seconds"]) == pytest.approx(len(whole) / 2 / 16000, abs=1e-3)
    a, b = (np.frombuffer(x, dtype="<i2").astype(np.float64) for x in (streamed, whole))
    assert a.shape == b.shape and np.corrcoef(a, b)[0, 1] > 0.999
    client.close()


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_formats_that_cannot_stream_come_whole(api: FrontEnds, voices: FakeVoices, fmt: str) -> None:
    reply = api.post("/v1/audio/speech", {"model": "tts-1", "input": LONG, "response_format": fmt})
    assert reply.status == 200 and reply.headers["Content-Type"] == TYPES[fmt]
    assert int(reply.headers["Content-Length"]) == len(reply.body) and "Transfer-Encoding" not in reply.headers
    assert soundfile.info(io.BytesIO(reply.body)).duration == pytest.approx(
        float(reply.headers["X-Ttsd-Audio-Seconds"]), abs=0.01)


def test_mp3_streams_with_pyav_and_comes_whole_without(api: FrontEnds, voices: FakeVoices,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """mp3, OpenAI's default format: streamed through PyAV; on a box without PyAV the whole file
    from libsndfile, as before (aac there is still a 501)."""
    body = {"model": "tts-1", "input": "Hello there. Second sentence."}
    streamed = api.post("/v1/audio/speech", body)
    assert streamed.status == 200 and streamed.headers["Transfer-Encoding"] == "chunked"
    monkeypatch.setattr(encoding, "_installed", lambda module: module != "av")
    whole = api.post("/v1/audio/speech", body)
    assert whole.status == 200 and int(whole.headers["Content-Length"]) == len(whole.body)
    assert whole.headers["Content-Type"] == "audio/mpeg" and soundfile.info(io.BytesIO(whole.body)).frames > 0
    sse = api.post("/v1/audio/speech", {**body, "stream_format": "sse"})  # whole, as one event
    assert sse.status == 200 and audio_of(events(sse.body)) == whole.body
    aac = api.post("/v1/audio/speech", {**body, "response_format": "aac"})
    assert (aac.status, aac.error["code"], aac.error["type"]) == (501, "format_unavailable", "server_error")


# -- server-sent events ----------------------------------------------------------------------------------
def test_sse_carries_the_same_audio_as_the_plain_stream(api: FrontEnds, voices: FakeVoices) -> None:
    """1. ``stream_format: "sse"`` through the official client: text/event-stream, chunked; the
    first speech.audio.delta arrives before the second sentence is made. 2. The deltas' base64
    audio, joined, is the plain pcm stream, and the last event is speech.audio.done with a usage
    (the input's characters as input tokens; ttsd makes no output tokens). 3. wav the same."""
    joe = voices.engine("joe", "1")
    client = client_of(api)

    def go(fmt: str) -> tuple[httpx2.Headers, int, bytes]:
        joe.valve.close()
        joe.valve.allow(1)
        with speech(client, fmt, stream_format="sse") as reply:
            chunks = reply.iter_bytes()
            first = next(chunks)
            made_then = joe.rendered
            joe.valve.open()
            return reply.headers, made_then, first + b"".join(chunks)

    headers, made_then, body = in_thread(api, lambda: go("pcm"))
    assert made_then == 1 and body.startswith(b'data: {"type":"speech.audio.delta","audio":"')
    assert headers["content-type"] == "text/event-stream" and headers["transfer-encoding"] == "chunked"
    assert headers["x-ttsd-sample-rate"] == "16000" and "content-length" not in headers
    found = events(body)
    assert len(found) > 2 and audio_of(found) == joe.expected(LONG, pieces=True)
    assert found[-1] == {"type": "speech.audio.done",
                         "usage": {"input_tokens": len(LONG), "output_tokens": 0, "total_tokens": len(LONG)}}
    _, _, wav = in_thread(api, lambda: go("wav"))
    assert audio_of(events(wav)) == wav_stream_header(16000) + joe.expected(LONG, pieces=True)
    client.close()


@pytest.mark.parametrize("fmt", ["opus", "flac"])
def test_sse_takes_every_format_openai_names(api: FrontEnds, voices: FakeVoices, fmt: str) -> None:
    """OpenAI's API takes stream_format "sse" with any response_format, and so does ttsd: opus
    streams in many deltas; flac, which cannot stream, comes whole in one delta (Content-Length)."""
    reply = api.post("/v1/audio/speech", {"model": "tts-1", "input": LONG, "response_format": fmt,
                                          "stream_format": "sse"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/event-stream"
    found = events(reply.body)
    audio = audio_of(found)
    assert seconds(audio, fmt, 16000) == pytest.approx(len(voices.engine("joe", "1").expected(LONG)) / 2 / 16000,
                                                       abs=SLACK)
    if fmt == "flac":
        assert len(found) == 2 and int(reply.headers["Content-Length"]) == len(reply.body)
    else:
        assert len(found) > 12 and reply.headers["Transfer-Encoding"] == "chunked"


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, param, fragment", [
    ({"stream_format": "chunks"}, "stream_format", "stream_format 'chunks' is not supported (use audio or sse)"),
    ({"stream_format": 1}, None, "field 'stream_format' must be a str"),
    ({"stream_format": "sse", "stream": False}, "stream", "'sse' always streams"),
    ({"stream": "yes"}, None, "field 'stream' must be a bool"),
    ({"response_format": "m4a"}, "response_format", "m4a"),
    ({"input": "   "}, "input", "text is empty"),
    ({"input": "!?"}, "input", "text has nothing to speak"),
])
def test_a_bad_stream_request_is_a_400_in_openai_s_shape(api: FrontEnds, voices: FakeVoices, extra: dict[str, Any],
                                                         param: str | None, fragment: str) -> None:
    """The official client raises ``BadRequestError`` carrying OpenAI's error fields; nothing was
    synthesized."""
    client = client_of(api)
    fmt = extra.pop("response_format", "pcm")
    text = extra.pop("input", LONG)

    def go() -> None:
        with speech(client, fmt, text, **extra):
            pass

    with pytest.raises(openai.BadRequestError) as caught:
        in_thread(api, go)
    error = caught.value
    assert (error.status_code, error.code, error.type, error.param) == (400, "bad_request", "invalid_request_error",
                                                                        param)
    assert fragment in error.message and set(error.body) == {"message", "type", "param", "code"}  # type: ignore[call-overload]
    assert voices.engine("joe", "1").asked == []
    client.close()


def test_errors_before_the_first_byte_are_json_with_their_status(api: FrontEnds, voices: FakeVoices) -> None:
    """An unknown voice (404) and a voice failing on its first sentence (500): proper statuses,
    OpenAI's error shape, and the client's matching exceptions; the route's other errors too."""
    client = client_of(api)

    def go(voice: str) -> None:
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice=voice, input=LONG,
                                                                response_format="pcm"):
            pass

    with pytest.raises(openai.NotFoundError) as missing:
        in_thread(api, lambda: go("nobody"))
    assert (missing.value.code, missing.value.type) == ("unknown_voice", "invalid_request_error")
    voices.engine("joe", "1").fail_with = RuntimeError("boom")
    with pytest.raises(openai.InternalServerError) as failed:
        in_thread(api, lambda: go("alloy"))
    assert (failed.value.code, failed.value.type, failed.value.param) == ("synthesis_failed", "server_error", None)
    too_big = api.post("/v1/audio/speech", raw=b"[" + b" " * (1 << 20) + b"]")
    assert (too_big.status, set(too_big.error)) == (413, {"message", "type", "param", "code"})
    native = api.post("/v1/synthesize", {"text": "x", "voice": "nobody"})  # ttsd's own route keeps its shape
    assert set(native.error) == {"code", "message"}
    client.close()


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_failure_after_the_first_byte_cuts_the_stream(api: FrontEnds, voices: FakeVoices,
                                                         stream_format: str) -> None:
    """The voice fails on its second sentence, after the 200 and the first audio went out. The
    client gets no error JSON in the audio: the connection closes without the chunked body's last
    chunk, which httpx2 (so the official client) raises as an incomplete read; an SSE stream also
    never gets its speech.audio.done. The failure is counted as the model's."""
    joe = voices.engine("joe", "1")
    client = client_of(api)
    got: list[bytes] = []

    def go() -> None:
        joe.valve.close()
        joe.valve.allow(1)
        with speech(client, "pcm", stream_format=stream_format) as reply:
            assert reply.status_code == 200
            chunks = reply.iter_bytes()
            got.append(next(chunks))
            joe.fail_with = RuntimeError("boom")
            joe.valve.open()
            for chunk in chunks:
                got.append(chunk)

    with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
        in_thread(api, go)
    body = b"".join(got)
    assert body and b'"error"' not in body
    if stream_format == "sse":
        assert {e["type"] for e in events(body)} == {"speech.audio.delta"}
    else:  # the first sentence's audio, as made
        joe.fail_with = None
        assert body == joe.expected(LONG.split(". ")[0] + ".", pieces=True)
    assert metric(api, 'ttsd_request_failures_total{fault="model",route="openai",version="1",voice="joe"} 1.0')
    client.close()


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_client_that_hangs_up_mid_stream_cancels_the_rest(api: FrontEnds, voices: FakeVoices,
                                                            stream_format: str) -> None:
    """1. 12 sentences; the voice may make one. 2. The official client takes the first audio and
    leaves its ``with`` block, closing the connection. 3. The job is told to stop, and stops after
    the sentence under way: 2 of 12 made, counted as cancelled, the lease neither a success nor
    the model's failure."""
    joe = voices.engine("joe", "1")
    client = client_of(api)

    def go() -> None:
        joe.valve.close()
        joe.valve.allow(1)
        with speech(client, "opus", stream_format=stream_format) as reply:
            assert next(reply.iter_bytes())

    in_thread(api, go)

    async def rest() -> None:
        await until(lambda: bool(voices.jobs) and voices.jobs[-1].cancel.is_set(), "the job to be cancelled")
        joe.valve.open()
        await until(lambda: bool(voices.released), "the lease to end")

    api.run(rest())
    assert joe.rendered == 2
    assert voices.released == [(("joe", "1"), None)] and voices.pool.cancelled == 1
    assert metric(api, 'ttsd_requests_total{outcome="cancelled",route="openai",version="1",voice="joe"} 1.0')
    assert voices.pool.depth() == (0, 0)
    client.close()


# -- the timing, on a real voice ---------------------------------------------------------------------
class TinyDaemon:
    """The daemon's own wiring (manager, pool, aiohttp app) in-process over a tiny random VITS."""

    def __init__(self, root: Path) -> None:
        save_tiny_vits(root / "models" / "tiny-1", edit=plausible)
        config = ServeConfig(models=root / "models", state=root / "state", cache=root / "cache",
                             socket=root / "s.sock", seed_builtin=False, settle=0.0)
        self.daemon = Daemon(config)
        self.daemon.manager.start()
        self.front = FrontEnds(self.daemon.backend(), root)

    def close(self) -> None:
        self.front.close()
        self.daemon.pool.shutdown()
        self.daemon.manager.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyDaemon]:
    t = TinyDaemon(tmp_path_factory.mktemp("tiny"))
    yield t
    t.close()


# 12 sentences of ~80 characters (the tiny voice knows letters, spaces and apostrophes): ~0.5 s of
# synthesis on one core of a 2-core Xeon, the first piece ~0.01-0.04 s in
TWELVE = " ".join(f"sentence {letter} " + "keeps the worker busy " * 3 + "." for letter in "abcdefghijkl")


@pytest.mark.parametrize("fmt, stream_format", [("pcm", "audio"), ("wav", "audio"), ("opus", "audio"),
                                                ("pcm", "sse")])
def test_the_first_audio_arrives_long_before_the_last(tiny: TinyDaemon, fmt: str, stream_format: str) -> None:
    """Measured with the official client on a real (tiny) VITS voice: the first chunk arrives in
    under a third of the time the whole reply takes (it came at ~3% on an idle box; before
    streaming, first and last byte came together)."""
    client = client_of(tiny.front)

    def timed() -> tuple[float, float, int]:
        started = time.monotonic()
        first, size = None, 0
        with speech(client, fmt, text=TWELVE, stream_format=stream_format) as reply:
            assert reply.status_code == 200 and "content-length" not in reply.headers
            for chunk in reply.iter_bytes():
                first = time.monotonic() - started if first is None else first
                size += len(chunk)
        assert first is not None
        return first, time.monotonic() - started, size

    in_thread(tiny.front, timed)  # warm: the first request of a voice pays for lazy setup
    first, last, size = in_thread(tiny.front, timed)
    assert size > 100_000
    assert first < last / 3, f"first chunk at {first:.3f} s of {last:.3f} s"
    client.close()
