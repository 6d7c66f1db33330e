"""The Wyoming front end end to end: ``ttsd serve --wyoming unix://…`` in a subprocess on the
built-in voice, driven by the ``wyoming`` package's own client, as Home Assistant drives it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_util import Daemon, start_daemon, wait_for
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncUnixClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

VOICE = "en_US-joe-medium"
LONG = " ".join(f"This is sentence number {i} of a long request that keeps the worker busy." for i in range(12))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, joe_folder: Path) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("wyoming")
    d = start_daemon(root, cache_dir, "--wyoming", f"unix://{root / 'wyoming.sock'}", per_test=False)
    try:
        yield d
    finally:
        assert d.stop() == 0, d.logs()


def socket_of(daemon: Daemon) -> str:
    return str(daemon.root / "wyoming.sock")


async def read(client: AsyncUnixClient, timeout: float = 120) -> Event:
    event = await asyncio.wait_for(client.read_event(), timeout)
    assert event is not None, "the server closed the connection"
    return event


async def audio_of(client: AsyncUnixClient) -> tuple[AudioStart, bytes]:
    """Events up to audio-stop: the start and the PCM."""
    start = await read(client)
    assert AudioStart.is_type(start.type), start
    pcm = bytearray()
    while True:
        event = await read(client)
        if AudioStop.is_type(event.type):
            return AudioStart.from_event(start), bytes(pcm)
        assert AudioChunk.is_type(event.type), event
        chunk = AudioChunk.from_event(event)
        assert (chunk.rate, chunk.width, chunk.channels) == (22050, 2, 1)
        pcm += chunk.audio


def test_describe_lists_the_voice_with_its_active_version(daemon: Daemon) -> None:
    async def go() -> Info:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await read(client))

    info = asyncio.run(go())
    (program,) = info.tts
    assert program.supports_synthesize_streaming
    (voice,) = program.voices
    assert voice.name == VOICE and voice.languages == ["en_US"] and voice.installed
    assert "(version 1)" in (voice.description or "") and voice.version == "1"


def test_synthesize_sends_16_bit_mono_audio_between_start_and_stop(daemon: Daemon) -> None:
    async def go() -> tuple[AudioStart, bytes]:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(Synthesize(text="Hello from Home Assistant.",
                                                voice=SynthesizeVoice(name=VOICE)).event())
            return await audio_of(client)

    start, pcm = asyncio.run(go())
    assert (start.rate, start.width, start.channels) == (22050, 2, 1)
    assert 1.0 < len(pcm) / 2 / 22050 < 4.0
    assert daemon.metric("ttsd_requests_total", route="wyoming", outcome="ok") >= 1


def test_streamed_text_is_spoken_sentence_by_sentence_as_it_arrives(daemon: Daemon) -> None:
    """1. The text of sentence 1 arrives in small pieces. 2. Its audio starts before any text of
    sentence 2 is sent. 3. Sentence 2, then stop: the rest of the audio, one audio-stop, then
    synthesize-stopped. A synthesize sent during the stream (as clients do, for servers without
    streaming) is ignored."""
    async def go() -> tuple[bytes, list[str]]:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=VOICE)).event())
            for piece in ("The kitchen", " lights are", " on now. "):
                await client.write_event(SynthesizeChunk(text=piece).event())
            first = await read(client)  # before sentence 2 exists at all
            assert AudioStart.is_type(first.type), first
            await client.write_event(SynthesizeChunk(text="Good night.").event())
            await client.write_event(Synthesize(text="The kitchen lights are on now. Good night.").event())
            await client.write_event(SynthesizeStop().event())
            pcm, kinds = bytearray(), []
            while True:
                event = await read(client)
                kinds.append(event.type)
                if AudioChunk.is_type(event.type):
                    pcm += AudioChunk.from_event(event).audio
                if SynthesizeStopped.is_type(event.type):
                    return bytes(pcm), kinds

    pcm, kinds = asyncio.run(go())
    assert kinds.count("audio-stop") == 1 and kinds.count("audio-start") == 0, kinds
    assert kinds[-2:] == ["audio-stop", "synthesize-stopped"], kinds
    assert 2.0 < len(pcm) / 2 / 22050 < 8.0  # both sentences, spoken once


@pytest.mark.parametrize("request_event, code", [
    (Synthesize(text="Hello.", voice=SynthesizeVoice(name="nobody")).event(), "unknown_voice"),
    (Synthesize(text="?!...").event(), "bad_request"),
    (Synthesize(text="x" * 6000).event(), "text_too_long"),
    (Event(type="synthesize", data={"text": 42}), "bad_request"),
])
def test_a_bad_request_is_an_error_event_and_the_connection_stays_usable(daemon: Daemon, request_event: Event,
                                                                         code: str) -> None:
    async def go() -> tuple[Error, bytes]:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(request_event)
            error = await read(client)
            assert Error.is_type(error.type), error
            await client.write_event(Synthesize(text="Still here.").event())
            _, pcm = await audio_of(client)
            return Error.from_event(error), pcm

    error, pcm = asyncio.run(go())
    assert error.code == code and error.text
    assert len(pcm) > 22050  # the next request on the same connection is served


def test_a_client_that_goes_away_frees_the_worker(daemon: Daemon) -> None:
    """A long request whose client disconnects after its first audio stops after the current
    piece: the worker is free long before the text could have been spoken, and it is counted."""
    cancelled = daemon.metric("ttsd_requests_total", route="wyoming", outcome="cancelled")

    async def go() -> None:
        client = AsyncUnixClient(socket_of(daemon))
        await client.connect()
        await client.write_event(Synthesize(text=LONG).event())
        assert AudioStart.is_type((await read(client)).type)
        assert AudioChunk.is_type((await read(client)).type)
        await client.disconnect()

    asyncio.run(go())
    wait_for(lambda: daemon.request("GET", "/v1/status").json()["queue"]["running"] == 0, timeout=60,
             what="the worker to be free")
    wait_for(lambda: daemon.metric("ttsd_requests_total", route="wyoming", outcome="cancelled") == cancelled + 1,
             timeout=30, what="the request counted as cancelled")
    reply = daemon.post("/v1/synthesize", {"text": "Next."})
    assert reply.status == 200
