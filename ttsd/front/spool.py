"""The spool directory: requests as files, for tools that cannot speak HTTP.

    SPOOL/incoming/ID.txt | ID.json   a request (writers drop it by rename; dot-files and *.tmp ignored)
    SPOOL/work/                        claimed requests (claimed by rename)
    SPOOL/out/ID.<fmt> + ID.json       the audio, then its metadata; ID.json appears last and marks completion
    SPOOL/done/                        requests that were served
    SPOOL/failed/ID.* + ID.error.json  requests that cannot be served, and why

Every request ends in ``done/`` or ``failed/`` (with its reason), except while the box itself
fails (disk full, out of memory, I/O error): then the request goes back to ``incoming/`` and the
spool pauses, with a growing back-off, before it claims anything again. A request's own fault
never counts against a model (see ``ttsd.errors``).

Writers are not trusted: a request file is opened without following links and must be a regular
file with no other hard link, of at most ``MAX_REQUEST_BYTES`` (checked with ``fstat`` before
reading); names are checked before they are used in a path or a log line; an ID already served
(``out/ID.json``) is refused rather than overwritten, and a file whose ID is being served waits.
Claims never replace a file in ``work/``, and ``incoming/`` is listed on a thread, a batch at a
time, so a backlog of any size cannot stall the event loop.

Crash safety: outputs are written to hidden temp names and renamed into place, and a request leaves
``work/`` only after its outputs are published. After ``kill -9`` at any moment, the next start
finds the request in ``incoming/`` or ``work/`` and serves it again (or moves it to ``done/`` if
its outputs were already complete); ``out/`` never shows a half-written file.

Runs on the event loop; synthesis goes to the pool, file reads and writes to an executor thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..audio import encode
from ..disk_changes import Observer, Settle, observe
from ..encoding import check_available
from ..errors import (
    BusyError,
    ResourceError,
    SpoolFileError,
    TtsdError,
    is_system_oserror,
    resource_error,
)
from ..fsutil import SHARED, atomic_write_bytes, atomic_write_text, fsync_dir
from ..text import check_text
from .backend import Backend
from .speech_request import SynthRequest
from .spool_files import ID, error_name, parse_file, read_bounded, shown
from .synth import Job, Result

log = logging.getLogger("ttsd.spool")

SUFFIXES = (".txt", ".json")
SETTLE_SECONDS = 0.25  # a file must keep its size and mtime this long before it is claimed
RESCAN_SECONDS = 2.0  # events can be lost (or never sent, on network filesystems)
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 60.0  # pause after a system failure, doubling
SCAN_BATCH = 1000  # entries of incoming/ looked at per scan


class Spool:
    def __init__(self, root: Path, backend: Backend, *, concurrency: int) -> None:
        self.root = root
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.dirs = {name: root / name for name in ("incoming", "work", "out", "done", "failed")}
        self._settle: Settle[Path] = Settle(SETTLE_SECONDS)  # a file is claimed once its size and mtime hold
        self._active: set[asyncio.Task[None]] = set()
        self._serving: set[str] = set()  # IDs claimed and not yet done or failed
        self._wake = asyncio.Event()
        self._stopping = False
        self._observer: Observer | None = None
        self._paused_until = 0.0  # monotonic: no claims before this (after a system failure)
        self._backoff = 0.0

    # -- life cycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folders, remove leftover temp files, and requeue claimed requests (or move
        them to ``done/`` when a crash came after their outputs were published)."""
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        for leftover in self.dirs["out"].glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        for claimed in sorted(self.dirs["work"].iterdir()):
            if claimed.name.startswith("."):
                continue
            if self._already_published(claimed):
                os.replace(claimed, self.dirs["done"] / claimed.name)
                log.info("%s was served before a restart; moved to done/", shown(claimed.name))
            else:
                os.replace(claimed, self.dirs["incoming"] / claimed.name)
                log.info("requeued %s (claimed before a restart)", shown(claimed.name))
        fsync_dir(self.dirs["incoming"])
        fsync_dir(self.dirs["work"])

    def _already_published(self, claimed: Path) -> bool:
        meta = self.dirs["out"] / f"{claimed.stem}.json"
        if claimed.suffix not in SUFFIXES or not ID.fullmatch(claimed.stem) or not meta.is_file():
            return False
        try:
            served = json.loads(meta.read_text(encoding="utf-8")).get("request_sha256")
            return served is not None and served == hashlib.sha256(read_bounded(claimed)).hexdigest()
        except (OSError, ValueError, AttributeError, SpoolFileError):
            return False

    def start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        wake = self._wake
        self._observer = observe(
            self.dirs["incoming"], lambda _paths: loop.call_soon_threadsafe(wake.set), recursive=False
        )

    async def run(self) -> None:
        """Claim and serve requests until ``stop``."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            try:
                # listing and stat'ing happen on a thread: 50,000 waiting files took 0.3 s a scan
                self._scan(await loop.run_in_executor(None, self._list_incoming))
            except OSError as exc:
                log.error("spool scan failed: %s", exc)
            wait = SETTLE_SECONDS if self._settle.seen else RESCAN_SECONDS
            paused = self._paused_until - time.monotonic()
            if paused > 0:
                wait = min(wait, paused) if self._settle.seen else paused
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))

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
    def _list_incoming(self) -> list[tuple[str, os.stat_result]]:
        """Up to ``SCAN_BATCH`` entries of ``incoming/`` (never following a link), oldest first.
        Runs on an executor thread; a bigger backlog is taken a batch at a time."""
        found = []
        with os.scandir(self.dirs["incoming"]) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(".tmp"):
                    continue
                try:
                    found.append((entry.name, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
                if len(found) >= SCAN_BATCH:
                    break
        found.sort(key=lambda item: (item[1].st_mtime_ns, item[0]))
        return found

    def _scan(self, entries: list[tuple[str, os.stat_result]]) -> None:
        now = time.monotonic()
        present = set()
        for name, st in entries:
            path = self.dirs["incoming"] / name
            present.add(path)
            if stat.S_ISREG(st.st_mode):  # anything else is refused at once when claimed
                _, changed = self._settle.update(path, (st.st_size, st.st_mtime_ns), now)
                if changed or not self._settle.settled(path, now):
                    continue
            if Path(name).stem in self._serving:
                continue  # the same ID is being served: this one waits, then meets its outputs
            if len(self._active) >= self.concurrency or not self.backend.ready() or now < self._paused_until:
                continue
            self._settle.forget(path)
            self._claim(path)
        self._settle.keep_only(present)

    def _claim(self, path: Path) -> None:
        """Move a request into ``work/``: whoever moves it first owns it. Never over a file there
        (a hard link fails if the name exists; where links are not possible, a checked rename)."""
        target = self.dirs["work"] / path.name
        try:
            try:
                os.link(path, target, follow_symlinks=False)
            except FileExistsError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if target.exists() or target.is_symlink():
                    return
                os.replace(path, target)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("spool: cannot claim %s (%s)", shown(path.name), exc)
            return
        self._serving.add(target.stem)  # until _serve ends: another file with this ID waits
        task = asyncio.get_running_loop().create_task(self._serve(target))
        self._active.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        if not task.cancelled() and task.exception() is not None:  # _serve handles everything; a bug
            log.error("spool task failed", exc_info=task.exception())

    # -- serving -------------------------------------------------------------------------------
    async def _serve(self, claimed: Path) -> None:
        loop = asyncio.get_running_loop()
        request_id = claimed.stem
        started = time.time()
        try:
            if claimed.suffix not in SUFFIXES or not ID.fullmatch(request_id):
                raise SpoolFileError(
                    "bad_name",
                    f"{shown(claimed.name)}: name must be ID.txt or ID.json with ID of "
                    "1 to 200 letters, digits, '.', '_' or '-' (not leading)",
                )
            raw = await loop.run_in_executor(None, read_bounded, claimed)
            if (self.dirs["out"] / f"{request_id}.json").exists():
                raise SpoolFileError(
                    "duplicate",
                    f"out/{request_id}.json already exists: a request with this ID was "
                    "served; remove its outputs or use a new ID",
                )
            req = parse_file(claimed, raw)
            check_available(req.format)  # before synthesis: audio that cannot be written is wasted
            req = replace(req, text=check_text(req.text, self.backend.max_chars))  # checked here, once
            lease = await self.backend.lease(req.voice, req.version, user=req.user)
            served = lease.voice
            job = Job(text=req.text, options=req.options, lease=lease, route="spool")
            future: Future[Result] = self.backend.submit(job)
            result = await asyncio.wrap_future(future)
            meta = {
                "id": request_id,
                "voice": served.name,
                "version": served.version,
                "format": req.format,
                "sample_rate": result.audio.sample_rate if result.audio else None,
                "duration": round(result.audio_seconds, 3),
                "timings": {
                    "queued": round(result.queued_seconds, 3),
                    "synthesis": round(result.synth_seconds, 3),
                    "total": round(time.time() - started, 3),
                },
                "request_sha256": hashlib.sha256(raw).hexdigest(),
            }
            await loop.run_in_executor(None, self._publish, claimed, req, result, meta)
            self._backoff = 0.0
            self.backend.metrics.spool.labels("ok").inc()
        except BusyError:
            # Not the request's fault: put it back for the next scan.
            await loop.run_in_executor(None, self._requeue, claimed, None)
        except asyncio.CancelledError:
            raise  # shutting down: the request stays in work/ and is served after restart
        except (ResourceError, MemoryError) as exc:
            await loop.run_in_executor(None, self._requeue, claimed, exc)
        except OSError as exc:
            if is_system_oserror(exc):
                await loop.run_in_executor(None, self._requeue, claimed, exc)
            else:  # a request file that vanished or cannot be read: that request's problem
                await loop.run_in_executor(
                    None, self._fail, claimed, "bad_file", f"{shown(claimed.name)}: {exc.strerror or exc}"
                )
        except TtsdError as exc:
            await loop.run_in_executor(None, self._fail, claimed, exc.code, str(exc))
        except Exception as exc:  # a bug; the request must still not vanish
            log.exception("spool request %s failed", shown(claimed.name))
            await loop.run_in_executor(None, self._fail, claimed, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self._serving.discard(request_id)

    def _publish(self, claimed: Path, req: SynthRequest, result: Result, meta: dict[str, Any]) -> None:
        audio = result.audio
        assert audio is not None
        data = audio.to_pcm16() if req.format == "pcm" else encode(audio, req.format)
        out = self.dirs["out"]
        atomic_write_bytes(out / f"{claimed.stem}.{req.format}", data, SHARED)
        atomic_write_text(out / f"{claimed.stem}.json", json.dumps(meta, indent=1) + "\n", SHARED)
        os.replace(claimed, self.dirs["done"] / claimed.name)
        fsync_dir(self.dirs["work"])
        log.info("spool %s: %.2f s of audio", claimed.name, result.audio_seconds)

    def _fail(self, claimed: Path, code: str, message: str) -> None:
        """Move the request to ``failed/`` beside ``ID.error.json``. Never raises: a failure to
        write the reason for a system cause requeues the request instead."""
        failed = self.dirs["failed"]
        try:
            atomic_write_text(
                failed / error_name(claimed.name),
                json.dumps({"error": {"code": code, "message": message}}, indent=1) + "\n",
                SHARED,
            )
            os.replace(claimed, failed / claimed.name)
            fsync_dir(self.dirs["work"])
        except OSError as exc:
            if is_system_oserror(exc):
                self._requeue(claimed, exc)
                return
            log.error("spool %s: cannot move it to failed/ (%s); it stays in work/", shown(claimed.name), exc)
            return
        self.backend.metrics.spool.labels("failed").inc()
        log.warning("spool %s failed: %s", shown(claimed.name), message)

    def _requeue(self, claimed: Path, cause: BaseException | None) -> None:
        """Put a claimed request back into ``incoming/``. With a system ``cause`` (disk full, out
        of memory, I/O error) the spool also pauses before claiming again, longer each time."""
        try:
            os.replace(claimed, self.dirs["incoming"] / claimed.name)
        except OSError as exc:  # it stays in work/: requeued at the next start
            log.error("spool %s: cannot put it back into incoming/ (%s)", shown(claimed.name), exc)
        if cause is None:
            return
        error = cause if isinstance(cause, ResourceError) else resource_error(cause, "serving a spool request")
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
        self._paused_until = time.monotonic() + self._backoff
        self.backend.metrics.spool.labels("retry").inc()
        log.error("spool %s: %s; requeued, the spool pauses %.0f s", shown(claimed.name), error, self._backoff)
