"""The spool directory: requests as files, for tools that cannot speak HTTP.

    SPOOL/incoming/ID.txt | ID.json   a request (writers drop it by rename; dot-files and *.tmp ignored)
    SPOOL/work/                        claimed requests (claimed by rename)
    SPOOL/out/ID.<fmt> + ID.json       the audio, then its metadata; ID.json appears last and marks completion
    SPOOL/done/                        requests that were served
    SPOOL/failed/ID.* + ID.error.json  requests that cannot be served, and why

Crash safety: outputs are written to hidden temp names and renamed into place, and a request leaves
``work/`` only after its outputs are published. After ``kill -9`` at any moment, the next start
finds the request in ``incoming/`` or ``work/`` and serves it again; ``out/`` never shows a
half-written file.

Runs on the event loop; synthesis goes to the pool, file writes to an executor thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .audio import encode
from .backend import Backend
from .errors import BusyError, TtsdError
from .fsutil import atomic_write_bytes, atomic_write_text, fsync_dir
from .requests import SynthRequest, parse_request
from .synth import Job, Result
from .text import check_text

log = logging.getLogger("ttsd.spool")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
SUFFIXES = (".txt", ".json")
SETTLE_SECONDS = 0.25  # a file must keep its size and mtime this long before it is claimed
RESCAN_SECONDS = 2.0  # events can be lost (or never sent, on network filesystems)


class Spool:
    def __init__(self, root: Path, backend: Backend, *, concurrency: int) -> None:
        self.root = root
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.dirs = {name: root / name for name in ("incoming", "work", "out", "done", "failed")}
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, stable since)
        self._active: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._observer: Any = None

    # -- life cycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folders, remove leftover temp files, and requeue claimed requests."""
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        for leftover in self.dirs["out"].glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        for claimed in sorted(self.dirs["work"].iterdir()):
            if claimed.suffix in SUFFIXES and not claimed.name.startswith("."):
                os.replace(claimed, self.dirs["incoming"] / claimed.name)
                log.info("requeued %s (claimed before a restart)", claimed.name)
        fsync_dir(self.dirs["incoming"])

    def start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self._wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:  # watchdog's thread
                loop.call_soon_threadsafe(wake.set)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.dirs["incoming"]), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    async def run(self) -> None:
        """Claim and serve requests until ``stop``."""
        while not self._stopping:
            self._wake.clear()
            try:
                self._scan()
            except OSError as exc:
                log.error("spool scan failed: %s", exc)
            pending_settle = bool(self._seen)
            try:
                await asyncio.wait_for(self._wake.wait(), SETTLE_SECONDS if pending_settle else RESCAN_SECONDS)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        """Stop claiming new requests (running ones finish; unfinished ones stay in work/)."""
        self._stopping = True
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()

    async def drain(self) -> None:
        if self._active:
            await asyncio.gather(*self._active, return_exceptions=True)

    # -- claiming ------------------------------------------------------------------------------
    def _scan(self) -> None:
        now = time.monotonic()
        present = set()
        for path in sorted(self.dirs["incoming"].iterdir()):
            if path.name.startswith(".") or path.name.endswith(".tmp") or not path.is_file():
                continue
            present.add(path)
            st = path.stat()
            previous = self._seen.get(path)
            if previous is None or previous[:2] != (st.st_size, st.st_mtime_ns):
                self._seen[path] = (st.st_size, st.st_mtime_ns, now)
                continue
            if now - previous[2] < SETTLE_SECONDS:
                continue
            if len(self._active) >= self.concurrency or not self.backend.ready():
                continue
            del self._seen[path]
            self._claim(path)
        for gone in set(self._seen) - present:
            del self._seen[gone]

    def _claim(self, path: Path) -> None:
        target = self.dirs["work"] / path.name
        try:
            os.replace(path, target)  # the claim: whoever renames first owns it
        except FileNotFoundError:
            return
        task = asyncio.get_running_loop().create_task(self._serve(target))
        self._active.add(task)
        task.add_done_callback(self._active.discard)

    # -- serving -------------------------------------------------------------------------------
    async def _serve(self, claimed: Path) -> None:
        loop = asyncio.get_running_loop()
        request_id = claimed.stem
        started = time.time()
        try:
            if claimed.suffix not in SUFFIXES or not _ID.fullmatch(request_id):
                raise _Refused("bad_name", f"{claimed.name}: name must be ID.txt or ID.json with ID of "
                               "letters, digits, '.', '_' or '-'")
            req = await loop.run_in_executor(None, _read_request, claimed)
            check_text(req.text, self.backend.max_chars)
            lease = self.backend.acquire(req.voice, req.version)
            model = lease.model
            job = Job(text=req.text, options=req.options, lease=lease, route="spool")
            future: Future[Result] = self.backend.submit(job)
            result = await asyncio.wrap_future(future)
            meta = {"id": request_id, "voice": model.name, "version": model.version, "format": req.format,
                    "sample_rate": result.audio.sample_rate if result.audio else None,
                    "duration": round(result.audio_seconds, 3),
                    "timings": {"queued": round(result.queued_seconds, 3),
                                "synthesis": round(result.synth_seconds, 3),
                                "total": round(time.time() - started, 3)}}
            await loop.run_in_executor(None, self._publish, claimed, req, result, meta)
            self.backend.metrics.spool.labels("ok").inc()
        except BusyError:
            # Not the request's fault: put it back for the next scan.
            os.replace(claimed, self.dirs["incoming"] / claimed.name)
        except asyncio.CancelledError:
            raise  # shutting down: the request stays in work/ and is served after restart
        except (TtsdError, _Refused) as exc:
            await loop.run_in_executor(None, self._fail, claimed, exc.code, str(exc))
        except Exception as exc:  # a bug; the request must still not vanish
            log.exception("spool request %s failed", claimed.name)
            await loop.run_in_executor(None, self._fail, claimed, "internal", f"{type(exc).__name__}: {exc}")

    def _publish(self, claimed: Path, req: SynthRequest, result: Result, meta: dict[str, Any]) -> None:
        audio = result.audio
        assert audio is not None
        data = audio.to_pcm16() if req.format == "pcm" else encode(audio, req.format)
        out = self.dirs["out"]
        atomic_write_bytes(out / f"{claimed.stem}.{req.format}", data)
        atomic_write_text(out / f"{claimed.stem}.json", json.dumps(meta, indent=1) + "\n")
        os.replace(claimed, self.dirs["done"] / claimed.name)
        fsync_dir(self.dirs["work"])
        log.info("spool %s: %.2f s of audio", claimed.name, result.audio_seconds)

    def _fail(self, claimed: Path, code: str, message: str) -> None:
        failed = self.dirs["failed"]
        atomic_write_text(failed / f"{claimed.stem}.error.json",
                          json.dumps({"error": {"code": code, "message": message}}, indent=1) + "\n")
        os.replace(claimed, failed / claimed.name)
        fsync_dir(self.dirs["work"])
        self.backend.metrics.spool.labels("failed").inc()
        log.warning("spool %s failed: %s", claimed.name, message)


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _read_request(path: Path) -> SynthRequest:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused("bad_request", f"{path.name} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".txt":
        return SynthRequest(text=text)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _Refused("bad_request", f"{path.name} is not valid JSON ({exc})") from None
    req = parse_request(data)
    if req.stream:
        req = SynthRequest(**{**req.__dict__, "stream": False})
    return req
