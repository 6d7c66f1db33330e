"""A Wyoming text stream is one request, in-process over the fake voices of ``inproc``: the canary
and auto-rollback count it once (they counted each sentence, so one Home Assistant answer of twenty
sentences promoted a canary), the metrics count it once, and its audio in all is bounded by
``--max-audio-seconds`` as one request's is."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from inproc import FakeVoices
from wyoming.audio import AudioChunk, AudioStop
from wyoming.client import AsyncUnixClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from ttsd.front.wyoming import WyomingServer

T = TypeVar("T")


@pytest.fixture
def voices(tmp_path: Path) -> Iterator[FakeVoices]:
    v = FakeVoices(tmp_path, {"joe": {"1": {}}}, max_audio_seconds=10.0)
    yield v
    v.close()


def talk(voices: FakeVoices, tmp_path: Path, client_side: Callable[[AsyncUnixClient], Awaitable[T]],
         settled: Callable[[], bool] | None = None) -> T:
    """A Wyoming server on ``voices`` for one client connection, which ``client_side`` drives;
    what it returns. Once the connection is closed, the server's side runs until ``settled``
    (at most 10 s: its handler ends what the client left), then drains."""
    path = tmp_path / "wyoming.sock"

    async def go() -> T:
        server = WyomingServer(f"unix://{path}", voices.backend)
        await server.start()
        try:
            async with AsyncUnixClient(str(path)) as client:
                result = await client_side(client)
            if settled is not None:
                await until(settled)
            return result
        finally:
            await server.drain(1.0)

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(go())
    finally:
        loop.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def stream(voices: FakeVoices, tmp_path: Path, chunks: list[str], *, leave: bool = False) -> list[Event]:
    """One text stream over a Wyoming server on ``voices``: its events up to synthesize-stopped
    (or, with ``leave``, the client goes once the first audio came, without a stop, and its
    handler has ended the stream)."""

    async def client_side(client: AsyncUnixClient) -> list[Event]:
        got: list[Event] = []
        await client.write_event(SynthesizeStart().event())
        for text in chunks:
            await client.write_event(SynthesizeChunk(text=text).event())
        if leave:
            while not AudioChunk.is_type((await client.read_event()).type):
                pass
            return got
        await client.write_event(SynthesizeStop().event())
        while not SynthesizeStopped.is_type((event := await client.read_event()).type):
            got.append(event)
        return got

    # the client gone: its handler ends the stream
    return talk(voices, tmp_path, client_side, (lambda: not voices.map.in_flight(("joe", "1"))) if leave else None)


def wyoming(voices: FakeVoices, outcome: str) -> float:
    for line in voices.metrics.render().decode().splitlines():
        if line.startswith("ttsd_requests_total{") and 'route="wyoming"' in line and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_stream_of_many_sentences_is_one_request(voices: FakeVoices, tmp_path: Path) -> None:
    events = stream(voices, tmp_path, ["Yes. " * 10, "And no. " * 5])
    assert sum(AudioChunk.is_type(e.type) for e in events) >= 15 and AudioStop.is_type(events[-1].type)
    counted = [ok for _key, ok in voices.released if ok is not None]
    assert counted == [True], voices.released  # once for the stream, not once per sentence (15)
    assert wyoming(voices, "ok") == 1.0
    # what operating.md says: each sentence's first audio is timed; the stream's whole time (its
    # client's pace) is not a request duration
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in voices.metrics.render().decode().splitlines() if line.endswith(tuple("0123456789."))
               and "_count{" in line}
    first = sum(v for k, v in samples.items() if k.startswith("ttsd_time_to_first_audio_seconds_count{"))
    assert first >= 2, samples
    assert not [k for k in samples if k.startswith("ttsd_request_duration_seconds_count{") and "wyoming" in k]


def test_a_stream_the_model_fails_counts_once_against_it(voices: FakeVoices, tmp_path: Path) -> None:
    voices.engine("joe", "1").fail_with = RuntimeError("the voice broke")
    events = stream(voices, tmp_path, ["Yes. " * 5])
    assert any(Error.is_type(e.type) for e in events)
    assert [ok for _key, ok in voices.released if ok is not None] == [False]
    assert wyoming(voices, "ok") == 0.0


def test_a_stream_whose_client_goes_is_released(voices: FakeVoices, tmp_path: Path) -> None:
    stream(voices, tmp_path, ["Yes. " * 5], leave=True)
    assert voices.map.in_flight(("joe", "1")) == 0  # the stream's hold on its version ended


def test_a_stream_s_audio_in_all_is_bounded_as_a_request_s(voices: FakeVoices, tmp_path: Path) -> None:
    """Each sentence is under the 10 s cap (60 ms a character), the stream's sum is not: the audio
    stops at the cap (the sentence that would pass it is cut there, not spoken whole: one stream
    made 12 s of a 10 s cap), then an error; the rest is ignored."""
    sentence = "This sentence takes a few seconds. "  # ~2 s
    events = stream(voices, tmp_path, [sentence * 20])
    errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
    assert [e.code for e in errors] == ["audio_too_long"] and "--max-audio-seconds" in (errors[0].text or "")
    spoken = sum(len(AudioChunk.from_event(e).audio) for e in events if AudioChunk.is_type(e.type)) / 2 / 16000
    assert 8.0 < spoken <= 10.0, spoken
    assert wyoming(voices, "audio_too_long") == 1.0 and wyoming(voices, "ok") == 0.0


def test_a_voice_that_is_no_object_is_an_error_not_the_default_voice(voices: FakeVoices, tmp_path: Path) -> None:
    """``"voice": "joe"`` (a string where the protocol has an object) was read as no voice: the
    default spoke, without a word. It is an error event, then audio-stop, as any bad request."""
    from wyoming.tts import Synthesize

    async def client_side(client: AsyncUnixClient) -> tuple[Event, Event]:
        await client.write_event(Event(type=Synthesize(text="").event().type, data={"text": "Hi.", "voice": "joe"}))
        return await client.read_event(), await client.read_event()  # type: ignore[return-value]

    error, stop = talk(voices, tmp_path, client_side)
    assert Error.is_type(error.type) and "voice must be an object" in Error.from_event(error).text
    assert AudioStop.is_type(stop.type) and voices.jobs == []


@pytest.mark.parametrize("voice, said", [({"name": ["joe"]}, "voice name must be a string"),
                                         ({"language": {"en": 1}}, "voice language must be a string"),
                                         ({"name": "x" * 50_000}, "unknown voice 'xxx")])
def test_a_voice_field_of_the_wrong_kind_or_size_is_a_short_error(voices: FakeVoices, tmp_path: Path,
                                                                   voice: dict[str, object], said: str) -> None:
    """A list as the name failed as "unhashable type: 'list'"; an unknown name was echoed whole
    (a 1 MB name, a 1 MB error)."""
    from wyoming.tts import Synthesize

    async def client_side(client: AsyncUnixClient) -> Event:
        await client.write_event(Event(type=Synthesize(text="").event().type, data={"text": "Hi.", "voice": voice}))
        return await client.read_event()  # type: ignore[return-value]

    error = Error.from_event(talk(voices, tmp_path, client_side))
    assert (error.text or "").startswith(said) and len(error.text or "") < 300, (error.text or "")[:300]


def test_a_stream_ended_by_a_request_fault_counts_once_and_judges_nothing(voices: FakeVoices,
                                                                          tmp_path: Path) -> None:
    """Sentences spoken, then a chunk over --max-chars: one request, counted as text_too_long
    (it was counted not at all, and judged a success for the version)."""
    events = stream(voices, tmp_path, ["Yes. Yes. ", "a" * 5001])
    assert any(Error.is_type(e.type) for e in events)
    assert [ok for _key, ok in voices.released if ok is not None] == []
    assert wyoming(voices, "text_too_long") == 1.0 and wyoming(voices, "ok") == 0.0


def test_an_open_stream_between_sentences_holds_no_request_in_progress(voices: FakeVoices, tmp_path: Path) -> None:
    """A stream waiting for its next text (an LLM thinking) is no request in progress: it held
    a lease, so every background job ran at the pace kept beside live requests and the memory
    policy's swap waited 30 s for it. Its client gone before the stop: counted cancelled, judged
    not at all."""
    async def client_side(client: AsyncUnixClient) -> tuple[int, bool]:
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text="The first sentence. ").event())
        while not AudioChunk.is_type((await client.read_event()).type):
            pass
        await until(lambda: not voices.map.serving())  # the sentence's own job ends
        await asyncio.sleep(0.2)
        return voices.map.in_flight(("joe", "1")), voices.map.serving()

    # then the client goes, mid-stream
    in_flight, serving = talk(voices, tmp_path, client_side, lambda: wyoming(voices, "cancelled") > 0)
    assert (in_flight, serving) == (0, False)
    assert wyoming(voices, "cancelled") == 1.0 and wyoming(voices, "ok") == 0.0
    assert [ok for _key, ok in voices.released if ok is not None] == []


def test_the_audio_held_for_clients_is_bounded_all_together_and_no_one_client_waits_alone() -> None:
    """One client behind holds its answer and never makes a worker wait; past the bound on all
    clients together, a job whose client already holds audio waits until some is taken or
    dropped (a stopped connection drops what it held)."""
    import threading

    import numpy as np

    from ttsd.audio import Audio
    from ttsd.front.wyoming_io import AudioHandoff, UnsentAudio

    loop = asyncio.new_event_loop()
    unsent = UnsentAudio(limit=7000)  # more than one answer, as 64 MiB is more than 600 s of audio
    piece = Audio(np.zeros(1500, dtype=np.float32), 16000)  # 3,000 bytes of PCM
    first = AudioHandoff(loop, threading.Event(), unsent)
    second = AudioHandoff(loop, threading.Event(), unsent)
    first.put(piece)
    first.put(piece)  # a client that reads nothing: its answer is held, its worker goes on
    second.put(piece)  # past the bound, but this client holds nothing yet: never waits
    assert unsent.held == 9000
    waited = threading.Event()

    def more() -> None:
        second.put(piece)  # over the bound and this client already holds audio: it waits
        waited.set()

    worker = threading.Thread(target=more)
    worker.start()
    assert not waited.wait(0.3)
    first.stop()  # its client is gone: its 6,000 bytes are dropped
    assert waited.wait(5) and unsent.held == 6000
    loop.run_until_complete(second.get())
    loop.run_until_complete(second.get())
    assert unsent.held == 0
    worker.join(5)
    loop.close()


def test_a_stream_s_sentences_are_its_text_as_sent(voices: FakeVoices, tmp_path: Path) -> None:
    """A chunk that ends in a space before a sentence is complete kept the space: "Hello " then
    "world. " was spoken as "Helloworld."."""
    stream(voices, tmp_path, ["Right. Hello ", "world. And ", "then", " some."])
    assert [job.text for job in voices.jobs] == ["Right.", "Hello world.", "And then some."]


def test_a_chunk_of_many_short_sentences_over_max_chars_in_all_is_spoken(tmp_path: Path) -> None:
    """The chunk's length was checked before it was split into sentences: one chunk of short
    sentences, over --max-chars in all, was refused as "a sentence ... over N characters"."""
    voices = FakeVoices(tmp_path, {"joe": {"1": {}}}, max_chars=80, max_audio_seconds=30.0)
    try:
        events = stream(voices, tmp_path, ["Yes. No. " * 12])
        assert not any(Error.is_type(e.type) for e in events)
        assert len(voices.jobs) == 24
    finally:
        voices.close()


@pytest.mark.parametrize("chunks, code", [(["Fine. A\x00b. "], "bad_request"),
                                          (["a" * 81], "text_too_long"),
                                          (["a. " * 120], "text_too_long")])
def test_a_stream_sentence_that_cannot_be_spoken_fails_the_stream(tmp_path: Path, chunks: list[str],
                                                                   code: str) -> None:
    """A sentence with an invalid character was dropped without a word (the stream went on, the
    answer missing a sentence); the stream's text over 4 x --max-chars said bad_request."""
    voices = FakeVoices(tmp_path, {"joe": {"1": {}}}, max_chars=80, max_audio_seconds=30.0)
    try:
        events = stream(voices, tmp_path, chunks)
        errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
        assert [e.code for e in errors] == [code], errors
    finally:
        voices.close()


def test_one_address_holds_at_most_half_the_pools_places(tmp_path: Path) -> None:
    """Wyoming has no authentication: one LAN host's long requests filled the queue, and Home
    Assistant's announcement (another address) got busy for as long as that host kept sending.
    One address holds at most half the pool's places (workers and queue): its next request is
    told busy, and another address's is taken."""
    import socket

    from wyoming.event import async_read_event, async_write_event
    from wyoming.tts import Synthesize

    voices = FakeVoices(tmp_path, {"joe": {"1": {}}}, workers=1, queue_size=3)  # 4 places: 2 an address
    voices.engine("joe", "1").valve.close()  # nothing ends until the test says so
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def ask(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        await async_write_event(Synthesize(text="Hello there.").event(), writer)
        return reader, writer

    async def answer(reader: asyncio.StreamReader) -> str:
        event = await asyncio.wait_for(async_read_event(reader), 5)
        assert event is not None
        return Error.from_event(event).code or "" if Error.is_type(event.type) else event.type

    async def go() -> tuple[list[str], str]:
        server = WyomingServer(f"tcp://127.0.0.1:{port}", voices.backend)
        await server.start()
        try:
            flood = [await ask("127.0.0.2") for _ in range(4)]
            first = sorted([await answer(reader) for reader, _ in flood])  # audio-start once taken
            home = await ask("127.0.0.3")
            heard = await answer(home[0])
            for _, writer in [*flood, home]:
                writer.close()
            return first, heard
        finally:
            voices.engine("joe", "1").valve.open()
            await server.drain(1.0)

    loop = asyncio.new_event_loop()
    try:
        first, heard = loop.run_until_complete(go())
    finally:
        loop.close()
        voices.close()
    assert first == ["audio-start", "audio-start", "busy", "busy"] and heard == "audio-start"


def test_a_stream_whose_version_is_rolled_back_goes_on_with_the_serving_one(tmp_path: Path) -> None:
    """A rollback away from the version that spoke a stream's first sentence unloads it: the rest
    of the answer was cut off with "voice joe has no loaded version 2". It is spoken by the
    version that serves now."""
    voices = FakeVoices(tmp_path, {"joe": {"1": {}, "2": {}}})

    async def client_side(client: AsyncUnixClient) -> list[Event]:
        got: list[Event] = []
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text="One. ").event())
        while not AudioChunk.is_type((event := await client.read_event()).type):
            got.append(event)
        await until(lambda: voices.map.in_flight(("joe", "2")) == 0)
        voices.map.activate(("joe", "1"))  # the rollback: 1 serves, 2 goes
        assert voices.map.remove(("joe", "2"))
        await client.write_event(SynthesizeChunk(text="Two. ").event())
        await client.write_event(SynthesizeStop().event())
        while not SynthesizeStopped.is_type((event := await client.read_event()).type):
            got.append(event)
        return got

    try:
        events = talk(voices, tmp_path, client_side)
        assert not [Error.from_event(e).text for e in events if Error.is_type(e.type)]
        assert voices.engine("joe", "2").rendered == 1 and voices.engine("joe", "1").rendered == 1
    finally:
        voices.close()
