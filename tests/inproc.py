"""The daemon's front ends in-process, and a fake backend to put behind them.

``FrontEnds`` serves any ``Backend`` the way ``ttsd serve`` does (the same ``build_app`` in an
``AppRunner`` with handler cancellation, on the daemon's own ``UnixListener`` and ``TCPListener``,
plus a ``Spool``), on one event loop that the test drives with ``run``.

``FakeVoices`` is a ``Backend`` without a manager: ``FakeEngine`` voices constructed directly,
loaded and warmed, in a real ``ServingMap``; a real ``SynthesisPool`` and ``Metrics``; plain
callables for voices, status, rollback and activate that record what they were asked. Its
engines speak sentence by sentence and pass a ``Valve`` before each sentence, so a test can hold
a worker mid-request without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
from aiohttp import web
from fake_engine import FakeEngine
from multidict import CIMultiDict
from packaging.version import Version

from ttsd.errors import UnknownVoiceError
from ttsd.front.backend import Backend
from ttsd.front.http_api import build_app
from ttsd.front.listeners import TCPListener, UnixListener
from ttsd.front.spool import Spool
from ttsd.front.synth import Job, Result, SynthesisPool
from ttsd.manifest import pack
from ttsd.metrics import Metrics
from ttsd.options import SynthesisOptions
from ttsd.serving.serving_map import Key, ServingMap, VoiceVersion
from ttsd.serving.versions import norm
from ttsd.text import split_sentences

T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, str]:
        return self.json()["error"]  # type: ignore[no-any-return]


class FrontEnds:
    """HTTP on a Unix socket and on 127.0.0.1, and a spool, for one ``Backend``."""

    def __init__(self, backend: Backend, root: Path, *, spool_concurrency: int = 1) -> None:
        self.loop = asyncio.new_event_loop()
        self._sockdir = Path(tempfile.mkdtemp(prefix="ttsd-inproc-"))  # a socket path must stay short
        self.socket = self._sockdir / "ttsd.sock"
        self.runner = web.AppRunner(build_app(backend), handler_cancellation=True, access_log=None)
        self.run(self.runner.setup())
        self.run(UnixListener(self.runner, str(self.socket), max_connections=64).start())
        tcp = TCPListener(self.runner, "127.0.0.1", 0, max_connections=64)
        self.run(tcp.start())
        self.host, self.port = "127.0.0.1", tcp.port
        self.unix, self.tcp = self.run(self._sessions())
        self.spool = Spool(root / "spool", backend, concurrency=spool_concurrency)
        self.spool.prepare()

    async def _sessions(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        unix = aiohttp.ClientSession("http://localhost", connector=aiohttp.UnixConnector(str(self.socket)))
        tcp = aiohttp.ClientSession(f"http://{self.host}:{self.port}")
        return unix, tcp

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    async def fetch(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                    headers: dict[str, str] | None = None, tcp: bool = False) -> Reply:
        """One request and its whole answer, on the Unix socket (or on TCP)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        session = self.tcp if tcp else self.unix
        async with session.request(method, path, data=data, headers=headers or {}) as resp:
            return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.run(self.fetch(method, path, body, **kw))

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def spool_pass(self) -> None:
        """One scan of ``incoming/`` (claiming what has settled), then every claimed request served."""
        async def go() -> None:
            self.spool.scan_now()
            await self.spool.drain()
        self.run(go())

    def close(self) -> None:
        self.run(self.unix.close())
        self.run(self.tcp.close())
        self.run(self.runner.cleanup())
        self.loop.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let the loop run until ``predicate`` holds (a worker thread's progress, a cancel seen)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Valve:
    """Lets sentences through: all of them while open, else one per ``allow``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._left: int | None = None  # None: open

    def close(self) -> None:
        with self._cond:
            self._left = 0

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._left = (self._left or 0) + n
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._left = None
            self._cond.notify_all()

    def pass_(self) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._left is None or self._left > 0, timeout=30):
                raise RuntimeError("the test held the valve for 30 s")
            if self._left is not None:
                self._left -= 1


class SentenceFake(FakeEngine):
    """``FakeEngine`` (a tone, 60 ms per character) per sentence, behind a valve, recording the
    options each request came with and how many sentences it rendered."""

    def load(self) -> None:
        super().load()
        self.valve = Valve()
        self.rendered = 0
        self.asked: list[SynthesisOptions] = []
        self.fail_with: BaseException | None = None

    def _units(self, text: str, options: SynthesisOptions) -> Sequence[str]:
        self.asked.append(options)
        return split_sentences(text)

    def _render(self, unit: str, options: SynthesisOptions) -> np.ndarray:
        self.valve.pass_()
        if self.fail_with is not None:
            raise self.fail_with
        samples = super()._render(unit, options)
        with FakeEngine._lock:
            self.rendered += 1
        return samples

    def expected(self, text: str, options: SynthesisOptions | None = None, *, pieces: bool = False) -> bytes:
        """The 16-bit PCM this engine makes of ``text``, as the pool would get it (whole, or
        streamed in pieces at the warm-up gain)."""
        opts = options or SynthesisOptions()
        return b"".join(a.to_pcm16() for a in self.synthesize_stream(text, opts, pieces=pieces))


VoiceSpec = dict[str, dict[str, dict[str, Any]]]  # voice -> version -> fake.json settings (+ sample_rate)


class FakeVoices:
    """A ``Backend`` over ``SentenceFake`` voices (see the module docstring). Each voice's highest
    version is active unless ``activate`` is False (then nothing serves: not ready). A canary
    (``map.set_canary``) takes ``canary_share`` of the requests."""

    def __init__(self, root: Path, voices: VoiceSpec, *, default_voice: str | None = None, activate: bool = True,
                 workers: int = 1, queue_size: int = 1, max_chars: int = 5000, max_audio_seconds: float = 30.0,
                 token: str | None = None, canary_share: float = 0.0) -> None:
        self.metrics = Metrics.create()
        self.released: list[tuple[Key, bool | None]] = []
        self.map = ServingMap(on_release=lambda key, ok: self.released.append((key, ok)),
                              canary_share=lambda _name: canary_share, default_voice=default_voice)
        self.engines: dict[Key, SentenceFake] = {}
        for name, versions in voices.items():
            for version, settings in versions.items():
                folder = root / "models" / f"{name}-{version}"
                folder.mkdir(parents=True)
                (folder / "fake.json").write_text(json.dumps(settings))
                manifest = pack(folder, name=name, version=version, engine="fake",
                                sample_rate=int(settings.get("sample_rate", 16000)))
                engine = SentenceFake(folder, manifest, max_chars=max_chars, max_audio_seconds=max_audio_seconds)
                engine.load()
                engine.warmup()
                engine.rendered, engine.requests = 0, 0
                engine.asked.clear()
                key = (name, norm(version))
                self.map.add(key, VoiceVersion(name, version, manifest.sample_rate), engine)
                self.engines[key] = engine
            if activate:
                self.map.activate(max(((name, v) for v in versions), key=lambda k: Version(k[1])))
        self.pool = SynthesisPool(workers=workers, queue_size=queue_size, metrics=self.metrics)
        self.jobs: list[Job] = []
        self.submit_error: BaseException | None = None
        self.rollbacks: list[tuple[str, str | None]] = []
        self.activations: list[tuple[str, str]] = []
        self.control_error: BaseException | None = None
        self.backend = Backend(acquire=self.map.acquire, submit=self._submit, voices=self.voices,
                               ready=self.map.ready, status=self.status, metrics=self.metrics,
                               max_chars=max_chars, rollback=self._rollback, activate=self._activate, token=token,
                               max_audio_seconds=max_audio_seconds, judge=self.map.judge,
                               capacity=workers + queue_size)

    def engine(self, name: str, version: str) -> SentenceFake:
        return self.engines[(name, norm(version))]

    def model_failures(self) -> list[tuple[Key, bool | None]]:
        """Releases that counted against a model (``ok=False``)."""
        return [r for r in self.released if r[1] is False]

    def _submit(self, job: Job) -> Future[Result]:
        self.jobs.append(job)
        if self.submit_error is not None:
            job.lease.release()  # the contract: a submit that raises has let go of the lease
            raise self.submit_error
        return self.pool.submit(job)

    def voices(self) -> list[dict[str, Any]]:
        names = sorted({name for name, _ in self.engines})
        return [{"name": n, "active": (self.map.active(n) or (None, None))[1]} for n in names]

    def status(self) -> dict[str, Any]:
        waiting, running = self.pool.depth()
        return {"queue": {"waiting": waiting, "running": running}, "voices": self.voices()}

    def _check(self, name: str) -> None:
        if self.control_error is not None:
            raise self.control_error
        if self.map.active(name) is None:
            raise UnknownVoiceError(f"unknown voice {name!r}")

    async def _rollback(self, name: str, to: str | None, reason: str | None = None) -> dict[str, Any]:
        self.rollbacks.append((name, to))
        self._check(name)
        return {"voice": name, "from": "2", "to": to or "1", "seconds": 0.01}

    async def _activate(self, name: str, version: str) -> dict[str, Any]:
        self.activations.append((name, version))
        self._check(name)
        return {"voice": name, "from": "1", "to": version, "seconds": 0.01}

    def close(self) -> None:
        for engine in self.engines.values():
            engine.valve.open()
        self.pool.shutdown()
        for engine in self.map.clear():
            engine.unload()
