"""The Wyoming connection's bytes: events read with every bound checked, and the audio handed from
a synthesis worker to the connection.

Wyoming has no authentication and is often open to the LAN, so nothing a client sends or fails to
read may cost the daemon more than a bounded amount:

* ``read_event`` reads the protocol's framing (a JSON header line, then ``data_length`` bytes of
  JSON data and ``payload_length`` bytes of payload) itself, so that every malformed event is one
  ``BadFrame`` with a short reason (never a traceback): a header line, data or payload over the
  server's bound (``event_bytes``), a length that is not a whole number, JSON that is not an object, nests
  without end or holds more than ``MAX_EVENT_VALUES`` values (objects take far more memory than
  the bytes that spell them), a missing type.
* ``AudioHandoff`` hands a job's audio to its connection, and ``UnsentAudio`` bounds what all
  connections together hold unsent (``MAX_UNSENT_BYTES``). One client that stops reading holds its
  answer (which ``--max-audio-seconds`` bounds), never a worker: a worker that waited for its
  client let one client that never read stop every other request on a one-worker box until the
  write deadline, again at each reconnection. Only past the common bound does a job wait, and
  only one whose own client already has audio waiting; the connection's write deadline then ends
  a client that reads nothing (its job is cancelled, its audio dropped).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from wyoming.event import Event

from ..audio import Audio
from .synth import Cancelled

MAX_EVENT_BYTES = 1 << 20  # one event's header line, data or payload, at most (see event_bytes)
PAYLOAD_PIECE = 64 << 10  # a payload is read and dropped in pieces this large (a TTS server uses none)
MAX_EVENT_VALUES = 4096  # JSON values in an event's header or data (a request has a dozen)
MAX_UNSENT_BYTES = 64 << 20  # PCM made for Wyoming clients and not yet sent, all together (~25 min)


class BadFrame(Exception):
    """A client sent something that is not a Wyoming event; the connection is closed."""


def event_bytes(max_chars: int) -> int:
    """The most an event's header line or data may take: a request's text at ``--max-chars``,
    each character escaped as JSON's longest (``\\ud83d\\ude00``, 12 bytes), and room for the
    rest; 64 KiB at least and 1 MiB at most. A connection waiting for the rest of an event holds
    about three times this much: at 1 MiB (and its payload kept) 128 stalled connections held 540
    MB that the allocator did not give back."""
    return min(MAX_EVENT_BYTES, max(64 << 10, 12 * max_chars + (16 << 10)))


async def read_event(reader: asyncio.StreamReader, limit: int = MAX_EVENT_BYTES) -> Event | None:
    """The next event, or None when the client has closed its side between events (or in the
    middle of one: it is gone either way). ``BadFrame`` for anything malformed. ``limit``: the
    most its header line (the reader's own limit, which should be the same), data or payload
    may take; a payload is read and dropped, never kept (a TTS server uses none)."""
    try:
        line = await reader.readline()
    except ValueError:  # no newline within the reader's limit
        raise BadFrame(f"an event header over {limit} bytes") from None
    if not line.endswith(b"\n"):
        return None  # closed, possibly mid-line
    header = _object(line, "an event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadFrame("an event without a type")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise BadFrame(f"a {_shown(kind)} event whose data is not an object")
    try:
        length = _length(header, "data_length", limit)
        if length:
            data.update(_object(await reader.readexactly(length), "event data"))
        left = _length(header, "payload_length", limit)
        while left:
            left -= len(await reader.readexactly(min(left, PAYLOAD_PIECE)))
    except asyncio.IncompleteReadError:
        return None
    return Event(type=kind, data=data)


def _object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" deeper than the parser goes
        raise BadFrame(f"{what} that is not JSON") from None
    if not isinstance(value, dict):
        raise BadFrame(f"{what} that is not a JSON object")
    if not _few_values(value):
        raise BadFrame(f"{what} of more than {MAX_EVENT_VALUES} JSON values")
    return value


def _few_values(value: object) -> bool:
    """Whether ``value`` holds at most ``MAX_EVENT_VALUES`` values, counted with an early stop.
    A MiB of ``[{},{},…]`` parses into some 25 MB of objects, which a connection waiting for the
    rest of its event would hold: 128 of them took the daemon to 3.7 GB."""
    left, stack = MAX_EVENT_VALUES, [value]
    while stack:
        item = stack.pop()
        left -= 1
        if left < 0:
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _length(header: dict[str, Any], field: str, limit: int) -> int:
    value = header.get(field)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise BadFrame(f"{field} must be a whole number of bytes up to {limit}")
    return value


def _shown(text: str) -> str:
    return text[:40] if text.isprintable() else repr(text[:40])


class UnsentAudio:
    """PCM made for the Wyoming clients and not yet written to them, all connections together:
    ``held`` bytes under ``room``'s lock, at most ``limit`` but for one piece per connection."""

    def __init__(self, limit: int = MAX_UNSENT_BYTES) -> None:
        self.limit, self.held = limit, 0
        self.room = threading.Condition()


class AudioHandoff:
    """One job's audio, from its worker thread to the connection's coroutine, as 16-bit PCM.
    ``put`` (the job's ``on_chunk``) waits only while all connections' unsent audio is over its
    bound and this connection already holds some; ``stop`` (the connection ends) drops what it
    holds and ends the job (a waiting worker at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: threading.Event, unsent: UnsentAudio) -> None:
        self._loop, self._cancel, self._unsent = loop, cancel, unsent
        self._queue: asyncio.Queue[tuple[int, bytes] | BaseException | None] = asyncio.Queue()
        self._held = 0  # bytes put and not yet taken (or dropped)
        self._stopped = False  # its connection takes no more (what it held is dropped)

    def put(self, chunk: Audio) -> None:
        """Worker thread: hand over one piece of audio. A stopped connection makes this raise
        ``Cancelled``: the job ends at once."""
        pcm = chunk.to_pcm16()  # here, on the worker: half the bytes of the float samples
        unsent = self._unsent
        with unsent.room:
            while self._held and unsent.held + len(pcm) > unsent.limit and not self._stopped:
                unsent.room.wait(1.0)
            if self._stopped or self._cancel.is_set():
                raise Cancelled()
            unsent.held += len(pcm)
            self._held += len(pcm)
        if not self._hand((chunk.sample_rate, pcm)):
            raise Cancelled()

    def end(self, error: BaseException | None) -> None:
        """Any thread: the job is over (``error``: how it failed)."""
        self._hand(error)

    def _hand(self, item: tuple[int, bytes] | BaseException | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the daemon is exiting, nobody is listening
            return False
        return True

    async def get(self) -> tuple[int, bytes] | BaseException | None:
        """The next piece (rate, PCM), the job's error, or None at its end."""
        item = await self._queue.get()
        if isinstance(item, tuple):
            with self._unsent.room:
                if not self._stopped:  # (stopped: already dropped)
                    self._unsent.held -= len(item[1])
                    self._held -= len(item[1])
                    self._unsent.room.notify_all()
        return item

    def stop(self) -> None:
        """The connection will take no more: its unsent audio is dropped, and the job stops after
        its current piece (a worker waiting for room, at once)."""
        with self._unsent.room:
            if not self._stopped:
                self._unsent.held -= self._held
                self._held, self._stopped = 0, True
            self._cancel.set()
            self._unsent.room.notify_all()
