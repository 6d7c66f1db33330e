"""No Wyoming client may hold the daemon hostage (Wyoming has no authentication and is often open
to the LAN), and every answer ends as a client waits for it to, on real daemons:

* a client that asks for speech and never reads (a raw TCP socket with a small receive buffer) is
  cut off after --write-timeout: its slot freed, its synthesis cancelled; meanwhile it holds no
  worker, only its answer's audio;
* malformed framing closes its connection with one warning line, no traceback, and a flood of it
  is a few lines;
* the gaps of the text-stream protocol: synthesize-stop without a stream, a second
  synthesize-start in the middle of one, an error after audio-start."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_util import Daemon, start_daemon, wait_for
from test_wyoming import send_raw
from wyoming.client import AsyncUnixClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

MEMORY = ("RssAnon", "RssFile", "VmRSS")
TEXT = ("The kitchen lights are on and the front door is locked for the night. " * 80)[:4990]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def frame(event: Event) -> bytes:
    """An event as the protocol frames it: a JSON header line, then its data."""
    data = json.dumps(event.data).encode()
    return json.dumps({"type": event.type, "data_length": len(data)}).encode() + b"\n" + data


def never_reading(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A client at address ``source`` that asks for TEXT and never reads: a 4 KiB receive buffer,
    so its side of the connection is full at once."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.bind((source, 0))
    client.connect(("127.0.0.1", port))
    client.sendall(frame(Synthesize(text=TEXT).event()))
    return client


def describe(port: int) -> bytes:
    """The answer to describe on a new connection (b"" if the daemon closes it unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        try:
            client.sendall(frame(Describe().event()))
            return client.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def wyoming_cancelled(d: Daemon) -> float:
    return d.metric("ttsd_requests_total", route="wyoming", outcome="cancelled")


def running(d: Daemon) -> tuple[int, int]:
    queue = d.request("GET", "/v1/status").json()["queue"]
    return queue["running"], queue["waiting"]


@pytest.mark.daemon
def test_a_client_that_never_reads_is_cut_off_at_the_write_deadline_and_frees_its_slot(
        tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """1. Two clients that never read, from two addresses (one address holds at most half the
    slots), take both slots (--max-connections 2): a third connection is closed unanswered. 2. After --write-timeout (2 s here) with nothing taken, each is cut off:
    logged, its synthesis cancelled, the worker free. 3. A new client is served."""
    port = free_port()
    d = start_daemon(tmp_path, cache_dir, "--wyoming", f"tcp://127.0.0.1:{port}",
                     "--write-timeout", "2", "--max-connections", "2")
    cancelled = wyoming_cancelled(d)
    hostages = [never_reading(port, source) for source in ("127.0.0.2", "127.0.0.3")]
    try:
        time.sleep(0.5)
        assert describe(port) == b""  # no slot left
        # each is cut off 2 s after its buffers are full: about a second of synthesis on an idle box
        # (minutes of it on a box busy with other work, hence the timeouts)
        wait_for(lambda: describe(port).startswith(b'{"type": "info"'), timeout=300, interval=0.5,
                 what="a slot freed by the write deadline")
        wait_for(lambda: d.logs().count("left its answer unread for 2 s; connection closed") == 2, timeout=300,
                 what="both clients cut off")
        wait_for(lambda: wyoming_cancelled(d) == cancelled + 2, timeout=60, what="both syntheses cancelled")
        wait_for(lambda: running(d) == (0, 0), timeout=60, what="the worker free")
        for hostage in hostages:  # the daemon's side is closed: the client sees the end of the stream
            hostage.settimeout(30)
            try:
                while hostage.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass
        assert d.post("/v1/synthesize", {"text": "Still here."}).status == 200
    finally:
        for hostage in hostages:
            hostage.close()
        assert d.stop() == 0, d.logs()
    assert "Traceback" not in d.logs()


@pytest.mark.daemon
def test_a_client_that_never_reads_holds_no_worker(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """A client asks for 4,990 characters (minutes of audio) and never reads. On the one worker,
    another client's short answer comes in the time of its own synthesis, not after the hostage's
    write deadline: the worker waited while the hostage was 1 MiB behind, and with it every other
    request of the box (one client reconnecting each minute kept it mute). What the daemon holds
    for the hostage is its answer's audio, no more; cut off, it is freed."""
    port = free_port()
    d = start_daemon(tmp_path, cache_dir, "--wyoming", f"tcp://127.0.0.1:{port}", "--workers", "1",
                     "--write-timeout", "300")
    reply = d.post("/v1/synthesize", {"text": "Warm up."})  # the voice warm, memory settled
    assert reply.status == 200
    before = d.rss_mb("RssAnon")
    hostage = never_reading(port)
    try:
        wait_for(lambda: running(d) == (1, 0), timeout=60, what="the hostage's synthesis")
        # its synthesis ends (tens of seconds of CPU) while it still reads nothing, long before the
        # 300 s write deadline the worker waited for
        wait_for(lambda: running(d) == (0, 0), timeout=200, what="the worker free with the hostage connected")
        started = time.monotonic()
        assert d.post("/v1/synthesize", {"text": "Is anyone there?"}).status == 200
        assert time.monotonic() - started < 30
        grown = d.rss_mb("RssAnon") - before
        # the answer as 16-bit PCM: ~4 minutes of 22.05 kHz audio, ~10 MB, plus its latents
        assert grown < 60, f"{grown:.1f} MB held for one client that never read"
    finally:
        hostage.close()
    assert d.stop() == 0, d.logs()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, joe_folder: Path) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("wyoming-limits")
    d = start_daemon(root, cache_dir, "--max-audio-seconds", "4", "--wyoming", f"unix://{root / 'wyoming.sock'}",
                     per_test=False)
    try:
        yield d
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.daemon
def test_malformed_framing_is_one_warning_line_per_connection_and_a_flood_a_few(daemon: Daemon) -> None:
    """A header nested 60,000 deep and a fractional data_length (then the client goes) each close
    their connection with one warning line, no traceback; fifty more are a line or two."""
    deep, fractional = b"[" * 60000 + b"\n", b'{"type": "synthesize", "data_length": 1.5}\n{'
    for raw, reason in ((deep, "an event header that is not JSON"), (fractional, "data_length must be a whole")):
        mark = daemon.log_mark()
        assert asyncio.run(send_raw(str(daemon.root / "wyoming.sock"), raw)) == b""
        daemon.wait_for_log("Wyoming: closed a connection that sent", since=mark, timeout=10)
        time.sleep(0.2)
        lines = daemon.logs(since=mark).strip().splitlines()
        assert len(lines) == 1 and reason in lines[0] and "WARNING" in lines[0], lines
    mark = daemon.log_mark()
    for _ in range(25):
        for raw in (deep, fractional):
            assert asyncio.run(send_raw(str(daemon.root / "wyoming.sock"), raw)) == b""
    time.sleep(0.5)
    flood = daemon.logs(since=mark)
    assert len(flood.strip().splitlines()) <= 4 and "Traceback" not in daemon.logs(), flood
    assert daemon.post("/v1/synthesize", {"text": "Still here."}).status == 200


async def exchange(d: Daemon, *events: Event, ends: int = 1, until: str = "synthesize-stopped") -> list[str]:
    """Event types answered to ``events`` on one connection, up to the ``ends``-th ``until``."""
    async with AsyncUnixClient(str(d.root / "wyoming.sock")) as client:
        for event in events:
            await client.write_event(event)
        kinds: list[str] = []
        while kinds.count(until) < ends:
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None, kinds
            kinds.append(event.type)
            if Error.is_type(event.type):
                kinds[-1] = f"error:{Error.from_event(event).code}"
        return [k for i, k in enumerate(kinds) if k != "audio-chunk" or kinds[i - 1] != "audio-chunk"]


@pytest.mark.daemon
def test_synthesize_stop_without_a_stream_is_answered(daemon: Daemon) -> None:
    """No synthesize-start before it, or a second one: an error and synthesize-stopped, and the
    connection serves on."""
    assert asyncio.run(exchange(daemon, SynthesizeStop().event(), SynthesizeStop().event(), ends=2)) == [
        "error:bad_request", "synthesize-stopped", "error:bad_request", "synthesize-stopped"]
    assert asyncio.run(exchange(daemon, SynthesizeStop().event(), Synthesize(text="Hello.").event(),
                                until="audio-stop")) == [
        "error:bad_request", "synthesize-stopped", "audio-start", "audio-chunk", "audio-stop"]


@pytest.mark.daemon
def test_a_stream_that_failed_is_ignored_up_to_its_stop_which_is_answered(daemon: Daemon) -> None:
    kinds = asyncio.run(exchange(daemon, SynthesizeStart().event(),
                                 Event(type="synthesize-chunk", data={"text": 5}),
                                 SynthesizeChunk(text="Never spoken. ").event(), Synthesize(text="Never spoken.").event(),
                                 SynthesizeStop().event()))
    assert kinds == ["error:bad_request", "synthesize-stopped"]


@pytest.mark.daemon
def test_a_second_synthesize_start_ends_the_first_stream_as_its_stop_would(daemon: Daemon) -> None:
    """Its pending text is spoken, its audio stopped, synthesize-stopped; then the second stream,
    whole: two answers, each well formed, none of the text dropped."""
    kinds = asyncio.run(exchange(daemon, SynthesizeStart().event(), SynthesizeChunk(text="The first answer").event(),
                                 SynthesizeStart().event(), SynthesizeChunk(text="The second one. ").event(),
                                 SynthesizeStop().event(), ends=2))
    one = ["audio-start", "audio-chunk", "audio-stop", "synthesize-stopped"]
    assert kinds == one + one


@pytest.mark.daemon
def test_an_error_after_audio_start_still_ends_the_audio(daemon: Daemon) -> None:
    """--max-audio-seconds 4, crossed by the second sentence, after the first one's audio went
    out: a whole text gets the error, then audio-stop; a text stream gets the error and audio-stop,
    the rest of its text is ignored, and its stop gets synthesize-stopped."""
    first = "This first sentence is spoken in full. "
    second = ("The second sentence of this answer goes over the daemon's limit of four seconds of audio, "
              "by quite a few more words than it would need to. ")
    assert asyncio.run(exchange(daemon, Synthesize(text=first + second + first).event(), until="audio-stop")) == [
        "audio-start", "audio-chunk", "error:audio_too_long", "audio-stop"]
    kinds = asyncio.run(exchange(daemon, SynthesizeStart().event(), SynthesizeChunk(text=first).event(),
                                 SynthesizeChunk(text=second).event(), SynthesizeChunk(text=first).event(),
                                 SynthesizeStop().event()))
    assert kinds == ["audio-start", "audio-chunk", "error:audio_too_long", "audio-stop", "synthesize-stopped"]


@pytest.mark.daemon
def test_one_address_holds_at_most_half_the_wyoming_slots(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """A host that never reads took every slot (--max-connections 2) and Home Assistant on another
    host was refused until the write deadline, again at each reconnection. Now its second
    connection is closed at once, another address is answered meanwhile, and it is said once."""
    port = free_port()
    d = start_daemon(tmp_path, cache_dir, "--wyoming", f"tcp://127.0.0.1:{port}", "--max-connections", "2")
    hostage = never_reading(port, "127.0.0.2")
    try:
        second = never_reading(port, "127.0.0.2")
        second.settimeout(10)
        try:
            assert second.recv(1 << 16) == b"", "its second connection is closed unanswered"
        except ConnectionResetError:
            pass
        second.close()
        assert describe(port).startswith(b'{"type": "info"')  # from 127.0.0.1
        assert d.logs().count("127.0.0.2 holds its share, half of the 2 connections") == 1
    finally:
        hostage.close()
        assert d.stop() == 0, d.logs()
