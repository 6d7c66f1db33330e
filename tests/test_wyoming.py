"""The Wyoming front end end to end: ``ttsd serve --wyoming unix://…`` in a subprocess on the
built-in voice, driven by the ``wyoming`` package's own client, as Home Assistant drives it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
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


async def send_raw(path: str, raw: bytes) -> bytes:
    """``raw`` on a fresh connection to the socket at ``path``, then end of input: everything the
    daemon answers before it closes."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return answer


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


@pytest.mark.daemon
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
    # Home Assistant shows the description as the voice's name: short, as wyoming-piper's; the
    # version has a field of its own; the attribution is the voice's licence, not a placeholder
    assert voice.description == "joe (medium)" and voice.version == "1"
    assert voice.attribution.name.startswith("CC0 dataset (NabuCasa voice-datasets)")
    assert program.name == "ttsd" and program.attribution.name == "ttsd"


@pytest.mark.daemon
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


@pytest.mark.daemon
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


@pytest.mark.daemon
@pytest.mark.parametrize("request_event, code", [
    (Synthesize(text="Hello.", voice=SynthesizeVoice(name="nobody")).event(), "unknown_voice"),
    (Synthesize(text="?!...").event(), "bad_request"),
    (Synthesize(text="x" * 6000).event(), "text_too_long"),
    (Event(type="synthesize", data={"text": 42}), "bad_request"),
])
def test_a_bad_request_is_an_error_event_and_the_connection_stays_usable(daemon: Daemon, request_event: Event,
                                                                         code: str) -> None:
    """The error, then the audio-stop a client reading up to it waits for (Home Assistant does);
    the next request on the connection is served."""
    async def go() -> tuple[Error, bytes]:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(request_event)
            error = await read(client)
            assert Error.is_type(error.type), error
            assert AudioStop.is_type((await read(client)).type)
            await client.write_event(Synthesize(text="Still here.").event())
            _, pcm = await audio_of(client)
            return Error.from_event(error), pcm

    error, pcm = asyncio.run(go())
    assert error.code == code and error.text
    assert len(pcm) > 22050  # the next request on the same connection is served


@pytest.mark.daemon
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


def test_several_clients_at_once_each_get_their_whole_answer(daemon: Daemon) -> None:
    texts = ["One client speaks.", "A second client speaks now.", "And a third one, a little longer than that."]

    async def one(text: str) -> int:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(Synthesize(text=text).event())
            _, pcm = await audio_of(client)
            return len(pcm)

    async def go() -> list[int]:
        return list(await asyncio.gather(*(one(t) for t in texts)))

    sizes = asyncio.run(go())
    assert all(size > 22050 for size in sizes) and sizes[2] > sizes[0], sizes


def test_an_oversized_event_ends_the_connection_before_it_is_read(daemon: Daemon) -> None:
    """An event that declares 100 MB of data is refused before any of it is read: the connection
    ends, and the daemon keeps serving."""
    async def go() -> Event | None:
        reader, writer = await asyncio.open_unix_connection(socket_of(daemon))
        writer.write(b'{"type": "synthesize", "version": "1.7.0", "data_length": 100000000}\n' + b"{" * 1000)
        await writer.drain()
        line = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return None if not line else Event(type="unexpected")

    assert asyncio.run(go()) is None
    assert daemon.post("/v1/synthesize", {"text": "Still here."}).status == 200


def drop_version(models: Path, joe_folder: Path, version: str) -> None:
    """The built-in voice again under a new version (hard links: the same bytes, a new manifest)."""
    from ttsd.manifest import pack

    staging = models.parent / f"stage-{version}"
    staging.mkdir()
    for item in joe_folder.iterdir():
        if item.name != "ttsd.json":
            os.link(item, staging / item.name)
    pack(staging, name=VOICE, version=version, engine="vits", sample_rate=22050)
    os.rename(staging, models / f"{VOICE}-{version}")


@pytest.mark.daemon
def test_a_swap_during_a_text_stream_neither_cuts_nor_mixes_its_audio(tmp_path: Path, cache_dir: Path,
                                                                     joe_folder: Path) -> None:
    """1. A text stream starts on version 1 (sentence 1 spoken). 2. Version 2 is dropped in and
    becomes active. 3. The stream's second sentence is still spoken by version 1, and the answer
    ends normally. 4. describe shows version 2; after a rollback, version 1 again."""
    models = tmp_path / "models"
    models.mkdir()
    drop_version(models, joe_folder, "1")
    socket_path = tmp_path / "wyoming.sock"
    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--settle", "0.2", "--wyoming", f"unix://{socket_path}")

    def spoken_by(version: str) -> float:
        return d.metric("ttsd_requests_total", voice=VOICE, version=version, route="wyoming", outcome="ok")

    async def describe() -> str | None:
        async with AsyncUnixClient(str(socket_path)) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await read(client)).tts[0].voices[0].version

    async def stream() -> list[str]:
        async with AsyncUnixClient(str(socket_path)) as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="The first sentence is spoken by version one. ").event())
            kinds = [(await read(client)).type]  # audio-start: sentence 1 is under way
            drop_version(models, joe_folder, "2")
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: d.request("GET", "/v1/voices").json()["voices"][0]["active"] == "2",
                                       timeout=120, what="version 2 active"))
            await client.write_event(SynthesizeChunk(text="And so is the second one.").event())
            await client.write_event(SynthesizeStop().event())
            while kinds[-1] != "synthesize-stopped":
                kinds.append((await read(client)).type)
            return kinds

    try:
        kinds = asyncio.run(stream())
        assert kinds[0] == "audio-start" and kinds[-2:] == ["audio-stop", "synthesize-stopped"], kinds
        assert "error" not in kinds
        assert spoken_by("1") == 1 and spoken_by("2") == 0  # one stream: one request, on version 1
        assert asyncio.run(describe()) == "2"
        assert d.post("/v1/voices/" + VOICE + "/rollback", {}).status == 200
        assert asyncio.run(describe()) == "1"
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.daemon
def test_sigterm_lets_a_wyoming_answer_finish(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """SIGTERM while a Wyoming answer is being spoken: it is spoken to the end (within the grace
    period), then the daemon exits 0 and removes its Wyoming socket."""
    import signal

    socket_path = tmp_path / "wyoming.sock"
    d = start_daemon(tmp_path, cache_dir, "--wyoming", f"unix://{socket_path}")
    text = "A goodbye that is spoken to its very end. " * 3

    async def go() -> int:
        async with AsyncUnixClient(str(socket_path)) as client:
            await client.write_event(Synthesize(text=text).event())
            first = await read(client)
            assert AudioStart.is_type(first.type)
            d.proc.send_signal(signal.SIGTERM)
            pcm = 0
            while not AudioStop.is_type((event := await read(client)).type):
                pcm += len(AudioChunk.from_event(event).audio)
            return pcm

    pcm = asyncio.run(go())
    assert pcm / 2 / 22050 > 4.0  # three sentences, all of them
    assert d.proc.wait(60) == 0, d.logs()
    assert not socket_path.exists()


@pytest.mark.daemon
def test_tcp_with_an_mdns_announcement(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """--wyoming tcp://127.0.0.1:PORT --wyoming-zeroconf NAME: the daemon serves Wyoming on TCP,
    and says why it does not announce a loopback address over mDNS (no other box could use it)."""
    from wyoming.client import AsyncTcpClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = start_daemon(tmp_path, cache_dir, "--wyoming", f"tcp://127.0.0.1:{port}", "--wyoming-zeroconf", "test-box")

    async def go() -> Info:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await read(client))

    try:
        assert asyncio.run(go()).tts[0].voices[0].name == VOICE
        wait_for(lambda: "not announcing Wyoming over mDNS: it listens on 127.0.0.1" in d.logs(),
                 timeout=30, what="why a loopback bind is not announced")
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.daemon
def test_an_announcement_without_the_zeroconf_package_fails_before_the_voices_load(tmp_path: Path,
                                                                                  cache_dir: Path) -> None:
    """A box without the zeroconf extra: one line and exit 3 before the built-in voice is seeded
    (it came after every voice had loaded, seconds to minutes in)."""
    hidden = tmp_path / "hide"
    (hidden / "zeroconf").mkdir(parents=True)
    (hidden / "zeroconf" / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "ttsd", "serve", "--models", str(tmp_path / "m"), "--state",
                           str(tmp_path / "s"), "--socket", str(tmp_path / "x.sock"), "--cache", str(cache_dir),
                           "--wyoming", f"tcp://127.0.0.1:{port}", "--wyoming-zeroconf", "box"],
                          capture_output=True, text=True, timeout=60, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and lines[-1].startswith("error: --wyoming-zeroconf needs the zeroconf"), proc.stderr
    # and before the models and state dirs are made (they were, with STATE/lock)
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists() and not (tmp_path / "s").exists()


@pytest.mark.daemon
@pytest.mark.parametrize("raw", [
    b'{"type": "synthesize", "data_length": 5}\n[1,2]',  # data that is not an object
    b'{"data": {"text": "no type"}}\n',
    b'[1, 2, 3]\n',
    b'{"type": "synthesize", "data": ["not", "an", "object"]}\n',
    b'{"type": "synthesize", "data": {"text": "hi", "voice": "not an object"}}\n',
    b'{"type": "synthesize-chunk", "data": {"text": 5}}\n',
    b'\xff\xfe not json at all\n',
    b'{"type": "describe", "data_length": 1048576, "pad": [' + b'{},' * 5000 + b'{}]}\n',  # objects, not bytes
])
def test_malformed_events_end_or_answer_quietly_and_the_daemon_serves_on(daemon: Daemon, raw: bytes) -> None:
    answer = asyncio.run(send_raw(socket_of(daemon), raw))
    # closed, an error event, or (a voice field the protocol library reads as "no voice") audio
    assert answer == b"" or answer.startswith((b'{"type": "error"', b'{"type": "audio-start"')), answer[:200]
    assert "Traceback" not in daemon.logs()
    assert daemon.post("/v1/synthesize", {"text": "Still here."}).status == 200


def test_an_event_of_many_small_values_is_refused_before_its_data_is_awaited() -> None:
    """A MiB of ``{},`` parses into some 25 MB of objects: a header like it, held while its
    connection waited for the data it announced, took the daemon to 3.7 GB from 128 clients. It
    is refused when parsed; an event with a few hundred values is not."""
    from ttsd.front.wyoming_io import MAX_EVENT_VALUES, BadFrame, read_event

    async def read(raw: bytes) -> object:
        reader = asyncio.StreamReader(limit=2 << 20)
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_event(reader)

    many = b'{"type": "describe", "data_length": 10, "pad": [' + b"[]," * MAX_EVENT_VALUES + b"[]]}\n"
    with pytest.raises(BadFrame, match="more than 4096 JSON values"):
        asyncio.run(read(many))
    data = json.dumps({"text": "hi", "voice": {"name": "joe"}, "list": list(range(300))}).encode()
    event = asyncio.run(read(b'{"type": "synthesize", "data_length": %d}\n' % len(data) + data))
    assert event.type == "synthesize" and event.data["text"] == "hi"  # type: ignore[attr-defined]


def test_an_event_is_bounded_by_what_a_request_can_hold_and_its_payload_is_not_kept() -> None:
    """A connection waiting for the rest of an event held its header line, data and payload, each
    up to 1 MiB: 128 stalled connections took 540 MB the allocator kept. Data is bounded by what
    --max-chars of text can take as JSON (the longest escapes), and a payload (a TTS server uses
    none) is read in pieces and dropped."""
    from ttsd.front.wyoming_io import BadFrame, event_bytes, read_event

    limit = event_bytes(5000)
    assert 64 << 10 <= limit < 1 << 20

    async def read(raw: bytes) -> object:
        reader = asyncio.StreamReader(limit=limit)
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_event(reader, limit)

    longest = json.dumps({"text": "\U0001F600" * 5000, "voice": {"name": "x" * 200}}).encode()  # ensure_ascii
    assert len(longest) > 60_000
    for field in ("data_length", "payload_length"):
        with pytest.raises(BadFrame, match=f"{field} must be a whole number of bytes up to {limit}"):
            asyncio.run(read(b'{"type": "synthesize", "%s": %d}\n' % (field.encode(), limit + 1)))
    event = asyncio.run(read(b'{"type": "synthesize", "data_length": %d, "payload_length": %d}\n'
                             % (len(longest), limit) + longest + b"\0" * limit))
    assert event.type == "synthesize" and event.payload is None  # type: ignore[attr-defined]
    assert len(event.data["text"]) == 5000  # type: ignore[attr-defined]


def test_a_text_stream_that_never_ends_a_sentence_is_refused_at_the_limit(daemon: Daemon) -> None:
    """Text streamed without a sentence end is refused once it is longer than any sentence may
    be (--max-chars), not buffered further: one error; the rest of the stream is ignored, its
    stop answered with synthesize-stopped; the connection stays usable."""
    async def go() -> tuple[Error, int]:
        async with AsyncUnixClient(socket_of(daemon)) as client:
            await client.write_event(SynthesizeStart().event())
            for _ in range(60):
                await client.write_event(SynthesizeChunk(text="word " * 20).event())
            await client.write_event(Synthesize(text="word " * 1200).event())  # the whole text, as clients send
            await client.write_event(SynthesizeStop().event())
            error = await read(client)
            assert Error.is_type(error.type), error
            assert SynthesizeStopped.is_type((await read(client)).type)
            await client.write_event(Synthesize(text="Still here.").event())
            _, pcm = await audio_of(client)
            return Error.from_event(error), len(pcm)

    error, size = asyncio.run(go())
    assert error.code == "text_too_long" and size > 22050


@pytest.mark.daemon
def test_a_second_daemon_never_takes_a_live_wyoming_socket(daemon: Daemon, tmp_path: Path) -> None:
    """A second daemon (its own HTTP socket and state dir) given the running one's Wyoming socket
    exits 3 saying another ttsd serves there; it does not unlink the socket from under the first,
    whose Wyoming clients keep connecting."""
    import subprocess
    import sys

    wyoming = socket_of(daemon)
    proc = subprocess.Popen([sys.executable, "-m", "ttsd", "serve", "--no-seed", "--models", str(tmp_path / "m"),
                             "--state", str(tmp_path / "s"), "--socket", str(tmp_path / "h.sock"),
                             "--wyoming", f"unix://{wyoming}"], env=daemon.env, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the second daemon took the Wyoming socket over") from None
    assert proc.returncode == 3
    assert err.decode().strip().splitlines()[-1] == f"error: another ttsd is already serving on {wyoming}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(wyoming))  # still the first daemon's
