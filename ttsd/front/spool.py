"""The spool directory: requests as files, for tools that cannot speak HTTP.

    SPOOL/incoming/ID.txt | ID.json   a request (writers drop it by rename; dot-files and *.tmp ignored)
    SPOOL/work/                        claimed requests (claimed by rename)
    SPOOL/out/ID.<fmt> + ID.json       the audio, then its metadata; ID.json appears last and marks completion
    SPOOL/done/                        requests that were served
    SPOOL/failed/ID.* + ID.error.json  requests that cannot be served, and why

Every request ends in ``done/`` or ``failed/`` (with its reason), except while the box itself
fails (disk full, out of memory, I/O error, a spool folder it cannot write): then the request stays
claimed in ``work/`` and the spool pauses, with a growing back-off, before it claims anything
again; a request whose audio did not fit waits until the disk has room for it (it is not spoken
again before), and one whose audio could never fit on the spool's filesystem fails. A request's
own fault never counts against a model (see ``ttsd.errors``).

Writers are not trusted: a request file is opened without following links and must be a regular
file with no other hard link, of at most ``MAX_REQUEST_BYTES`` (checked with ``fstat`` before
reading); names are checked before they are used in a path or a log line; an ID already served
(``out/ID.json``) is refused rather than overwritten, and a file whose ID is being served waits.
No move between the spool's folders replaces anything: a name taken in ``done/`` or ``failed/``
gets ``~N`` after its ID. ``incoming/`` is listed on a thread, a batch at a time, so a backlog of
any size cannot stall the event loop. The spool's own folders must be folders, never links (one
replaced by a link is not used); one that is missing is made again.

Crash safety: outputs are written to hidden temp names and renamed into place, and a request leaves
``work/`` only after its outputs are published. After ``kill -9`` at any moment, the next start
serves what is in ``incoming/`` and ``work/`` (or moves a request to ``done/`` if its outputs were
already complete); ``out/`` never shows a half-written file. Nothing in the spool can stop the
daemon from starting: an entry that cannot be moved is logged and left where it is.

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
from ..fsutil import SHARED, atomic_write_bytes, atomic_write_text, fsync_dir, rename_noreplace
from ..text import check_text
from .backend import Backend
from .speech_request import SynthRequest
from .spool_files import error_name, is_id, parse_file, read_bounded, shown
from .synth import Job, Result

log = logging.getLogger("ttsd.spool")

SUFFIXES = (".txt", ".json")
SETTLE_SECONDS = 0.25  # a file must keep its size and mtime this long before it is claimed
RESCAN_SECONDS = 2.0  # events can be lost (or never sent, on network filesystems)
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 60.0  # pause after a system failure, doubling
SCAN_BATCH = 1000  # entries of incoming/ looked at per scan
UNCLAIMABLE_RETRY = 60.0  # seconds before a file that could not be taken out of incoming/ is tried again
ROOM_MARGIN = 1 << 20  # bytes free beyond a waiting request's outputs before it is spoken again


class _NoRoom(Exception):
    """A request's outputs did not fit on the spool's disk: ``needs`` bytes."""

    def __init__(self, cause: OSError, needs: int) -> None:
        super().__init__(str(cause))
        self.cause, self.needs = cause, needs


class _Unusable(Exception):
    """A spool folder is not a folder (a link, a file): the spool does nothing until it is."""


class Spool:
    def __init__(self, root: Path, backend: Backend, *, concurrency: int) -> None:
        self.root = root
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.dirs = {name: root / name for name in ("incoming", "work", "out", "done", "failed")}
        self._settle: Settle[Path] = Settle(SETTLE_SECONDS)  # a file is claimed once its size and mtime hold
        self._active: set[asyncio.Task[None]] = set()
        self._serving: set[str] = set()  # IDs claimed (in work/) and not yet done or failed
        # claimed requests to serve from work/ (after a restart, or a failure of the box): name ->
        # bytes of free space its outputs need first (0: none known)
        self._retry: dict[str, int] = {}
        self._unclaimable: dict[str, tuple[int, float]] = {}  # name -> (inode, when tried)
        self._wake = asyncio.Event()
        self._stopping = False
        self._observer: Observer | None = None
        self._paused_until = 0.0  # monotonic: no claims before this (after a system failure)
        self._backoff = 0.0
        self._problem = ""  # the last folder problem logged (each is logged once, until it changes)

    # -- life cycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folders, remove leftover temp files, and take up claimed requests: each is
        served again from ``work/`` (or moved to ``done/`` when a crash came after its outputs
        were published). Nothing a writer put in the spool can make this fail: an entry that
        cannot be moved is logged and left."""
        self._check_dirs(quiet=True)
        for folder in ("out", "done", "failed"):  # atomic writes' temp files, left by a kill -9
            for leftover in self.dirs[folder].glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        if os.geteuid() != 0 and self.dirs["incoming"].stat().st_mode & stat.S_ISVTX:
            log.warning(
                "spool: %s is sticky: a file another user drops there cannot be claimed (only its owner "
                "may remove it); give the daemon a folder of its own or drop files as its user",
                self.dirs["incoming"],
            )
        for claimed in sorted(self.dirs["work"].iterdir()):
            if claimed.name.startswith("."):
                continue
            try:
                if self._already_published(claimed):
                    placed = self._place(claimed, "done")
                    log.info("%s was served before a restart; moved to done/%s", shown(claimed.name), shown(placed))
                    continue
            except OSError as exc:
                log.error("spool %s: cannot move it to done/ (%s); it stays in work/", shown(claimed.name), exc)
                continue
            self._retry[claimed.name] = 0
            self._serving.add(claimed.stem)  # a file with its ID in incoming/ waits for it
            log.info("serving %s again (claimed before a restart)", shown(claimed.name))
        fsync_dir(self.dirs["work"])

    def _already_published(self, claimed: Path) -> bool:
        meta = self.dirs["out"] / f"{claimed.stem}.json"
        if claimed.suffix not in SUFFIXES or not is_id(claimed.stem) or not meta.is_file():
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
            except (OSError, _Unusable) as exc:
                self._folder_problem(f"spool scan failed: {exc}")
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

    # -- the folders ---------------------------------------------------------------------------
    def _check_dirs(self, *, quiet: bool = False) -> None:
        """Each spool folder is a folder (``_Unusable`` if one is a link or a file: a link could
        make the spool empty a folder elsewhere into failed/); a missing one is made (again: said,
        unless ``quiet``, at start-up)."""
        for name, path in self.dirs.items():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                path.mkdir(parents=True, exist_ok=True)
                if not quiet and self._problem != f"missing {name}":
                    log.warning("spool: %s was missing; made it again", path)
                self._problem = f"missing {name}"
                continue
            if not stat.S_ISDIR(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise _Unusable(f"{path} is {what}; the spool does nothing until it is a directory again")

    def _folder_problem(self, message: str) -> None:
        """Log a problem of the spool's folders once, not at every scan."""
        if message != self._problem:
            log.error("%s", message)
        self._problem = message

    # -- claiming ------------------------------------------------------------------------------
    def _list_incoming(self) -> list[tuple[str, os.stat_result]]:
        """Up to ``SCAN_BATCH`` entries of ``incoming/`` (never following a link), oldest first.
        Runs on an executor thread; a bigger backlog is taken a batch at a time."""
        self._check_dirs()
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
        if self._problem.startswith("spool scan failed"):
            log.info("spool: its folders are usable again")
            self._problem = ""
        self._take_up(now)  # claimed before: first
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
            if not self._may_start(now):
                continue
            tried = self._unclaimable.get(name)
            if tried is not None and tried[0] == st.st_ino and now - tried[1] < UNCLAIMABLE_RETRY:
                continue
            self._settle.forget(path)
            self._claim(path, st, now)
        self._settle.keep_only(present)
        self._unclaimable = {k: v for k, v in self._unclaimable.items() if self.dirs["incoming"] / k in present}

    def _may_start(self, now: float) -> bool:
        return len(self._active) < self.concurrency and self.backend.ready() and now >= self._paused_until

    def _take_up(self, now: float) -> None:
        """Serve the claimed requests waiting in ``work/``, oldest first; one whose outputs did
        not fit waits until the disk has room for them."""
        for name, needs in list(self._retry.items()):
            if not self._may_start(now):
                return
            if needs and _free_bytes(self.dirs["out"]) < needs + ROOM_MARGIN:
                continue
            del self._retry[name]
            self._start(self.dirs["work"] / name)

    def _claim(self, path: Path, st: os.stat_result, now: float) -> None:
        """Move a request into ``work/``: whoever moves it first owns it. Never over a file there
        (a hard link fails if the name exists; where links are not possible, a rename that does
        not replace). A file the daemon may link but not remove (a sticky ``incoming/`` holding
        another user's file) is left where it is, and said once."""
        target = self.dirs["work"] / path.name
        try:
            try:
                os.link(path, target, follow_symlinks=False)
            except FileExistsError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                rename_noreplace(path, target)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:  # another daemon took it meanwhile: so does this one
                    pass
                except OSError:
                    os.unlink(target)  # the claim did not happen
                    raise
        except FileNotFoundError:
            return
        except FileExistsError:
            return
        except OSError as exc:
            if self._unclaimable.get(path.name, (None,))[0] != st.st_ino:
                log.error(
                    "spool: cannot claim %s (%s): the daemon must be able to move files out of %s",
                    shown(path.name),
                    exc.strerror or exc,
                    self.dirs["incoming"],
                )
            self._unclaimable[path.name] = (st.st_ino, now)
            return
        self._unclaimable.pop(path.name, None)
        self._serving.add(target.stem)  # until _serve ends: another file with this ID waits
        self._start(target)

    def _start(self, claimed: Path) -> None:
        self._serving.add(claimed.stem)
        task = asyncio.get_running_loop().create_task(self._serve(claimed))
        self._active.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._wake.set()  # a slot is free: the next request need not wait for the next scan
        if not task.cancelled() and task.exception() is not None:  # _serve handles everything; a bug
            log.error("spool task failed", exc_info=task.exception())

    # -- serving -------------------------------------------------------------------------------
    async def _serve(self, claimed: Path) -> None:
        loop = asyncio.get_running_loop()
        request_id = claimed.stem
        started = time.time()
        waits = False  # still claimed when this ends (to be served again)
        try:
            if claimed.suffix not in SUFFIXES or not is_id(request_id):
                raise SpoolFileError(
                    "bad_name",
                    f"{shown(claimed.name)}: name must be ID.txt or ID.json with ID of 1 to 200 letters, "
                    "digits, '.', '_' or '-', starting with a letter or digit and not ending in '.error'",
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
            try:
                await loop.run_in_executor(None, self._publish, claimed, req, result, meta)
            except OSError as exc:  # the spool's folders, not the request: the box's
                raise _BoxError(exc) from exc
            self._backoff = 0.0
            self.backend.metrics.spool.labels("ok").inc()
        except BusyError:
            waits = self._later(claimed, None)  # not the request's fault: served again soon
        except asyncio.CancelledError:
            raise  # shutting down: the request stays in work/ and is served after restart
        except _NoRoom as exc:
            waits = await loop.run_in_executor(None, self._no_room, claimed, exc)
        except _BoxError as exc:
            waits = self._later(claimed, exc.cause)
        except (ResourceError, MemoryError) as exc:
            waits = self._later(claimed, exc)
        except OSError as exc:
            if is_system_oserror(exc):
                waits = self._later(claimed, exc)
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
            if not waits:
                self._serving.discard(request_id)

    def _publish(self, claimed: Path, req: SynthRequest, result: Result, meta: dict[str, Any]) -> None:
        audio = result.audio
        assert audio is not None
        data = audio.to_pcm16() if req.format == "pcm" else encode(audio, req.format)
        out = self.dirs["out"]
        text = json.dumps(meta, indent=1) + "\n"
        try:
            atomic_write_bytes(out / f"{claimed.stem}.{req.format}", data, SHARED)
            atomic_write_text(out / f"{claimed.stem}.json", text, SHARED)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _NoRoom(exc, len(data) + len(text)) from exc
            raise
        placed = self._place(claimed, "done")
        fsync_dir(self.dirs["work"])
        log.info("spool %s: %.2f s of audio", placed, result.audio_seconds)

    def _place(self, claimed: Path, folder: str) -> str:
        """Move ``claimed`` into ``done/`` or ``failed/`` under its name, or, where that (or, in
        ``failed/``, its error file's name) is taken, under ``ID~N`` (never replacing anything).
        Returns the name it got."""
        where = self.dirs[folder]
        stem, suffix = _stem_and_suffix(claimed.name)
        for n in range(1000):
            name = claimed.name if n == 0 else f"{stem}~{n}{suffix}"
            if folder == "failed" and (where / _error_file(name)).exists():
                continue
            try:
                rename_noreplace(claimed, where / name)
            except FileExistsError:
                continue
            return name
        raise OSError(errno.EEXIST, f"{folder}/ holds a thousand requests named {shown(claimed.name)}")

    def _fail(self, claimed: Path, code: str, message: str) -> None:
        """Move the request to ``failed/`` beside its error file. A file with other hard links is
        not this writer's to keep (a name for a file elsewhere): only this name of it is removed.
        Never raises: a failure to write the reason for a system cause keeps the request claimed."""
        failed = self.dirs["failed"]
        try:
            st = os.lstat(claimed)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                os.unlink(claimed)
                name = claimed.name
                while (failed / _error_file(name)).exists():  # (the request's name is not kept)
                    name = f"{_stem_and_suffix(name)[0]}~{os.urandom(3).hex()}{claimed.suffix}"
            else:
                name = self._place(claimed, "failed")
            atomic_write_text(
                failed / _error_file(name),
                json.dumps({"error": {"code": code, "message": message}}, indent=1) + "\n",
                SHARED,
            )
            fsync_dir(self.dirs["work"])
        except OSError as exc:
            if is_system_oserror(exc) and claimed.exists() and self._later(claimed, exc):
                return
            log.error("spool %s: cannot move it to failed/ (%s)", shown(claimed.name), exc)
            return
        self.backend.metrics.spool.labels("failed").inc()
        log.warning("spool %s failed: %s", shown(claimed.name), message)

    def _no_room(self, claimed: Path, exc: _NoRoom) -> bool:
        """Outputs that did not fit: the request waits in ``work/`` until the disk has room for
        them, or fails when the spool's filesystem could never hold them."""
        fs = os.statvfs(self.dirs["out"])
        if exc.needs + ROOM_MARGIN > fs.f_blocks * fs.f_frsize:
            self._fail(
                claimed,
                "insufficient_storage",
                f"its audio needs {_mb(exc.needs)}, more than the spool's filesystem holds "
                f"({_mb(fs.f_blocks * fs.f_frsize)}); ask for less text or another format",
            )
            return False
        return self._later(claimed, exc.cause, needs=exc.needs)

    def _later(self, claimed: Path, cause: BaseException | None, *, needs: int = 0) -> bool:
        """Keep a claimed request in ``work/``, to be served again: after a busy queue at once, after
        a system ``cause`` (disk full, out of memory, I/O error, a spool folder it cannot write)
        once the spool's pause is over, longer each time; with ``needs``, once that many bytes are
        free. True (it waits)."""
        self._retry[claimed.name] = needs
        if cause is None:
            return True
        error = cause if isinstance(cause, ResourceError) else resource_error(cause, "serving a spool request")
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
        self._paused_until = time.monotonic() + self._backoff
        self.backend.metrics.spool.labels("retry").inc()
        room = f"; it is spoken again once {_mb(needs + ROOM_MARGIN)} are free" if needs else ""
        log.error(
            "spool %s: %s; kept in work/, the spool pauses %.0f s%s", shown(claimed.name), error, self._backoff, room
        )
        return True


class _BoxError(Exception):
    """Publishing a request's outputs failed for a reason of the spool's folders (permissions,
    a folder removed): the box's, never the request's."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _stem_and_suffix(name: str) -> tuple[str, str]:
    path = Path(name)
    return (path.stem, path.suffix) if path.suffix in SUFFIXES else (name, "")


def _error_file(name: str) -> str:
    """The error file beside request ``name`` in ``failed/``: ``ID.error.json`` (or ``ID~N``'s)."""
    stem, suffix = _stem_and_suffix(name)
    base = stem.split("~", 1)[0]
    if suffix and is_id(base):
        return f"{stem}.error.json"
    return error_name(name)


def _free_bytes(path: Path) -> int:
    try:
        fs = os.statvfs(path)
    except OSError:
        return 0
    return fs.f_bavail * fs.f_frsize


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
