"""The HTTP API in-process: the daemon's aiohttp app on its own listeners over a fake backend
(``FakeEngine`` voices in a real ``ServingMap``, a real ``SynthesisPool``; see ``inproc``).

What a real process alone shows (the real voice, the socket's mode, signals) stays in
``test_daemon.py`` and ``test_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from inproc import FakeVoices, FrontEnds, Reply, until

from ttsd.audio import wav_stream_header
from ttsd.errors import ConflictError
from ttsd.options import SynthesisOptions

# joe is the default voice (ann would be the first by name); joe 2 is active, joe 1 is loaded too
VOICES = {"joe": {"1": {"tone": 330}, "2": {"tone": 440}}, "ann": {"1": {"tone": 550, "sample_rate": 22050}}}
TEXT = "The first sentence is short. The second one is a little bit longer than the first."
LONG = " ".join(f"Sentence {i} keeps the worker busy." for i in range(12))
TOKEN = "a-token-of-twenty-chars"


@pytest.fixture
def voices(tmp_path: Path) -> Iterator[FakeVoices]:
    """1 worker and a queue of 1, like test_daemon's daemon; texts up to 5000 characters."""
    v = FakeVoices(tmp_path, VOICES, default_voice="joe")
    yield v
    v.close()


def pcm(reply: Reply) -> np.ndarray:
    """A WAV reply's samples as 16-bit integers."""
    samples, _ = soundfile.read(io.BytesIO(reply.body), dtype="int16")
    return samples  # type: ignore[no-any-return]


def close_to(a: np.ndarray | bytes, b: np.ndarray | bytes) -> bool:
    """Same 16-bit samples, give or take the rounding of one encoder against another."""
    x = np.frombuffer(a, dtype="<i2") if isinstance(a, bytes) else a
    y = np.frombuffer(b, dtype="<i2") if isinstance(b, bytes) else b
    return x.shape == y.shape and int(np.max(np.abs(x.astype(np.int32) - y.astype(np.int32)))) <= 2


# -- synthesis ---------------------------------------------------------------------------------------
def test_wav_and_its_headers(api: FrontEnds, voices: FakeVoices) -> None:
    reply = api.post("/v1/synthesize", {"text": TEXT, "seed": 3, "speed": 1.5})
    assert reply.status == 200 and reply.headers["Content-Type"] == "audio/wav"
    assert (reply.headers["X-Ttsd-Voice"], reply.headers["X-Ttsd-Version"]) == ("joe", "2")
    assert reply.headers["X-Ttsd-Sample-Rate"] == "16000"
    joe = voices.engine("joe", "2")
    assert (joe.asked[-1].seed, joe.asked[-1].speed) == (3, 1.5)  # the options reached the engine
    samples, rate = soundfile.read(io.BytesIO(reply.body), dtype="int16")
    assert rate == 16000
    assert close_to(samples, joe.expected(TEXT, SynthesisOptions(seed=3, speed=1.5)))
    assert float(reply.headers["X-Ttsd-Audio-Seconds"]) == pytest.approx(len(samples) / rate, abs=1e-3)
    assert float(reply.headers["X-Ttsd-Synthesis-Seconds"]) >= 0
    assert voices.released == [(("joe", "2"), True)]


@pytest.mark.parametrize("fmt, kind", [("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG"), ("mp3", "MP3")])
def test_every_file_format(api: FrontEnds, voices: FakeVoices, fmt: str, kind: str) -> None:
    reply = api.post("/v1/synthesize", {"text": "Formats.", "format": fmt})
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["Content-Type"] == {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg",
                                              "mp3": "audio/mpeg"}[fmt]
    info = soundfile.info(io.BytesIO(reply.body))
    assert info.format == kind and info.samplerate == 16000
    assert info.duration == pytest.approx(float(reply.headers["X-Ttsd-Audio-Seconds"]), abs=0.1)


def test_pcm_is_the_raw_samples(api: FrontEnds, voices: FakeVoices) -> None:
    reply = api.post("/v1/synthesize", {"text": TEXT, "format": "pcm", "voice": "ann"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "audio/L16; rate=22050; channels=1"
    assert reply.headers["X-Ttsd-Sample-Rate"] == "22050"
    assert reply.body == voices.engine("ann", "1").expected(TEXT)


def test_streaming_sends_a_wav_header_then_each_sentence_as_it_is_made(api: FrontEnds, voices: FakeVoices) -> None:
    """1. The whole reply as PCM. 2. The same text streamed, with one sentence let through: the
    status, the WAV header and that sentence arrive while the second is not yet made. 3. The rest:
    the same samples as the whole reply, each sentence scaled by the warm-up gain instead of
    normalised. 4. Streamed PCM is the WAV stream without its header."""
    joe = voices.engine("joe", "2")
    whole = api.post("/v1/synthesize", {"text": TEXT, "format": "pcm", "seed": 5}).body
    assert whole == joe.expected(TEXT, SynthesisOptions(seed=5))
    first = len(joe.expected(TEXT.split(". ")[0] + ".", pieces=True))
    joe.rendered = 0

    async def stream() -> tuple[dict[str, str], bytes]:
        joe.valve.close()
        joe.valve.allow(1)
        async with api.unix.post("/v1/synthesize", json={"text": TEXT, "stream": True, "seed": 5}) as resp:
            assert resp.status == 200
            head = await resp.content.readexactly(44 + first)
            assert joe.rendered == 1  # the first sentence went out before the second was made
            joe.valve.open()
            return dict(resp.headers), head + await resp.read()

    headers, body = api.run(stream())
    assert headers["Transfer-Encoding"] == "chunked" and headers["Content-Type"] == "audio/wav"
    assert headers["X-Ttsd-Sample-Rate"] == "16000"
    assert body[:44] == wav_stream_header(16000)
    streamed = body[44:]
    assert streamed == joe.expected(TEXT, SynthesisOptions(seed=5), pieces=True)
    a, b = (np.frombuffer(x, dtype="<i2").astype(np.float64) for x in (streamed, whole))
    assert a.shape == b.shape
    cut = first // 2 + int(0.1 * 16000)  # the middle of the 0.2 s pause between the sentences
    for part in (slice(0, cut), slice(cut, None)):  # per sentence: the same waveform, scaled
        assert np.corrcoef(a[part], b[part])[0, 1] > 0.999
    raw = api.post("/v1/synthesize", {"text": TEXT, "stream": True, "format": "pcm", "seed": 5})
    assert raw.body == streamed and raw.headers["Content-Type"] == "audio/L16; rate=16000; channels=1"
    assert raw.headers["Transfer-Encoding"] == "chunked"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_cancels_the_rest(api: FrontEnds, voices: FakeVoices, stream: bool) -> None:
    """1. A 12-sentence request; the engine may make one sentence. 2. The client hangs up once
    it is made (streamed: once the 200 arrived). 3. The job is told to stop, and stops after the
    sentence under way: 2 of 12 made. The lease ends as neither a success nor the model's failure,
    and the request is counted as cancelled."""
    joe = voices.engine("joe", "2")

    async def go() -> None:
        joe.valve.close()
        joe.valve.allow(1)
        reader, writer = await asyncio.open_unix_connection(str(api.socket))
        body = json.dumps({"text": LONG, "stream": stream}).encode()
        writer.write(b"POST /v1/synthesize HTTP/1.1\r\nHost: ttsd\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        if stream:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
        await until(lambda: joe.rendered == 1, "the first sentence")
        writer.close()
        await until(lambda: bool(voices.jobs) and voices.jobs[-1].cancel.is_set(), "the job to be cancelled")
        joe.valve.open()
        await until(lambda: bool(voices.released), "the lease to end")

    api.run(go())
    assert joe.rendered == 2
    assert voices.released == [(("joe", "2"), None)] and voices.pool.cancelled == 1
    metrics = api.get("/metrics").body.decode()
    assert 'ttsd_requests_total{outcome="cancelled",route="synthesize",version="2",voice="joe"} 1.0' in metrics
    assert voices.pool.depth() == (0, 0)


def test_a_version_is_pinned_by_header_or_body(api: FrontEnds, voices: FakeVoices) -> None:
    def served(body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str | None]:
        reply = api.post("/v1/synthesize", body, headers=headers)
        return reply.status, reply.headers.get("X-Ttsd-Version")

    assert served({"text": "Hi."}) == (200, "2")
    assert served({"text": "Hi."}, {"X-Ttsd-Version": "1"}) == (200, "1")
    assert served({"text": "Hi."}, {"X-Ttsd-Version": " 01 "}) == (200, "1")  # the same version
    assert served({"text": "Hi.", "version": "2"}, {"X-Ttsd-Version": "1"}) == (200, "2")  # the body wins
    assert voices.engine("joe", "1").rendered == 2 and voices.engine("joe", "2").rendered == 2
    reply = api.post("/v1/synthesize", {"text": "Hi."}, headers={"X-Ttsd-Version": "9"})
    assert (reply.status, reply.error["code"]) == (404, "unknown_voice") and "no loaded version 9" in reply.error["message"]
    reply = api.post("/v1/synthesize", {"text": "Hi."}, headers={"X-Ttsd-Version": "9" * 65})
    assert (reply.status, reply.error["code"]) == (400, "bad_request")


def test_version_1_0_names_version_1(api: FrontEnds) -> None:
    reply = api.post("/v1/synthesize", {"text": "Hi.", "version": "1.0"})
    assert (reply.status, reply.headers.get("X-Ttsd-Version")) == (200, "1")


# -- the OpenAI route ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body, voice", [
    ({"model": "tts-1", "input": "Compatible.", "voice": "alloy"}, "joe"),  # OpenAI's names: the default voice
    ({"model": "tts-1", "input": "Compatible.", "voice": "Nova"}, "joe"),
    ({"model": "tts-1", "input": "Compatible."}, "joe"),
    ({"model": "tts-1", "input": "Compatible.", "voice": "ann"}, "ann"),  # a ttsd voice by its name
    ({"model": "ann", "input": "Compatible.", "voice": "alloy"}, "ann"),  # or as the model
])
def test_openai_route_maps_voices(api: FrontEnds, body: dict[str, Any], voice: str) -> None:
    reply = api.post("/v1/audio/speech", body)
    assert reply.status == 200 and reply.headers["Content-Type"] == "audio/mpeg"  # mp3 unless asked
    assert reply.headers["X-Ttsd-Voice"] == voice
    assert soundfile.info(io.BytesIO(reply.body)).samplerate == int(reply.headers["X-Ttsd-Sample-Rate"])


def test_openai_route_formats_and_speed(api: FrontEnds, voices: FakeVoices) -> None:
    reply = api.post("/v1/audio/speech", {"model": "tts-1", "input": "Wave please.", "voice": "joe",
                                          "response_format": "wav", "speed": 1.5})
    assert reply.status == 200 and reply.body[:4] == b"RIFF"
    assert voices.engine("joe", "2").asked[-1].speed == 1.5
    metrics = api.get("/metrics").body.decode()
    assert 'ttsd_requests_total{outcome="ok",route="openai",version="2",voice="joe"} 1.0' in metrics


@pytest.mark.parametrize("body, fragment", [
    ({"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "m4a"}, "m4a"),
    ({"model": "tts-1", "voice": "alloy"}, "'input' is required"),
    ({"model": "tts-1", "input": "x", "speed": 9}, "speed"),
    (["input"], "JSON object"),
])
def test_openai_route_refuses_bad_requests(api: FrontEnds, body: Any, fragment: str) -> None:
    reply = api.post("/v1/audio/speech", body)
    assert (reply.status, reply.error["code"]) == (400, "bad_request"), body
    assert fragment in reply.error["message"], reply.error


def test_openai_route_answers_an_unknown_voice_as_ttsd_s_own_route_does(api: FrontEnds) -> None:
    """404 unknown_voice on both routes (it was a 400 bad_request here), and a type error names
    each kind once ("a number", not "a number or number")."""
    for route, body in (("/v1/audio/speech", {"model": "tts-1", "input": "x", "voice": "nobody"}),
                        ("/v1/synthesize", {"text": "x", "voice": "nobody"})):
        reply = api.post(route, body)
        assert (reply.status, reply.error["code"]) == (404, "unknown_voice"), (route, reply.error)
        assert "nobody" in reply.error["message"]
    reply = api.post("/v1/audio/speech", {"model": "tts-1", "input": "x", "speed": "fast"})
    assert reply.status == 400 and "must be a number" in reply.error["message"]
    assert "number or number" not in reply.error["message"]


# -- bad requests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "bad_request"),
    (b'["text"]', 400, "bad_request"),
    (b'{"text": ""}', 400, "bad_request"),
    (b'{"text": "...!?"}', 400, "bad_request"),
    (b'{"text": "hi", "colour": "red"}', 400, "bad_request"),
    (b'{"text": "hi", "speed": 99}', 400, "bad_request"),
    (b'{"text": "hi", "format": "wav", "stream": "yes"}', 400, "bad_request"),
    (b'{"text": "hi", "format": "flac", "stream": true}', 400, "bad_request"),
    (b'{"text": "hi", "voice": "nobody"}', 404, "unknown_voice"),
    (b'{"text": "hi", "version": "7"}', 404, "unknown_voice"),
    (json.dumps({"text": "a" * 5001}).encode(), 413, "text_too_long"),
    (b'{"text": "' + b"a" * (1 << 20) + b'"}', 413, "body_too_large"),
])
def test_bad_requests_get_their_status_and_the_api_keeps_serving(api: FrontEnds, voices: FakeVoices, body: bytes,
                                                                 status: int, code: str) -> None:
    reply = api.post("/v1/synthesize", raw=body)
    assert reply.status == status, reply.body[:300]
    assert reply.error["code"] == code and reply.error["message"]
    assert reply.headers["Content-Type"].startswith("application/json")
    assert api.post("/v1/synthesize", {"text": "Still here."}).status == 200
    assert voices.model_failures() == []
    metrics = api.get("/metrics").body.decode()
    if code != "body_too_large":  # refused by aiohttp before the handler: not counted
        assert 'ttsd_request_failures_total{fault="request",route="synthesize",version="-",voice="-"} 1.0' in metrics


def test_a_request_s_fault_never_counts_against_the_model(api: FrontEnds, voices: FakeVoices) -> None:
    """Faults found after a lease was taken (an option the voice cannot take, audio over the
    limit) end the lease with ok=None, never ok=False; a failure of the model itself does."""
    for body, status, code in [
        ({"text": "hello", "speaker": 7}, 400, "bad_request"),  # checked against the voice, lease held
        ({"text": "a. " * 40, "sentence_pause": 5}, 413, "audio_too_long"),  # found by the engine
        ({"text": "a" * 600}, 413, "audio_too_long"),  # 36 s of audio: found while rendering
        ({"text": "hello", "version": "3"}, 404, "unknown_voice"),
    ]:
        reply = api.post("/v1/synthesize", body)
        assert (reply.status, reply.error["code"]) == (status, code), reply.error
    assert voices.released == [(("joe", "2"), None)] * 3
    joe = voices.engine("joe", "2")
    joe.fail_with = RuntimeError("the model broke")
    reply = api.post("/v1/synthesize", {"text": "hello"})
    assert (reply.status, reply.error["code"]) == (500, "synthesis_failed")
    assert voices.model_failures() == [(("joe", "2"), False)]


@pytest.mark.parametrize("said", ["DefaultCPUAllocator: can't allocate memory: you tried to allocate 82 bytes",
                                  "could not create a primitive", "can't start new thread"])
def test_running_out_of_memory_is_the_box_s_fault_not_the_model_s(api: FrontEnds, voices: FakeVoices,
                                                                 said: str) -> None:
    """torch says so in a RuntimeError, not a MemoryError: it was a 500 counted against the model,
    so a box short of memory rolled a good version back (and ended a canary at its first)."""
    voices.engine("joe", "2").fail_with = RuntimeError(said)
    reply = api.post("/v1/synthesize", {"text": "hello"})
    assert reply.status == 503 and "out of memory" in reply.error["message"], reply.error
    assert voices.model_failures() == []


def test_a_full_queue_is_503_with_retry_after_at_once(api: FrontEnds, voices: FakeVoices) -> None:
    """1 worker and a queue of 1: one request held in the worker, one waiting; a third is refused
    at once (the worker is still held), and the first two are served once it goes on."""
    joe = voices.engine("joe", "2")
    joe.valve.close()

    async def go() -> tuple[list[Reply], Reply, Reply]:
        held = [asyncio.ensure_future(api.fetch("POST", "/v1/synthesize", {"text": f"Request {i}."}))
                for i in range(2)]
        await until(lambda: voices.pool.depth() == (1, 1), "one running and one waiting")
        busy = await asyncio.wait_for(api.fetch("POST", "/v1/synthesize", {"text": "One more."}), 5)  # not queued
        status = await api.fetch("GET", "/v1/status")
        joe.valve.open()
        return list(await asyncio.gather(*held)), busy, status

    served, busy, status = api.run(go())
    assert busy.status == 503 and busy.headers["Retry-After"] == "1" and busy.error["code"] == "busy"
    assert status.json()["queue"] == {"waiting": 1, "running": 1}
    assert [r.status for r in served] == [200, 200]
    assert sorted(voices.released, key=str) == [(("joe", "2"), None), (("joe", "2"), True), (("joe", "2"), True)]
    assert api.post("/v1/synthesize", {"text": "Room again."}).status == 200


# -- the other routes -----------------------------------------------------------------------------------
def test_not_ready_until_a_voice_serves(tmp_path: Path) -> None:
    voices = FakeVoices(tmp_path, {"joe": {"1": {}}}, activate=False)
    front = FrontEnds(voices.backend, tmp_path)
    try:
        assert front.get("/healthz").json() == {"status": "alive"}
        ready = front.get("/readyz")
        assert (ready.status, ready.error["code"], ready.headers["Retry-After"]) == (503, "not_ready", "5")
        busy = front.post("/v1/synthesize", {"text": "Too soon."})
        assert (busy.status, busy.error["code"], busy.headers["Retry-After"]) == (503, "busy", "5")
        voices.map.activate(("joe", "1"))
        assert front.get("/readyz").json() == {"status": "ready"}
        assert front.post("/v1/synthesize", {"text": "Now."}).status == 200
    finally:
        front.close()
        voices.close()


def test_metrics_status_and_voices(api: FrontEnds, voices: FakeVoices) -> None:
    assert api.post("/v1/synthesize", {"text": "Counted."}).status == 200
    assert api.post("/v1/synthesize", {"text": ""}).status == 400
    metrics = api.get("/metrics")
    assert metrics.status == 200 and metrics.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = metrics.body.decode()
    for name in ("ttsd_requests_total", "ttsd_request_duration_seconds_bucket", "ttsd_queue_depth",
                 "ttsd_audio_seconds_total", "ttsd_request_failures_total", "ttsd_requests_in_flight",
                 "ttsd_time_to_first_audio_seconds_bucket", "ttsd_build_info"):
        assert f"\n{name}" in text, name
    assert 'ttsd_requests_total{outcome="ok",route="synthesize",version="2",voice="joe"} 1.0' in text
    assert 'ttsd_requests_total{outcome="bad_request",route="synthesize",version="-",voice="-"} 1.0' in text
    assert 'ttsd_request_duration_seconds_count{route="synthesize",version="2",voice="joe"} 1.0' in text
    assert 'ttsd_request_seconds_count{route="synthesize",voice="joe"} 1.0' in text  # the old name, this release
    assert "_created" not in text  # prometheus_client's *_created series are off
    assert "ttsd_audio_seconds_total{" in text and 'version="2",voice="joe"}' in text
    assert api.get("/v1/status").json() == {**voices.status(), "control": True}  # the socket takes control
    assert api.get("/v1/voices").json() == {"voices": [{"name": "ann", "active": "1"}, {"name": "joe", "active": "2"}]}


def test_control_routes_call_the_daemon(api: FrontEnds, voices: FakeVoices) -> None:
    reply = api.post("/v1/voices/joe/rollback", {"to": "1"})
    assert reply.status == 200 and reply.json() == {"voice": "joe", "from": "2", "to": "1", "seconds": 0.01}
    assert api.post("/v1/voices/joe/rollback", raw=b"").status == 200
    assert api.post("/v1/voices/joe/rollback", {"to": 1}).status == 200
    assert voices.rollbacks == [("joe", "1"), ("joe", None), ("joe", "1")]
    reply = api.post("/v1/voices/joe/activate", {"version": "1"})
    assert reply.status == 200 and reply.json()["to"] == "1" and voices.activations == [("joe", "1")]
    for path, body, code in [("/v1/voices/joe/rollback", {"to": [1]}, "bad_request"),
                             ("/v1/voices/joe/activate", {}, "bad_request"),
                             ("/v1/voices/joe/activate", ["1"], "bad_request")]:
        reply = api.post(path, body)
        assert (reply.status, reply.error["code"]) == (400, code), (path, body)
    assert voices.rollbacks[3:] == [] and voices.activations[1:] == []  # refused before the daemon was asked
    reply = api.post("/v1/voices/nobody/rollback")
    assert (reply.status, reply.error["code"]) == (404, "unknown_voice")
    voices.control_error = ConflictError("joe has no previous version to roll back to")
    reply = api.post("/v1/voices/joe/rollback")
    assert (reply.status, reply.error["code"]) == (409, "conflict") and "no previous version" in reply.error["message"]


def test_control_routes_over_tcp_need_a_token(api: FrontEnds, voices: FakeVoices, tmp_path: Path) -> None:
    """Without --token-file the TCP listener serves requests but not the control routes; with
    one, TCP needs the bearer token everywhere and the Unix socket nowhere."""
    for path in ("/v1/voices/joe/rollback", "/v1/voices/joe/activate"):
        reply = api.post(path, {"version": "1"}, tcp=True)
        assert (reply.status, reply.error["code"]) == (403, "forbidden")
    assert voices.rollbacks == [] and voices.activations == []
    assert api.post("/v1/synthesize", {"text": "Over TCP."}, tcp=True).status == 200
    assert api.get("/v1/status", tcp=True).status == 200

    guarded = FakeVoices(tmp_path / "guarded", VOICES, token=TOKEN)
    front = FrontEnds(guarded.backend, tmp_path / "guarded")
    try:
        for path in ("/v1/status", "/metrics"):
            for headers in ({}, {"Authorization": "Bearer wrong-token-of-twenty"}, {"Authorization": TOKEN}):
                reply = front.get(path, tcp=True, headers=headers)
                assert (reply.status, reply.error["code"]) == (401, "unauthorized"), (path, headers)
                assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert front.post("/v1/synthesize", {"text": "No."}, tcp=True).status == 401
        assert guarded.jobs == []
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert front.post("/v1/voices/joe/rollback", tcp=True, headers=bearer).status == 200
        assert front.post("/v1/synthesize", {"text": "Yes."}, tcp=True, headers=bearer).status == 200
        assert front.post("/v1/voices/joe/activate", {"version": "1"}).status == 200  # the socket: no token
        assert guarded.rollbacks == [("joe", None)] and guarded.activations == [("joe", "1")]
    finally:
        front.close()
        guarded.close()
