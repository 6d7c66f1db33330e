"""HTTP/1.1 API (aiohttp) served on the Unix socket and, optionally, a TCP listener.

The front end knows nothing of the model manager: it gets a ``Backend`` of callbacks from the
daemon. Handlers run on the event loop and never synthesize; they parse, take a model lease,
hand a ``Job`` to the pool and await it. Errors are JSON ``{"error": {"code", "message"}}``; on
the OpenAI route in OpenAI's shape, which adds ``type`` and ``param``.

A streamed reply goes out chunked as the voice makes its audio: its status and headers wait for
the first piece, so every failure before it is a proper JSON error. A failure after it cannot be
one (the 200 went out, and error JSON must never land in the middle of audio): the connection is
closed without the chunked body's final chunk, which clients report as an incomplete body. On
the OpenAI route with ``stream_format: "sse"`` the audio goes out as OpenAI's server-sent events
(``speech.audio.delta``, then ``speech.audio.done``), ended the same way on a failure, so a
stream without its ``speech.audio.done`` failed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from aiohttp import HttpVersion11, web

from ..audio import Audio, encode, wav_stream_header
from ..encoding import Encoder, check_available, open_encoder
from ..errors import (
    BusyError,
    ConflictError,
    FormatUnavailableError,
    ManifestError,
    RequestError,
    RequestTimeoutError,
    ResourceError,
    TtsdError,
)
from ..formats import MEDIA_TYPES
from ..manifest import check_version
from ..metrics import CONTENT_TYPE
from ..serving.serving_map import Lease
from ..text import check_text
from .backend import Backend
from .guard import browser_refusal, is_public, is_tcp
from .page import add_routes
from .speech_request import (
    STREAM_FORMATS,
    USER_HEADER,
    SynthRequest,
    parse_json,
    parse_openai,
    parse_request,
    parse_version_header,
    with_user_header,
)
from .synth import Cancelled, Job, Result

log = logging.getLogger("ttsd.http")

MAX_BODY = 1 << 20  # 1 MiB of JSON is far more than any allowed text
BODY_SECONDS = 30.0  # a request body must arrive within this (a trickled body holds a connection)
WRITE_SECONDS = 60.0  # a streamed piece must be taken by the client within this
CONTROL_PREFIX = "/v1/voices/"
OPENAI_PATH = "/v1/audio/speech"
SSE_TYPE = "text/event-stream"


def _error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    openai: bool = False,
    param: str | None = None,
) -> web.Response:
    """A JSON error. ``openai``: in OpenAI's shape, ``{"error": {"message", "type", "param",
    "code"}}`` (ttsd's two fields and two more), so OpenAI's clients read all they expect."""
    error: dict[str, Any] = {"code": code, "message": message}
    if openai:
        error = {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": code,
        }
    return web.json_response({"error": error}, status=status, headers=headers)


def error_response(exc: BaseException, *, openai: bool = False) -> web.Response:
    """The JSON error for ``exc``: its own status (4xx the request's fault, 500 the model's,
    503/507 the box's; see ``ttsd.errors``). Anything else is a bug: 500, logged with its traceback.
    ``openai``: in OpenAI's shape (``param`` names the field at fault where the error knows it)."""
    if isinstance(exc, TtsdError):
        headers = None
        if isinstance(exc, (BusyError, ResourceError)):
            headers = {"Retry-After": str(exc.retry_after)}
        return _error(exc.status, exc.code, str(exc), headers, openai=openai, param=getattr(exc, "param", None))
    log.error("internal error", exc_info=exc)
    return _error(500, "internal", f"internal error: {type(exc).__name__}", openai=openai)


def _reason(data: dict[str, Any]) -> str | None:
    """A control route's optional ``reason`` (what the audit trail records): 1 to 300 printable
    characters."""
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or not 0 < len(reason) <= 300 or not reason.isprintable()):
        raise RequestError("field 'reason' must be 1 to 300 printable characters")
    return reason


def can_stream(fmt: str) -> bool:
    """Whether a reply in ``fmt`` can stream on this box: wav, pcm and opus always; aac and mp3
    with PyAV (without it a whole mp3 is still made, by libsndfile)."""
    if fmt not in STREAM_FORMATS:
        return False
    try:
        check_available(fmt, stream=True)
    except FormatUnavailableError:
        return False
    return True


def sse_event(event: dict[str, Any]) -> bytes:
    """One server-sent event: a ``data:`` line of compact JSON (its ``type`` names it, as in
    OpenAI's streams), then the blank line that ends it."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def sse_delta(audio: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})


def sse_done(characters: int) -> bytes:
    """OpenAI's last event, with its ``usage``. ttsd's voices have no tokens: ``input_tokens`` is
    the input's characters (as ``--max-chars`` counts them, after stripping), ``output_tokens`` 0
    (nothing is generated token by token), ``total_tokens`` their sum."""
    usage = {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters}
    return sse_event({"type": "speech.audio.done", "usage": usage})


class _StreamBroken(Exception):
    """A streamed synthesis failed after its response (status 200) had started."""

    def __init__(self, cause: BaseException, response: web.StreamResponse) -> None:
        super().__init__(str(cause))
        self.cause, self.response = cause, response


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:  # refused before it is sent
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    try:
        return await asyncio.wait_for(request.read(), BODY_SECONDS)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {BODY_SECONDS:.0f} s") from None


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """A streamed piece; a client that stops reading is dropped (and its synthesis cancelled).
    Nothing is sent for no bytes (an encoder may hold a chunk until it fills a frame or page)."""
    if not data:
        return
    try:
        await asyncio.wait_for(response.write(data), WRITE_SECONDS)
    except TimeoutError:
        raise ConnectionResetError(f"the client took no audio for {WRITE_SECONDS:.0f} s") from None


async def _encoded(
    loop: asyncio.AbstractEventLoop, response: web.StreamResponse, call: Callable[..., bytes], *args: Any
) -> bytes:
    """A streamed piece from an encoder, run on the loop's executor. Its failure comes after the
    status went out, so it breaks the stream like a voice's failure would."""
    try:
        return await loop.run_in_executor(None, call, *args)
    except Exception as exc:
        raise _StreamBroken(exc, response) from exc


def build_app(backend: Backend) -> web.Application:
    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        tcp = is_tcp(request)
        control = request.path.startswith(CONTROL_PREFIX) and request.method == "POST"
        openai = request.path == OPENAI_PATH  # its errors in OpenAI's shape
        refusal = browser_refusal(request, control=control, unguarded=not tcp or backend.token is None)
        if refusal is not None:
            return _error(*refusal, openai=openai)
        if tcp and backend.token is None and control:
            return _error(403, "forbidden", "control routes need --token-file on a TCP listener")
        if tcp and backend.token is not None and not is_public(request.method, request.path):
            # aiohttp keeps undecodable header bytes as surrogates: compare the bytes as sent. The
            # scheme's case does not matter (RFC 7235: "bearer" is "Bearer"); the token's does
            scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
            given = supplied.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, backend.token.encode()):
                return _error(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token",
                    {"WWW-Authenticate": "Bearer"},
                    openai=openai,
                )
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "body_too_large", f"request body over {MAX_BODY} bytes", openai=openai)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, "http", exc.reason, openai=openai)
            raise
        except ConnectionError:  # the client went away (e.g. mid-body): not a bug, nobody to answer
            log.debug("client disconnected during %s %s", request.method, request.path)
            return _error(400, "disconnected", "the client went away", openai=openai)
        except Exception as exc:  # never a plain-text 500: a JSON error, logged with its traceback
            return error_response(exc, openai=openai)

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    api = _Api(backend)
    app.router.add_post("/v1/synthesize", api.synthesize)
    app.router.add_post("/v1/audio/speech", api.openai_speech)  # OPENAI_PATH (tests/test_docs.py reads it here)
    app.router.add_get("/v1/voices", api.voices)
    app.router.add_post("/v1/voices/{name}/rollback", api.rollback)
    app.router.add_post("/v1/voices/{name}/activate", api.activate)
    app.router.add_post("/v1/voices/{name}/withdraw", api.withdraw)
    app.router.add_post("/v1/voices/{name}/remove", api.remove)
    app.router.add_get("/v1/status", api.status)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    add_routes(app)
    return app


class _Api:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def _json(self, request: web.Request) -> Any:
        return parse_json(await _read_body(request))

    async def synthesize(self, request: web.Request) -> web.StreamResponse:
        try:
            req = parse_request(await self._json(request))
            if "X-Ttsd-Version" in request.headers and req.version is None:
                req = replace(req, version=parse_version_header(request.headers["X-Ttsd-Version"]))
            req = with_user_header(req, request.headers.getall(USER_HEADER, []))
        except TtsdError as exc:
            self._count(None, None, "synthesize", exc.code, exc.fault)
            return error_response(exc)
        return await self._serve(request, req, "synthesize")

    async def openai_speech(self, request: web.Request) -> web.StreamResponse:
        try:
            listed = self.backend.voices()
            known = {v["name"] for v in listed}
            serving = {v["name"] for v in listed if v.get("active")}  # what an error may offer
            req = parse_openai(await self._json(request), known, serving)
            req = with_user_header(req, request.headers.getall(USER_HEADER, []))
        except TtsdError as exc:
            self._count(None, None, "openai", exc.code, exc.fault)
            return error_response(exc, openai=True)
        if req.stream and not can_stream(req.format):
            # streamed wherever the format can be: flac and ogg, and mp3 without PyAV, go whole
            # (with "sse", as one speech.audio.delta event); aac without PyAV is refused in _serve
            req = replace(req, stream=False)
        return await self._serve(request, req, "openai")

    def _count(
        self, voice: str | None, version: str | None, route: str, outcome: str, fault: str | None = None
    ) -> None:
        self.backend.metrics.requests.labels(voice or "-", version or "-", route, outcome).inc()
        if fault is not None:
            self.backend.metrics.failures.labels(voice or "-", version or "-", route, fault).inc()

    async def _serve(self, request: web.Request, req: SynthRequest, route: str) -> web.StreamResponse:
        started = time.monotonic()
        openai = route == "openai"
        if req.stream and not req.sse and request.version < HttpVersion11:
            # HTTP/1.0 (nginx's default toward an upstream) has no chunks: a stream would end with
            # the close, and one cut off by a failure would look whole. The whole file instead,
            # with its length, and a failure is a real status
            req = replace(req, stream=False)
        try:
            try:
                req = replace(req, text=check_text(req.text, self.backend.max_chars))  # checked here, once
            except RequestError as exc:
                exc.param = "input" if openai else None  # type: ignore[attr-defined]  # (OpenAI's error names it)
                raise
            # an encoder this box lacks (aac, or streamed mp3, without PyAV): refused before any synthesis
            check_available(req.format, stream=req.stream)
            if not self.backend.ready():
                raise BusyError("no voice is ready yet", retry_after=5)
            lease = await self.backend.lease(req.voice, req.version, user=req.user)
        except TtsdError as exc:  # no lease: the names came from the client, never a metric label
            self._count(None, None, route, exc.code, exc.fault)
            return error_response(exc, openai=openai)
        served = lease.voice
        try:
            if req.stream:
                response = await self._stream(request, req, lease, route)
            else:
                response = await self._whole(req, lease, route)
        except asyncio.CancelledError:
            self._count(served.name, served.version, route, "cancelled")
            raise
        except (Cancelled, ConnectionError):  # the client went away or stopped reading
            self._count(served.name, served.version, route, "cancelled")
            raise
        except _StreamBroken as broken:  # the status went out with the first audio: drop the connection
            cause = broken.cause
            code, fault = (cause.code, cause.fault) if isinstance(cause, TtsdError) else ("internal", "system")
            self._count(served.name, served.version, route, code, fault)
            log.warning(
                "a streamed request on %s %s failed after its first audio (%s); dropping the connection",
                served.name,
                served.version,
                cause,
            )
            if request.transport is not None:
                request.transport.close()  # no final chunk: the client sees an incomplete response
            return broken.response
        except TtsdError as exc:
            self._count(served.name, served.version, route, exc.code, exc.fault)
            return error_response(exc, openai=openai)
        except Exception as exc:  # a bug (the pool turns model crashes into SynthesisError): 500
            self._count(served.name, served.version, route, "internal", "system")
            return error_response(exc, openai=openai)
        self._count(served.name, served.version, route, "ok")
        self.backend.metrics.observe_request(served.name, served.version, route, time.monotonic() - started)
        return response

    def _headers(self, lease: Lease, req: SynthRequest, rate: int) -> dict[str, str]:
        content_type = MEDIA_TYPES[req.format]
        if req.format == "pcm":
            content_type = f"audio/L16; rate={rate}; channels=1"
        headers = {
            "Content-Type": content_type,
            "X-Ttsd-Voice": lease.voice.name,
            "X-Ttsd-Version": lease.voice.version,
            "X-Ttsd-Sample-Rate": str(rate),
        }
        if req.sse:  # the events' type; what their audio is, the client asked for
            headers.update({"Content-Type": SSE_TYPE, "Cache-Control": "no-cache"})
        return headers

    async def _whole(self, req: SynthRequest, lease: Lease, route: str) -> web.Response:
        job = Job(text=req.text, options=req.options, lease=lease, route=route)
        future = self.backend.submit(job)
        spoken = asyncio.wrap_future(future)
        try:
            if self.backend.out_of_time is not None:
                stopping: asyncio.Future[Any] = asyncio.ensure_future(self.backend.out_of_time.wait())
                try:
                    await asyncio.wait({spoken, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                if not spoken.done():  # the stop's grace runs out: an answer, not a closed connection
                    job.cancel.set()
                    spoken.add_done_callback(lambda done: done.cancelled() or done.exception())
                    raise BusyError(
                        "ttsd is stopping and this request did not finish within its grace; retry", retry_after=5
                    )
            result = await spoken
        except asyncio.CancelledError:
            job.cancel.set()  # client went away: stop after the current sentence
            raise
        audio = result.audio
        assert audio is not None
        loop = asyncio.get_running_loop()
        body = audio.to_pcm16() if req.format == "pcm" else await loop.run_in_executor(None, encode, audio, req.format)
        headers = self._headers(lease, req, audio.sample_rate)
        headers["X-Ttsd-Audio-Seconds"] = f"{result.audio_seconds:.3f}"
        headers["X-Ttsd-Synthesis-Seconds"] = f"{result.synth_seconds:.3f}"
        if req.sse:  # a format that cannot stream: the whole file as one event
            body = sse_delta(body) + sse_done(len(req.text))
        return web.Response(body=body, headers=headers)

    async def _stream(self, request: web.Request, req: SynthRequest, lease: Lease, route: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Audio | BaseException | None] = asyncio.Queue()

        def hand_over(item: Audio | BaseException | None) -> None:
            """From the worker's thread; the loop may have closed meanwhile (a stop whose grace
            was over): then the job ends as a cancelled one, never as the voice's failure."""
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:
                raise Cancelled() from None

        job = Job(text=req.text, options=req.options, lease=lease, route=route, on_chunk=hand_over)
        future = self.backend.submit(job)

        def finished(f: Future[Result]) -> None:
            with contextlib.suppress(Cancelled):
                hand_over(Cancelled() if f.cancelled() else f.exception())

        future.add_done_callback(finished)
        response: web.StreamResponse | None = None
        encoder: Encoder | None = None  # opus, aac, mp3: one continuous stream over every chunk

        async def send(data: bytes) -> None:  # one piece of audio, as it is or as an SSE event
            assert response is not None
            if data:
                await _write(response, sse_delta(data) if req.sse else data)

        try:
            while True:
                item = await chunks.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    # Before the first chunk this becomes a proper error response; after it, the
                    # connection is dropped mid-stream, which is how a client learns it failed.
                    if response is not None:
                        raise _StreamBroken(item, response)
                    raise item
                if response is None:
                    if req.format not in ("wav", "pcm"):
                        encoder = await loop.run_in_executor(None, open_encoder, req.format, item.sample_rate)
                    response = web.StreamResponse(headers=self._headers(lease, req, item.sample_rate))
                    if request.version >= HttpVersion11:
                        response.enable_chunked_encoding()
                    else:  # HTTP/1.0 (server-sent events only: audio goes whole): the end is the close
                        response.force_close()
                    await response.prepare(request)
                    if req.format == "wav":
                        await send(wav_stream_header(item.sample_rate))
                if encoder is None:
                    await send(item.to_pcm16())
                else:  # encoding is CPU work: off the loop, like a whole file's
                    await send(await _encoded(loop, response, encoder.write, item.samples))
            if encoder is not None and response is not None:
                await send(await _encoded(loop, response, encoder.close))
            if req.sse and response is not None:
                await _write(response, sse_done(len(req.text)))
        except BaseException:  # the client went away, or the stream cannot go on: stop the voice too
            job.cancel.set()
            raise
        assert response is not None
        await response.write_eof()
        return response

    async def voices(self, request: web.Request) -> web.Response:
        return web.json_response({"voices": self.backend.voices()})

    async def _control_body(self, request: web.Request) -> dict[str, Any]:
        body = await _read_body(request)
        if not body.strip():
            return {}
        data = parse_json(body)
        if not isinstance(data, dict):
            raise RequestError("request body must be a JSON object")
        return data

    async def rollback(self, request: web.Request) -> web.Response:
        try:
            data = await self._control_body(request)
            to = data.get("to")
            if to is not None and (isinstance(to, bool) or not isinstance(to, (str, int)) or to == ""):
                raise RequestError("field 'to' must be a version string")
            reason = _reason(data)  # what the audit trail says instead of "rollback requested"
            result = await self.backend.rollback(request.match_info["name"], None if to is None else str(to), reason)
        except TtsdError as exc:
            return error_response(exc)
        return web.json_response(result)

    async def withdraw(self, request: web.Request) -> web.Response:
        """A version a fleet mirror withdrew (``ttsd models get`` sends it): never served again by
        itself, whatever it is doing now; rolled back to ``to`` when it is the active one."""
        try:
            data = await self._control_body(request)
            version, to = data.get("version"), data.get("to")
            if not isinstance(version, str):
                raise RequestError("field 'version' is required")
            try:
                check_version(version)  # it is kept in the state as a version never to serve again
            except ManifestError as exc:
                raise RequestError(f"field 'version': {exc}") from None
            if to is not None and not isinstance(to, str):
                raise RequestError("field 'to' must be a version string")
            reason = _reason(data) or "withdrawn"
            if self.backend.withdraw is None:
                raise ConflictError("this daemon does not take withdrawals")
            result = await self.backend.withdraw(request.match_info["name"], version, to, reason)
        except TtsdError as exc:
            return error_response(exc)
        return web.json_response(result)

    async def remove(self, request: web.Request) -> web.Response:
        """``ttsd models remove``: the voice leaves the daemon (``ttsd.serving.removal``)."""
        try:
            data = await self._control_body(request)
            if self.backend.remove is None:
                raise ConflictError("this daemon does not remove voices")
            result = await self.backend.remove(request.match_info["name"], _reason(data) or "removed")
        except TtsdError as exc:
            return error_response(exc)
        return web.json_response(result)

    async def activate(self, request: web.Request) -> web.Response:
        try:
            data = await self._control_body(request)
            version = data.get("version")
            if not isinstance(version, (str, int)):
                raise RequestError("field 'version' is required")
            result = await self.backend.activate(request.match_info["name"], str(version))
        except TtsdError as exc:
            return error_response(exc)
        return web.json_response(result)

    async def status(self, request: web.Request) -> web.Response:
        # "control": whether this listener takes rollback/activate from this client, so the status
        # page shows those buttons only where they work. Reaching here over TCP with a token set
        # means the token was right; over TCP without one, control routes are refused (403).
        control = not is_tcp(request) or self.backend.token is not None
        return web.json_response({**self.backend.status(), "control": control})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.backend.ready():
            return web.json_response({"status": "ready"})
        return _error(503, "not_ready", "no voice is active yet", {"Retry-After": "5"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.backend.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
