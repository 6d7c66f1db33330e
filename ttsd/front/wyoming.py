"""The Wyoming front end: Home Assistant's voice pipeline (and other voice stacks) speak to ttsd
over the Wyoming protocol, with the ``wyoming`` package's event classes.

* ``describe`` → ``info``: every voice that serves, as ``wyoming_voices`` describes it, read
  afresh at each request, so a swap or rollback shows at once.
* ``synthesize`` → ``audio-start``, ``audio-chunk``s of 16-bit mono PCM as the engine makes them
  (below the sentence, as the HTTP stream does), ``audio-stop``. A voice is chosen by name, or by
  language alone (a voice of that language, never another's).
* streaming text: ``synthesize-start``, ``synthesize-chunk``s, ``synthesize-stop``. Each sentence
  is spoken as soon as it is complete in the text received so far; one ``audio-start`` before the
  first and one ``audio-stop`` after the last, then ``synthesize-stopped``. A ``synthesize``
  during a stream (clients send the whole text too, for servers without streaming) is ignored.
  Every sentence of a stream is spoken by the version that spoke the first.
* every answer ends as the client expects, errors included: a failed ``synthesize`` is an
  ``error`` event, then ``audio-stop``; a failed text stream is an ``error`` (then ``audio-stop``
  if its audio had started), the rest of it is ignored, and its ``synthesize-stop`` is answered
  with ``synthesize-stopped``, as is a ``synthesize-stop`` with no stream. A ``synthesize-start``
  in the middle of a stream ends that stream first, as its ``synthesize-stop`` would.

Requests go through the same queue, workers, leases, canary and metrics (``route="wyoming"``) as
HTTP. Wyoming has no authentication (the daemon warns of a non-loopback bind), so no client may hold
the daemon hostage: ``max_connections`` (half of them at most from one TCP address), ``idle_timeout``
between events, and the bounds of
``wyoming_io`` (event size, malformed events, the audio held for clients that do not read);
``write_timeout`` seconds for a client to take each event, else its connection is cut off, its
synthesis cancelled and its slot freed. Runs on the event loop; synthesis is the pool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Describe
from wyoming.server import AsyncEventHandler
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from ..errors import BusyError, NothingToSpeakError, RequestError, TextTooLongError, TtsdError, UnknownVoiceError
from ..logs import Throttle
from ..options import SynthesisOptions
from ..text import check_text, complete_sentences
from .backend import Backend
from .listeners import WRITE_SECONDS, PeerShare, check_socket
from .speech_request import parse_speaker
from .synth import Cancelled, Job, Result
from .wyoming_io import MAX_EVENT_BYTES, AudioHandoff, BadFrame, UnsentAudio, event_bytes, read_event
from .wyoming_mdns import Advertisement
from .wyoming_voices import choose_voice, info

__all__ = ["MAX_EVENT_BYTES", "Advertisement", "WyomingServer", "info"]

log = logging.getLogger("ttsd.wyoming")

ROUTE = "wyoming"
IDLE_SECONDS = 60.0  # between a client's events (an LLM streaming text may pause a while)
MAX_STREAM_CHARS_FACTOR = 4  # a text stream may send this many times --max-chars in all
# what a request may get wrong: an error event, not the end of the connection
_FAILURES = (TtsdError, AttributeError, KeyError, TypeError, ValueError)


class WyomingServer:
    """The Wyoming listener on ``uri`` (``tcp://HOST:PORT`` or ``unix://PATH``) with the bounds in
    the module docstring, and a drain on shutdown (requests being spoken finish within the grace
    period; idle connections close at once)."""

    def __init__(
        self,
        uri: str,
        backend: Backend,
        *,
        max_connections: int = 128,
        idle_timeout: float = IDLE_SECONDS,
        write_timeout: float = WRITE_SECONDS,
    ) -> None:
        self.uri = uri
        self.backend = backend
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.closing = False
        self.advertisement: Advertisement | None = None  # mDNS, when asked for (TCP only)
        self.refused = 0  # connections over max_connections
        self.peers = PeerShare(max_connections, "Wyoming")  # one TCP address holds at most half of them
        self.jobs_of: dict[str, int] = {}  # requests each TCP address has in the pool (event loop only)
        self.event_bytes = event_bytes(backend.max_chars)  # an event's header line or data, at most
        self.cut_off = 0  # connections whose client left its answer unread for write_timeout
        self.malformed = 0  # connections closed for a malformed event
        self.unsent = UnsentAudio()  # audio made for clients and not yet sent, all together
        self._server: asyncio.AbstractServer | None = None
        self._handlers: dict[asyncio.Task[None], _Handler] = {}
        self._log_refused = Throttle(log, burst=1)
        self._log_cut_off = Throttle(log)
        self._log_malformed = Throttle(log)
        self._log_bug = Throttle(log)

    @property
    def connections(self) -> int:  # open now, each in a slot of max_connections
        return len(self._handlers)

    async def start(self) -> None:
        uri = urlparse(self.uri)
        if uri.scheme == "unix":
            check_socket(Path(uri.path), "--wyoming")  # a live daemon's socket is never taken over
            self._server = await asyncio.start_unix_server(self._accept, uri.path, limit=self.event_bytes)
        else:
            self._server = await asyncio.start_server(self._accept, uri.hostname, uri.port, limit=self.event_bytes)
        if self.advertisement is not None:
            await self.advertisement.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closing or len(self._handlers) >= self.max_connections:
            if not self.closing:
                self.refused += 1
                self._log_refused(
                    logging.WARNING, "Wyoming: %d connections open, the limit; closing new ones", self.max_connections
                )
            writer.transport.abort()
            return
        host = self.peers.take(writer.get_extra_info("peername"))
        if host is None:  # one address holds half the slots already
            writer.transport.abort()
            return
        handler = _Handler(reader, writer, self.backend, self, host)
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = handler
        try:
            await handler.run()
        except Exception:  # a bug: logged (a few times, not once per connection for ever), never raised to asyncio
            self._log_bug(logging.ERROR, "Wyoming: a connection failed", exc_info=True)
        finally:
            self._handlers.pop(task, None)
            self.peers.give(host)

    def job_ended(self, host: str) -> None:
        if (left := self.jobs_of.get(host, 0) - 1) > 0:
            self.jobs_of[host] = left
        else:
            self.jobs_of.pop(host, None)

    def malformed_event(self, reason: BadFrame) -> None:
        self.malformed += 1
        self._log_malformed(logging.WARNING, "Wyoming: closed a connection that sent %s", reason)

    def unread(self) -> None:
        self.cut_off += 1
        self._log_cut_off(
            logging.INFO, "Wyoming: a client left its answer unread for %g s; connection closed", self.write_timeout
        )

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


@dataclass
class _Stream:
    """A text stream in progress: its voice, the text not yet spoken, what was sent so far."""

    voice: SynthesizeVoice | None
    pending: str = ""
    received: int = 0
    pinned: tuple[str, str] | None = None  # (voice, version) of the first sentence, for the rest
    started: bool = False  # audio-start sent
    failed: bool = False  # an error sent: the rest is ignored up to synthesize-stop
    # the stream is one request, counted and judged once at its end (``_Handler._end``): its
    # sentences' jobs count nothing themselves. No lease is held between sentences: an open stream
    # waiting for text is no request in progress (it would slow every background job and hold
    # the memory policy's swap)
    spoke: bool = False  # a sentence was spoken
    failure: TtsdError | None = None  # what ended it early: its code, whose fault
    audio_seconds: float = 0.0  # of all its sentences: bounded by --max-audio-seconds, as a request


class _Handler(AsyncEventHandler):
    """One client connection; events are handled one at a time, in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        backend: Backend,
        server: WyomingServer,
        host: str = "",
    ) -> None:
        super().__init__(reader, writer)
        self.backend = backend
        self.server = server
        self.host = host  # the client's address ("" on a Unix socket)
        self.busy = False
        self._stream: _Stream | None = None
        self._handoff: AudioHandoff | None = None  # the request being spoken, stopped if the connection ends

    async def run(self) -> None:
        """Events until the client goes, falls silent for ``idle_timeout``, sends a malformed
        event, leaves its answer unread for ``write_timeout``, or the server drains."""
        try:
            while not self.server.closing:
                try:
                    event = await asyncio.wait_for(
                        read_event(self.reader, self.server.event_bytes), self.server.idle_timeout
                    )
                except asyncio.TimeoutError:
                    break
                except BadFrame as exc:
                    self.server.malformed_event(exc)
                    break
                if event is None:
                    break
                self.busy = True
                try:
                    await self.handle_event(event)
                finally:
                    self.busy = False
        except (ConnectionError, Cancelled):
            pass
        finally:
            if self._handoff is not None:
                self._handoff.stop()
            if self._stream is not None:  # the client went (or the server closed) mid-stream
                self._end(self._stream, finished=False)
            transport = self.writer.transport
            if transport.get_write_buffer_size():
                transport.abort()  # an answer left unread is dropped, not kept until the client reads it
            else:
                self.writer.close()

    async def write_event(self, event: Event) -> None:
        """Each event must be taken within ``write_timeout`` once the buffers are full; else the
        connection is aborted (its unsent audio dropped) and ``ConnectionResetError`` ends it."""
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), self.server.write_timeout)
        except asyncio.TimeoutError:
            self.server.unread()
            self.writer.transport.abort()
            raise ConnectionResetError(f"the client took nothing for {self.server.write_timeout:g} s") from None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(info(self.backend).event())
        elif SynthesizeStart.is_type(event.type):
            await self._start(event)
        elif SynthesizeChunk.is_type(event.type):
            await self._chunk(event)
        elif SynthesizeStop.is_type(event.type):
            await self._stop()
        elif Synthesize.is_type(event.type) and self._stream is None:
            await self._synthesize(event)
        return True

    async def _synthesize(self, event: Event) -> None:
        """A whole text: audio-start, audio-chunks, audio-stop; or an error, then audio-stop (with
        or without audio-start before it), so a client that reads up to audio-stop gets there."""
        try:
            _check_voice_field(event)
            request = Synthesize.from_event(event)
            await self._speak(request.text, request.voice, None)
        except _FAILURES as exc:
            await self.write_event(_error(exc, event.type))
            await self.write_event(AudioStop().event())

    async def _start(self, event: Event) -> None:
        if self._stream is not None:  # a new stream before the last one's stop: that one ends first
            await self._stop()
        self._stream = _Stream(None)
        try:
            _check_voice_field(event)
            self._stream.voice = SynthesizeStart.from_event(event).voice
        except _FAILURES as exc:
            await self._fail(self._stream, exc, event.type)

    async def _chunk(self, event: Event) -> None:
        stream = self._stream
        if stream is None or stream.failed:
            return  # no stream to add to (its synthesize-stop gets an error), or one that failed
        try:
            await self._add_text(stream, SynthesizeChunk.from_event(event).text)
        except _FAILURES as exc:
            await self._fail(stream, exc, event.type)

    async def _stop(self) -> None:
        """The end of a text stream: its last text spoken, audio-stop, synthesize-stopped. Sent for
        a stream that failed, and for none at all (after an error), so the client stops waiting."""
        stream = self._stream
        if stream is None:
            await self.write_event(Error(text="synthesize-stop without synthesize-start", code="bad_request").event())
        elif not stream.failed:
            try:
                if stream.pending.strip():
                    await self._say_in_stream(stream, stream.pending)
            except _FAILURES as exc:
                await self._fail(stream, exc, "synthesize-stop")
            if stream.started and not stream.failed:
                await self.write_event(AudioStop().event())
        if stream is not None:
            self._stream = None
            self._end(stream, finished=True)
        await self.write_event(SynthesizeStopped().event())

    def _end(self, stream: _Stream, *, finished: bool) -> None:
        """A text stream is over: one request, counted once and judged once, as an HTTP request
        is. Stopped after speaking: "ok", and a success for its version. Ended by a failure: that
        failure's code, and only the model's counts against the version. Its client gone (or the
        server closing) before its stop: "cancelled", judged not at all. A stream that spoke
        nothing and did not fail counts nothing."""
        if stream.pinned is None:
            if stream.failure is not None:
                self._count(None, None, stream.failure.code, stream.failure.fault)
            return
        name, version = stream.pinned
        failure = stream.failure
        if failure is not None:
            self._count(name, version, failure.code, failure.fault)
            verdict: bool | None = False if failure.fault == "model" else None
        elif not finished:
            self._count(name, version, "cancelled")
            verdict = None
        elif stream.spoke:
            self._count(name, version, "ok")
            verdict = True
        else:
            return
        if verdict is not None and self.backend.judge is not None:
            self.backend.judge(name, version, verdict)

    async def _fail(self, stream: _Stream, exc: BaseException, kind: str) -> None:
        """A text stream fails: the error, and audio-stop if its audio had started. The rest of
        the stream is ignored; its synthesize-stop is answered with synthesize-stopped."""
        stream.failed, stream.pending = True, ""
        if stream.failure is None:
            stream.failure = exc if isinstance(exc, TtsdError) else RequestError(f"bad {kind} event")
        await self.write_event(_error(exc, kind))
        if stream.started:
            await self.write_event(AudioStop().event())

    async def _add_text(self, stream: _Stream, text: object) -> None:
        if not isinstance(text, str):
            raise RequestError("synthesize-chunk text must be a string")
        stream.received += len(text)
        if stream.received > MAX_STREAM_CHARS_FACTOR * self.backend.max_chars:
            raise TextTooLongError(
                f"the text stream is over {MAX_STREAM_CHARS_FACTOR * self.backend.max_chars} characters"
            )
        # split first: one chunk may hold many short sentences, over --max-chars in all
        complete, stream.pending = complete_sentences(stream.pending + text)
        if len(stream.pending) > self.backend.max_chars:  # no sentence can be that long: say so now
            raise TextTooLongError(f"a sentence of the text stream is over {self.backend.max_chars} characters")
        for sentence in complete:
            await self._say_in_stream(stream, sentence)

    async def _say_in_stream(self, stream: _Stream, sentence: str) -> None:
        try:
            check_text(sentence, self.backend.max_chars)
        except NothingToSpeakError:
            return  # e.g. "..." alone: nothing to speak in this piece, the stream goes on
        await self._speak(sentence, stream.voice, stream)  # any other fault fails the stream

    def _voice_name(self, voice: SynthesizeVoice | None) -> str | None:
        """The voice asked for: by name; by language alone (``choose_voice``); else the default."""
        if voice is None or voice.name is not None:
            return voice.name if voice is not None else None
        if voice.language is not None:
            return choose_voice(self.backend.voices(), voice.language)
        return None

    async def _speak(self, text: str, voice: SynthesizeVoice | None, stream: _Stream | None) -> None:
        """Synthesize ``text`` and send its audio as it is made: a whole answer (audio-start to
        audio-stop) without ``stream``, else a sentence of that stream (audio-start before its
        first, spoken by the first one's voice and version)."""
        started = time.monotonic()
        try:
            text = check_text(text, self.backend.max_chars)
            options = SynthesisOptions(speaker=parse_speaker(voice.speaker if voice is not None else None))
            if not self.backend.ready():
                raise BusyError("no voice is ready yet", retry_after=5)
            name, version = stream.pinned if stream and stream.pinned else (self._voice_name(voice), None)
            try:
                lease = await self.backend.lease(name, version)
            except UnknownVoiceError:
                if version is None:
                    raise
                # the version that spoke the stream's first sentence went (a rollback away from it,
                # --keep 0, a canary that ended): the rest of the answer is spoken by the voice's
                # serving version rather than cut off with an error mid-answer
                lease = await self.backend.lease(name, None)
                log.info("Wyoming: a text stream of %s %s goes on with %s", name, version, lease.voice.version)
        except TtsdError as exc:
            if stream is None:  # a stream's failure is counted at its end
                self._count(None, None, exc.code, exc.fault)
            raise
        served = lease.voice
        if stream is not None:
            stream.pinned = (served.name, served.version)
        cap = self.backend.max_audio_seconds
        job = Job(text=text, options=options, lease=lease, route=ROUTE, counted=stream is None)
        if stream is not None and cap is not None:  # the stream's sentences in all stay within the cap
            job.audio_limit = max(0.0, cap - stream.audio_seconds)
        handoff = AudioHandoff(asyncio.get_running_loop(), job.cancel, self.server.unsent)
        job.on_chunk = handoff.put  # waits for no single client: only past the bound on all of them
        try:
            future = self._submit(job)
        except TtsdError as exc:
            if stream is None:
                self._count(served.name, served.version, exc.code, exc.fault)
            raise
        future.add_done_callback(lambda f: handoff.end(Cancelled() if f.cancelled() else f.exception()))
        self._handoff = handoff
        try:
            if stream is None or not stream.started:
                await self.write_event(AudioStart(rate=served.sample_rate, width=2, channels=1).event())
                if stream is not None:
                    stream.started = True
            while (item := await handoff.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                rate, pcm = item
                await self.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=pcm).event())
            if stream is None:
                await self.write_event(AudioStop().event())
        except TtsdError as exc:  # the job's own failure: it has ended
            if stream is None:
                self._count(served.name, served.version, exc.code, exc.fault)
            raise
        except BaseException:  # the client went away or stopped reading, or the server is closing
            handoff.stop()  # the job stops after the current piece
            if stream is None:
                self._count(served.name, served.version, "cancelled")
            raise
        finally:
            self._handoff = None
        if stream is None:
            self._count(served.name, served.version, "ok")
            self.backend.metrics.observe_request(served.name, served.version, ROUTE, time.monotonic() - started)
            return
        stream.spoke = True
        stream.audio_seconds += future.result().audio_seconds

    def _submit(self, job: Job) -> Future[Result]:
        """``backend.submit``, with one TCP address holding at most half the pool's places
        (workers and queue), as it holds at most half the connections: Wyoming has no
        authentication, and one LAN host's twenty long requests filled the queue, so Home
        Assistant's next announcement got ``busy`` for as long as that host kept sending."""
        share = max(1, self.backend.capacity // 2) if self.backend.capacity and self.host else None
        held = self.server.jobs_of
        if share is not None and held.get(self.host, 0) >= share:
            job.lease.release()  # (as a submit that raises has let go of it)
            raise BusyError(f"this address has {share} requests in progress, its share of the queue", retry_after=1)
        future = self.backend.submit(job)
        if share is not None:
            held[self.host] = held.get(self.host, 0) + 1
            loop, host = asyncio.get_running_loop(), self.host

            def ended(_: object) -> None:  # (on a worker thread)
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to count
                    loop.call_soon_threadsafe(self.server.job_ended, host)

            future.add_done_callback(ended)
        return future

    def _count(self, voice: str | None, version: str | None, outcome: str, fault: str | None = None) -> None:
        metrics = self.backend.metrics
        metrics.requests.labels(voice or "-", version or "-", ROUTE, outcome).inc()
        if fault is not None:
            metrics.failures.labels(voice or "-", version or "-", ROUTE, fault).inc()


def _error(exc: BaseException, kind: str) -> Event:
    """The ``error`` event for a request's failure (``bad_request``: a malformed event)."""
    if isinstance(exc, TtsdError):
        return Error(text=str(exc), code=exc.code).event()
    if isinstance(exc, KeyError):  # the protocol library's reading of a field that is not there
        return Error(text=f"bad {kind} event: it has no {exc} field", code="bad_request").event()
    return Error(text=f"bad {kind} event: {exc}", code="bad_request").event()


def _check_voice_field(event: Event) -> None:
    """``voice`` is an object (``{"name": ...}``): the protocol library reads a string there as no
    voice at all, so ``"voice": "joe"`` spoke with the default voice without a word."""
    voice = event.data.get("voice")
    if voice is not None and not isinstance(voice, dict):
        raise RequestError('voice must be an object such as {"name": "en_US-joe-medium"}, not a string or a list')
    for field in ("name", "language"):  # (a list there failed as "unhashable type: 'list'")
        if voice is not None and not isinstance(voice.get(field), (str, type(None))):
            raise RequestError(f"voice {field} must be a string")
