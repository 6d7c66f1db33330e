"""Every audio format OpenAI's speech API names (mp3, opus, aac, flac, wav, pcm), asked for by the
official ``openai`` client on a loopback TCP listener and through ``/v1/synthesize``, whole and
streamed; each reply is decoded and its length compared with the audio the voice made.

The front ends run in-process over ``FakeVoices`` (see ``inproc``): joe speaks at 16 kHz, ann at
22050 Hz (which Opus cannot take: it is resampled to 24 kHz).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from inproc import FakeVoices, FrontEnds
from openai import OpenAI

from ttsd import encoding
from ttsd.audio import Audio, encode
from ttsd.encoding import open_encoder
from ttsd.errors import FormatUnavailableError, from_http

VOICES = {"joe": {"1": {"tone": 440}}, "ann": {"1": {"tone": 550, "sample_rate": 22050}}}
TEXT = "The first sentence is short. The second one is a little bit longer than the first."
OPENAI_FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
CONTAINERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
# Codecs add a little: AAC a priming frame and the padding of its last (1024 samples each), mp3
# its encoder delay. Well under one 60 ms character of the fake voice.
SLACK = 0.15
# A streamed mp3 has no LAME header to say how much to trim: it decodes longer than the whole file
# by LAME's delay (576 + 529 samples) and the padding of its last frame (under 1152 samples).
MP3_DELAY = 576 + 529
MP3_FRAME = 1152


@pytest.fixture
def voices(tmp_path: Path) -> Iterator[FakeVoices]:
    v = FakeVoices(tmp_path, VOICES, default_voice="joe")
    yield v
    v.close()


def seconds(data: bytes, fmt: str, rate: int) -> float:
    """How long ``data`` plays, decoded the way a client would: soundfile where libsndfile reads
    the format, PyAV for AAC (and raw PCM by its size)."""
    assert data, "no audio"
    if fmt == "pcm":
        return len(data) / 2 / rate
    if fmt == "aac":
        with av.open(io.BytesIO(data), format="aac") as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name == "aac" and stream.rate == rate
            return sum(frame.samples for frame in container.decode(stream)) / stream.rate
    with av.open(io.BytesIO(data)) as container:  # the container is what was asked for
        assert container.format.name.split(",")[0] == CONTAINERS[fmt]
    samples, got = soundfile.read(io.BytesIO(data), dtype="float32")
    assert float(np.max(np.abs(samples))) > 0.05, "decoded to silence"
    return len(samples) / got


def made(voices: FakeVoices, name: str, text: str = TEXT, *, pieces: bool = False) -> float:
    """Seconds of audio the voice makes of ``text`` (whole, or in streamed pieces)."""
    return len(voices.engine(name, "1").expected(text, pieces=pieces)) / 2 / voices.engine(name, "1").sample_rate


def openai_client(api: FrontEnds) -> OpenAI:
    return OpenAI(base_url=f"http://{api.host}:{api.port}/v1", api_key="unused", max_retries=0, timeout=30)


# -- the official client on the OpenAI route ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", OPENAI_FORMATS)
@pytest.mark.parametrize("voice", ["joe", "ann"])
def test_the_openai_client_gets_every_format_whole_and_streamed(api: FrontEnds, voices: FakeVoices, fmt: str,
                                                                voice: str) -> None:
    """1. ``audio.speech.create`` (whole). 2. ``with_streaming_response`` (read as it comes).
    Both decode to the length of the audio the voice made, with OpenAI's content type."""
    client = openai_client(api)
    rate = voices.engine(voice, "1").sample_rate
    expected = made(voices, voice)

    def whole() -> tuple[bytes, str]:
        reply = client.audio.speech.with_raw_response.create(model="tts-1", voice=voice, input=TEXT,
                                                             response_format=fmt)  # type: ignore[arg-type]
        return reply.content, reply.headers["content-type"]

    def streamed() -> bytes:
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice=voice, input=TEXT, response_format=fmt) as reply:  # type: ignore[arg-type]
            return b"".join(reply.iter_bytes(4096))

    body, content_type = api.run(asyncio.to_thread(whole))
    assert content_type.split(";")[0] == {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac",
                                          "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/L16"}[fmt]
    assert seconds(body, fmt, rate) == pytest.approx(expected, abs=SLACK)
    assert seconds(api.run(asyncio.to_thread(streamed)), fmt, rate) == pytest.approx(expected, abs=SLACK)
    client.close()


# -- /v1/synthesize --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", OPENAI_FORMATS)
def test_synthesize_serves_every_format_whole(api: FrontEnds, voices: FakeVoices, fmt: str) -> None:
    reply = api.post("/v1/synthesize", {"text": TEXT, "format": fmt, "voice": "ann"})
    assert reply.status == 200, reply.body[:300]
    assert seconds(reply.body, fmt, 22050) == pytest.approx(made(voices, "ann"), abs=SLACK)
    assert float(reply.headers["X-Ttsd-Audio-Seconds"]) == pytest.approx(made(voices, "ann"), abs=1e-3)


@pytest.mark.parametrize("fmt", ["opus", "aac", "mp3"])
@pytest.mark.parametrize("voice", ["joe", "ann"])
def test_encoded_formats_stream_as_the_voice_speaks(api: FrontEnds, voices: FakeVoices, fmt: str, voice: str) -> None:
    """1. A two-sentence text streamed, the voice let through one sentence: encoded audio arrives
    while the second is not yet made. 2. The rest: one continuous stream that decodes to the
    length of the pieces the voice made."""
    engine = voices.engine(voice, "1")

    async def stream() -> tuple[dict[str, str], bytes]:
        engine.valve.close()
        engine.valve.allow(1)
        async with api.unix.post("/v1/synthesize", json={"text": TEXT, "stream": True, "format": fmt,
                                                          "voice": voice}) as resp:
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readany(), 10)
            assert first and engine.rendered == 1  # audio of the first sentence before the second
            engine.valve.open()
            return dict(resp.headers), first + await resp.read()

    headers, body = api.run(stream())
    assert headers["Transfer-Encoding"] == "chunked"
    assert headers["Content-Type"] == {"opus": "audio/opus", "aac": "audio/aac", "mp3": "audio/mpeg"}[fmt]
    assert seconds(body, fmt, engine.sample_rate) == pytest.approx(made(voices, voice, pieces=True), abs=SLACK)


@pytest.mark.parametrize("voice", ["joe", "ann"])
def test_a_streamed_mp3_is_the_whole_one_plus_the_encoder_delay(api: FrontEnds, voices: FakeVoices,
                                                                 voice: str) -> None:
    """1. mp3 asked for whole (libsndfile) and streamed (LAME through PyAV). 2. Both decode with
    soundfile; the whole one is as long as the voice's audio, the streamed one at most LAME's
    delay and one frame longer (no header to trim them by), never shorter. 3. The stream is bare
    MP3 frames: no ID3 tag, and no Xing header (which would need the frame count up front)."""
    rate = voices.engine(voice, "1").sample_rate
    whole = api.post("/v1/synthesize", {"text": TEXT, "format": "mp3", "voice": voice})
    streamed = api.post("/v1/synthesize", {"text": TEXT, "format": "mp3", "voice": voice, "stream": True})
    assert whole.status == streamed.status == 200
    assert streamed.headers["Transfer-Encoding"] == "chunked" and "Transfer-Encoding" not in whole.headers
    whole_s, streamed_s = seconds(whole.body, "mp3", rate), seconds(streamed.body, "mp3", rate)
    assert whole_s == pytest.approx(made(voices, voice), abs=1 / rate)
    assert 0 <= streamed_s - whole_s <= (MP3_DELAY + MP3_FRAME) / rate
    assert streamed.body[:2] == b"\xff\xf3" and b"Xing" not in streamed.body[:200] and b"Info" not in streamed.body[:200]


def test_flac_and_ogg_are_still_not_streamed(api: FrontEnds) -> None:
    for fmt in ("flac", "ogg"):
        reply = api.post("/v1/synthesize", {"text": "Hi.", "format": fmt, "stream": True})
        assert reply.status == 400 and "opus, aac, mp3" in reply.error["message"]


def test_why_flac_is_not_streamed() -> None:
    """FFmpeg can make a FLAC stream, but its header must then say "length unknown", which
    soundfile (libsndfile 1.2.2, issue #1038) cannot read. When this test fails, libsndfile has
    learnt to: flac can then stream through PyAV as mp3 does (see ``ttsd.encoding``)."""
    rate = 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
    sink = encoding._Pipe()
    with av.open(sink, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((tone * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame):  # the header goes out with the first packet, as a stream's must
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = sink.take()
    assert data[:4] == b"fLaC" and int.from_bytes(data[18:26], "big") & (1 << 36) - 1 == 0  # total samples unknown
    with av.open(io.BytesIO(data)) as decoded:  # FFmpeg reads it
        assert sum(f.samples for f in decoded.decode(audio=0)) == rate
    with pytest.raises((ValueError, MemoryError, soundfile.LibsndfileError)):
        soundfile.read(io.BytesIO(data))


def test_a_missing_encoder_is_refused_before_synthesis(api: FrontEnds, voices: FakeVoices,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """1. The box has no PyAV: aac is 501 with what to install, on both routes, whole or streamed;
    so is streamed mp3. 2. Nothing was synthesized and nothing counted against the voice. 3. Other
    formats serve, mp3 among them when not streamed (libsndfile writes it)."""
    monkeypatch.setattr(encoding, "_installed", lambda module: module != "av")
    for path, body in [("/v1/audio/speech", {"model": "tts-1", "input": "Hi.", "response_format": "aac"}),
                       ("/v1/synthesize", {"text": "Hi.", "format": "aac"}),
                       ("/v1/synthesize", {"text": "Hi.", "format": "aac", "stream": True}),
                       ("/v1/synthesize", {"text": "Hi.", "format": "mp3", "stream": True})]:
        reply = api.post(path, body)
        assert (reply.status, reply.error["code"]) == (501, "format_unavailable"), body
        assert "PyAV" in reply.error["message"] and "aac extra, or pip install av" in reply.error["message"]
        # ttsd say through the daemon exits as in-process, 3 (it was 9, "the daemon failed")
        said = from_http(reply.status, reply.error["code"], reply.error["message"])
        assert isinstance(said, FormatUnavailableError) and said.exit_code == 3, said
    assert voices.engine("joe", "1").asked == [] and voices.model_failures() == []
    assert api.post("/v1/synthesize", {"text": "Hi.", "format": "opus"}).status == 200
    assert api.post("/v1/synthesize", {"text": "Hi.", "format": "mp3"}).status == 200
    assert api.post("/v1/audio/speech", {"model": "tts-1", "input": "Hi."}).status == 200  # mp3, whole


# -- the encoders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["opus", "aac", "mp3"])
def test_chunks_encode_to_one_stream_like_the_whole(fmt: str) -> None:
    """A tone fed in 0.2 s chunks gives bytes for (nearly) every chunk, and the pieces make one
    file as long as the tone, as the whole encoding is."""
    rate = 22050
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * rate) / rate)).astype(np.float32)
    encoder = open_encoder(fmt, rate)
    pieces = [encoder.write(tone[i:i + rate // 5]) for i in range(0, len(tone), rate // 5)]
    pieces.append(encoder.close())
    assert sum(1 for p in pieces if p) >= len(pieces) - 2  # Opus pages of 0.1 s, not libsndfile's 1 s
    assert encoder.close() == b""  # closing twice is harmless
    for data in (b"".join(pieces), encode(Audio(tone, rate), fmt)):
        assert seconds(data, fmt, rate) == pytest.approx(3.0, abs=SLACK)
    if fmt == "opus":
        assert soundfile.info(io.BytesIO(b"".join(pieces))).samplerate == 24000  # next Opus rate up


def test_the_stream_sink_refuses_to_go_back() -> None:
    sink = encoding._Sink()
    sink.write(b"abc")
    assert sink.seek(0, io.SEEK_END) == 3 and sink.take() == b"abc"
    with pytest.raises(OSError):
        sink.seek(0)
    assert sink.seekable() and not encoding._Pipe().seekable()  # what FFmpeg is told: do not go back
