"""The Wyoming front end: Home Assistant's voice pipeline (and other voice stacks) speak to ttsd
over the Wyoming protocol, with the ``wyoming`` package's server and event classes.

* ``describe`` → ``info``: every voice that serves, with its active version in the description,
  languages, speakers and licence; built from the backend at each request, so a swap or rollback
  shows at once.
* ``synthesize`` → ``audio-start``, ``audio-chunk``s of 16-bit mono PCM as the engine makes them
  (below the sentence, as the HTTP stream does), ``audio-stop``.
* streaming text: ``synthesize-start``, ``synthesize-chunk``s, ``synthesize-stop``. Each sentence
  is spoken as soon as it is complete in the text received so far; one ``audio-start`` before the
  first and one ``audio-stop`` after the last, then ``synthesize-stopped``. A ``synthesize``
  during a stream (clients send the whole text too, for servers without streaming) is ignored.
  Every sentence of a stream is spoken by the version that spoke the first, so a swap never
  mixes two versions in one answer.
* a request's error (unknown voice, bad text) is an ``error`` event and the connection stays open.

Requests go through the same queue, workers, leases, canary and metrics (``route="wyoming"``) as
HTTP. A client that goes away cancels its synthesis after the current piece. Wyoming has no
authentication: bind TCP to loopback unless the network is trusted (the daemon warns otherwise).
Runs on the event loop; synthesis is the pool's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import (
    Attribution,
    Describe,
    Info,
    TtsProgram,
    TtsVoice,
    TtsVoiceSpeaker,
)
from wyoming.server import AsyncEventHandler
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from .. import __version__
from ..audio import Audio
from ..errors import BusyError, ConfigError, RequestError, TextTooLongError, TtsdError
from ..options import SynthesisOptions
from ..text import check_text, split_sentences
from .backend import Backend
from .listeners import check_socket
from .speech_request import parse_speaker
from .synth import Job, Result

log = logging.getLogger("ttsd.wyoming")

ROUTE = "wyoming"
MAX_EVENT_BYTES = 1 << 20  # one event's header line, data or payload (a request's text is far less)
IDLE_SECONDS = 60.0  # between a client's events (an LLM streaming text may pause a while)
MAX_STREAM_CHARS_FACTOR = 4  # a text stream may send this many times --max-chars in all
ATTRIBUTION = Attribution(name="ttsd", url="")


class WyomingServer:
    """The Wyoming listener on ``uri`` (``tcp://HOST:PORT`` or ``unix://PATH``): asyncio's server,
    the ``wyoming`` package's handler and framing, and the bounds every listener of ttsd has: at
    most ``max_connections`` open connections, ``idle_timeout`` seconds between a client's events,
    events of at most ``MAX_EVENT_BYTES``, and a drain on shutdown (requests being spoken finish
    within the grace period; idle connections close at once)."""

    def __init__(
        self, uri: str, backend: Backend, *, max_connections: int = 128, idle_timeout: float = IDLE_SECONDS
    ) -> None:
        self.uri = uri
        self.backend = backend
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.closing = False
        self.advertisement: Advertisement | None = None  # mDNS, when asked for (TCP only)
        self._server: asyncio.AbstractServer | None = None
        self._handlers: dict[asyncio.Task[None], _Handler] = {}

    async def start(self) -> None:
        uri = urlparse(self.uri)
        if uri.scheme == "unix":
            check_socket(Path(uri.path), "--wyoming")  # a live daemon's socket is never taken over
            self._server = await asyncio.start_unix_server(self._accept, uri.path, limit=MAX_EVENT_BYTES)
        else:
            self._server = await asyncio.start_server(self._accept, uri.hostname, uri.port, limit=MAX_EVENT_BYTES)
        if self.advertisement is not None:
            await self.advertisement.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closing or len(self._handlers) >= self.max_connections:
            writer.close()
            return
        handler = _Handler(reader, writer, self.backend, self)
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = handler
        try:
            await handler.run()
        finally:
            self._handlers.pop(task, None)

    async def drain(self, grace: float) -> None:
        """Stop accepting; close idle connections now; let requests being spoken finish for up to
        ``grace`` seconds, then cut the rest (their synthesis is cancelled)."""
        self.closing = True
        if self.advertisement is not None:
            await self.advertisement.stop()
        if self._server is not None:
            self._server.close()
        for handler in list(self._handlers.values()):
            if not handler.busy:
                await handler.stop()
        tasks = list(self._handlers)
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=grace)
            for task in running:
                task.cancel()
        uri = urlparse(self.uri)
        if uri.scheme == "unix":
            Path(uri.path).unlink(missing_ok=True)


def info(backend: Backend) -> Info:
    """What ``describe`` answers: one TTS program with every voice that has an active version."""
    voices = []
    for voice in backend.voices():
        if not voice.get("active"):
            continue
        description = voice.get("description") or f"ttsd voice {voice['name']}"
        voices.append(
            TtsVoice(
                name=voice["name"],
                description=f"{description} (version {voice['active']})",
                attribution=Attribution(name=voice.get("license") or "see the voice's model card", url=""),
                installed=True,
                version=str(voice["active"]),
                languages=list(voice.get("languages") or []),
                speakers=[TtsVoiceSpeaker(name=s) for s in voice.get("speakers") or []] or None,
            )
        )
    program = TtsProgram(
        name="ttsd",
        description="ttsd text-to-speech daemon",
        attribution=ATTRIBUTION,
        installed=True,
        version=__version__,
        voices=voices,
        supports_synthesize_streaming=True,
    )
    return Info(tts=[program])


@dataclass
class _Stream:
    """A text stream in progress: its voice, the text not yet spoken, what was sent so far."""

    voice: SynthesizeVoice | None
    pending: str = ""
    received: int = 0
    version: str | None = None  # pinned by the first sentence spoken
    started: bool = False  # audio-start sent


class _Handler(AsyncEventHandler):
    """One client connection; events are handled one at a time, in order."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: Backend, server: WyomingServer
    ) -> None:
        super().__init__(reader, writer)
        self.backend = backend
        self.server = server
        self.busy = False
        self._stream: _Stream | None = None
        self._job: Job | None = None  # the request being spoken, cancelled if the connection ends
        # The wyoming reader reads whatever length an event declares; a declared length over the
        # bound is refused before a byte of it is read (its ValueError ends the connection).
        readexactly = reader.readexactly

        async def bounded(n: int) -> bytes:
            if n > MAX_EVENT_BYTES:
                raise ValueError(f"a Wyoming event of {n} bytes is over {MAX_EVENT_BYTES}")
            return await readexactly(n)

        reader.readexactly = bounded  # type: ignore[method-assign]

    async def run(self) -> None:
        """Events until the client goes, falls silent for ``idle_timeout``, or the server drains."""
        try:
            while not self.server.closing:
                try:
                    event = await asyncio.wait_for(async_read_event(self.reader), self.server.idle_timeout)
                except TimeoutError:
                    break
                except (AttributeError, KeyError, TypeError) as exc:  # framing the reader does not catch
                    log.debug("closing a Wyoming connection that sent a malformed event: %r", exc)
                    break
                if event is None:
                    break
                self.busy = True
                try:
                    if not await self.handle_event(event):
                        break
                finally:
                    self.busy = False
        except ConnectionError:
            pass
        finally:
            if self._job is not None:
                self._job.cancel.set()
            self.writer.close()

    async def handle_event(self, event: Event) -> bool:
        try:
            if Describe.is_type(event.type):
                await self.write_event(info(self.backend).event())
            elif SynthesizeStart.is_type(event.type):
                self._stream = _Stream(SynthesizeStart.from_event(event).voice)
            elif SynthesizeChunk.is_type(event.type) and self._stream is not None:
                await self._chunk(self._stream, SynthesizeChunk.from_event(event).text)
            elif SynthesizeStop.is_type(event.type) and self._stream is not None:
                stream, self._stream = self._stream, None
                await self._finish(stream)
            elif Synthesize.is_type(event.type) and self._stream is None:
                request = Synthesize.from_event(event)
                await self._speak(request.text, request.voice, start=True, stop=True)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except TtsdError as exc:
            self._stream = None
            await self.write_event(Error(text=str(exc), code=exc.code).event())
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a malformed event
            self._stream = None
            await self.write_event(Error(text=f"bad {event.type} event: {exc}", code="bad_request").event())
        return True

    async def _chunk(self, stream: _Stream, text: Any) -> None:
        if not isinstance(text, str):
            raise RequestError("synthesize-chunk text must be a string")
        stream.received += len(text)
        if stream.received > MAX_STREAM_CHARS_FACTOR * self.backend.max_chars:
            raise RequestError(f"the text stream is over {MAX_STREAM_CHARS_FACTOR * self.backend.max_chars} characters")
        stream.pending += text
        if len(stream.pending) > self.backend.max_chars:  # no sentence can be that long: say so now
            raise TextTooLongError(f"a sentence of the text stream is over {self.backend.max_chars} characters")
        sentences = split_sentences(stream.pending)
        if len(sentences) < 2 and not _ends_sentence(stream.pending):
            return  # the sentence being sent is not complete yet
        complete = sentences if _ends_sentence(stream.pending) else sentences[:-1]
        stream.pending = "" if _ends_sentence(stream.pending) else sentences[-1]
        for sentence in complete:
            await self._say_in_stream(stream, sentence)

    async def _finish(self, stream: _Stream) -> None:
        if stream.pending.strip():
            await self._say_in_stream(stream, stream.pending)
        if stream.started:
            await self.write_event(AudioStop().event())
        await self.write_event(SynthesizeStopped().event())

    async def _say_in_stream(self, stream: _Stream, sentence: str) -> None:
        try:
            check_text(sentence, self.backend.max_chars)
        except RequestError:
            return  # e.g. "..." alone: nothing to speak in this piece, the stream goes on
        version = await self._speak(
            sentence, stream.voice, start=not stream.started, stop=False, version=stream.version
        )
        stream.started, stream.version = True, version

    async def _speak(
        self, text: str, voice: SynthesizeVoice | None, *, start: bool, stop: bool, version: str | None = None
    ) -> str:
        """Synthesize ``text`` and send its audio as it is made; returns the version that spoke."""
        started = time.monotonic()
        name = voice.name if voice is not None else None
        try:
            text = check_text(text, self.backend.max_chars)
            options = SynthesisOptions(speaker=parse_speaker(voice.speaker if voice is not None else None))
            if not self.backend.ready():
                raise BusyError("no voice is ready yet", retry_after=5)
            lease = await self.backend.lease(name, version)
        except TtsdError as exc:
            self._count(None, None, exc.code, exc.fault)
            raise
        served = lease.voice
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Audio | BaseException | None] = asyncio.Queue()
        job = Job(
            text=text,
            options=options,
            lease=lease,
            route=ROUTE,
            on_chunk=lambda chunk: loop.call_soon_threadsafe(chunks.put_nowait, chunk),
        )
        try:
            future: Future[Result] = self.backend.submit(job)
            self._job = job
        except TtsdError as exc:
            self._count(served.name, served.version, exc.code, exc.fault)
            raise
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(chunks.put_nowait, f.exception()))
        try:
            if start:
                await self.write_event(AudioStart(rate=served.sample_rate, width=2, channels=1).event())
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                await self.write_event(
                    AudioChunk(rate=item.sample_rate, width=2, channels=1, audio=item.to_pcm16()).event()
                )
            if stop:
                await self.write_event(AudioStop().event())
        except (asyncio.CancelledError, ConnectionError):
            job.cancel.set()  # the client went away: stop after the current piece
            self._count(served.name, served.version, "cancelled")
            raise
        except TtsdError as exc:
            self._count(served.name, served.version, exc.code, exc.fault)
            raise
        finally:
            self._job = None
        self._count(served.name, served.version, "ok")
        self.backend.metrics.observe_request(served.name, served.version, ROUTE, time.monotonic() - started)
        return served.version

    def _count(self, voice: str | None, version: str | None, outcome: str, fault: str | None = None) -> None:
        metrics = self.backend.metrics
        metrics.requests.labels(voice or "-", version or "-", ROUTE, outcome).inc()
        if fault is not None:
            metrics.failures.labels(voice or "-", version or "-", ROUTE, fault).inc()


def _ends_sentence(text: str) -> bool:
    """Whether ``text`` ends a sentence already (a stop and a space, so "3." in "3.5" waits)."""
    stripped = text.rstrip()
    return len(stripped) < len(text) and stripped[-1:] in ".!?…。！？"


class Advertisement:
    """The Wyoming service announced over mDNS (``_wyoming._tcp.local.``), as wyoming-piper does,
    so Home Assistant discovers the box by itself. Needs the ``zeroconf`` package (the
    ``ttsd[zeroconf]`` extra); a box where multicast does not work gets a warning, not a failure."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self._zeroconf: Any = None
        self._info: Any = None

    async def start(self) -> None:
        try:
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
        except ImportError:
            raise ConfigError("--wyoming-zeroconf needs the zeroconf package: pip install 'ttsd[zeroconf]'") from None
        address = self.host if self.host not in ("0.0.0.0", "") else _outgoing_address()
        try:
            self._info = AsyncServiceInfo(
                "_wyoming._tcp.local.",
                f"{self.name}._wyoming._tcp.local.",
                addresses=[socket.inet_aton(address)],
                port=self.port,
            )
            self._zeroconf = AsyncZeroconf()
            await self._zeroconf.async_register_service(self._info)
        except (OSError, ValueError) as exc:
            log.warning("cannot announce Wyoming over mDNS (%s); add the integration by host and port", exc)
            await self.stop()
            return
        log.info("announced Wyoming as %s on %s:%d over mDNS", self.name, address, self.port)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            zeroconf, self._zeroconf = self._zeroconf, None
            try:
                if self._info is not None:
                    await zeroconf.async_unregister_service(self._info)
            finally:
                await zeroconf.async_close()


def _outgoing_address() -> str:
    """The address this box would use towards the mDNS group (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("224.0.0.251", 5353))
        return str(probe.getsockname()[0])
