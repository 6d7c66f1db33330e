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

Answers do not pile up for ever: with ``keep_seconds`` (``--spool-keep-days``, 7 by default) the
files of ``out/``, ``done/`` and ``failed/`` that have been there longer are removed
(``spool_prune``), at start-up and then every hour at most.

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
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..audio import encode
from ..disk_changes import Observer, Settle, observe
from ..encoding import check_available
from ..errors import (
    BusyError,
    ConfigError,
    ResourceError,
    SpoolFileError,
    TtsdError,
    is_system_oserror,
    os_error,
    resource_error,
)
from ..fsutil import SHARED, atomic_write_bytes, atomic_write_text, fsync_dir, rename_noreplace
from ..text import check_text
from .backend import Backend
from .speech_request import SynthRequest
from .spool_files import hashed_stem, is_id, parse_file, read_bounded, shown
from .spool_prune import Pruned, age, interval, prune
from .synth import Job, Result

log = logging.getLogger("ttsd.spool")

ROUTE = "spool"  # the request metrics' route label, as the Job it submits says
SUFFIXES = (".txt", ".json")
SETTLE_SECONDS = 0.25  # a file must keep its size and mtime this long before it is claimed
RESCAN_SECONDS = 2.0  # events can be lost (or never sent, on network filesystems)
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 60.0  # pause after a system failure, doubling
SCAN_BATCH = 1000  # entries of incoming/ looked at per scan
UNCLAIMABLE_RETRY = 60.0  # seconds before a file that could not be taken out of incoming/ is tried again
MAX_UNCLAIMABLE = 100_000  # such files remembered (each a name and two numbers)
ROOM_MARGIN = 1 << 20  # bytes free beyond a waiting request's outputs before it is spoken again
LOCK_FILE = ".ttsd.lock"


class _Unusable(Exception):
    """A spool folder is not a folder (a link, a file): the spool does nothing until it is."""


class _BoxError(Exception):
    """Writing or moving a request's files failed for a reason of the spool's folders (a folder
    made a link, permissions, a folder removed): the box's, never the request's."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _NoRoom(Exception):
    """A request's outputs did not fit on the spool's disk: ``needs`` bytes."""

    def __init__(self, cause: OSError, needs: int) -> None:
        super().__init__(str(cause))
        self.cause, self.needs = cause, needs


@dataclass
class _Waiting:
    """A claimed request in ``work/`` to serve again: not before ``not_before`` (monotonic), and
    once ``needs`` bytes are free (0: nothing known)."""

    needs: int = 0
    not_before: float = 0.0


class Spool:
    def __init__(self, root: Path, backend: Backend, *, concurrency: int, keep_seconds: float = 0.0) -> None:
        self.root = root
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.keep_seconds = keep_seconds  # answers older than this leave out/, done/, failed/ (0: kept)
        self.dirs = {name: root / name for name in ("incoming", "work", "out", "done", "failed")}
        self._settle: Settle[Path] = Settle(SETTLE_SECONDS)  # a file is claimed once its size and mtime hold
        self._active: set[asyncio.Task[None]] = set()
        # event-loop state only (executor threads return what they found; the loop applies it)
        self._serving: set[str] = set()  # IDs claimed (in work/) and not yet done or failed
        self._retry: dict[str, _Waiting] = {}  # claimed requests to serve again from work/
        self._unclaimable: dict[str, tuple[int, float]] = {}  # name -> (inode, when tried)
        self._prepared = False
        self._lock_fd: int | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._observer: Observer | None = None
        self._paused_until = 0.0  # monotonic: no claims before this (after a system failure)
        self._backoff = 0.0
        self._problem = ""  # the last folder problem logged (each is logged once, until it changes)
        self._next_prune = 0.0  # monotonic: when old answers are looked for next (``scan_now``)
        self._prune_problems: set[str] = set()  # problems removing them, each logged once while it lasts
        self._prune_stop = threading.Event()
        # files written since this wall-clock time are this run's: none is older than its uptime
        # (a box without a real-time clock starts in the past, and NTP moves it on later)
        self._started = (time.time(), time.monotonic())

    # -- life cycle ----------------------------------------------------------------------------
    def lock(self) -> None:
        """One daemon per spool (at start-up, before the voices load): a second would take over
        the first's claimed requests and speak them twice. ``ConfigError`` if another holds it."""
        import fcntl

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise os_error(exc, f"opening the spool {self.root}", f"--spool {self.root}: cannot use it") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise ConfigError(f"--spool {self.root}: another ttsd serves this spool") from None
            # a filesystem without locks (NFS without lockd): served, unguarded, and said
            log.warning("spool: cannot lock %s (%s): run one daemon on it", self.root, exc.strerror or exc)
        self._lock_fd = fd

    def prepare(self) -> None:
        """Create the folders, remove leftover temp files, and take up claimed requests: each is
        served again from ``work/`` (or moved to ``done/`` when a crash came after its outputs
        were published). Nothing in the spool can make this fail: a folder that is a link is
        logged and the scans try again; an entry that cannot be moved is logged and left. Runs
        before any request of this spool is served (at start-up, or from ``run`` while none is)."""
        try:
            self._prepare()
        except (OSError, _Unusable) as exc:  # tried again by the scans
            self._folder_problem(f"spool: {exc}")

    def _prepare(self) -> None:
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
                if self._finish_claim(claimed):
                    continue
                if self._already_published(claimed):
                    placed = self._place(claimed, "done")
                    log.info("%s was served before a restart; moved to done/%s", shown(claimed.name), shown(placed))
                    continue
            except (OSError, _Unusable) as exc:
                log.error("spool %s: cannot move it to done/ (%s); it stays in work/", shown(claimed.name), exc)
                continue
            self._retry[claimed.name] = _Waiting()
            self._serving.add(claimed.stem)  # a file with its ID in incoming/ waits for it
            log.info("serving %s again (claimed before a restart)", shown(claimed.name))
        self._forget_lone_reasons()
        fsync_dir(self.dirs["work"])
        self._prepared = True

    def _finish_claim(self, claimed: Path) -> bool:
        """A claim is a hard link into ``work/``, then the name in ``incoming/`` removed: a kill -9
        between the two left the same file under both names, and the restart failed the claimed
        one for its other hard link while it served the other, so one request ended in ``failed/``
        and ``done/`` both. The name in ``incoming/`` of that very file (same inode, no third
        link) is removed, as the claim would have; where it cannot be (a sticky ``incoming/``
        holding another user's file), the claim is undone, as ``_claim`` undoes it, and True says
        the request left ``work/``. (A writer renaming a new file of the same name into
        ``incoming/`` between the look and the removal would lose it: a request ID already in
        service, in a window of microseconds at start-up only.)"""
        st = os.lstat(claimed)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 2:
            return False
        left = self.dirs["incoming"] / claimed.name
        try:
            other = os.lstat(left)
        except FileNotFoundError:
            return False
        if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
            return False
        try:
            os.unlink(left)
        except OSError as exc:
            os.unlink(claimed)
            log.warning("spool: %s stays in incoming/: it cannot be moved from there (%s)", shown(claimed.name), exc)
            return True
        log.info("spool: %s was claimed when the daemon stopped; its name in incoming/ is removed", shown(claimed.name))
        return False

    def _forget_lone_reasons(self) -> None:
        """An error file in ``failed/`` whose request never joined it (a kill -9 between writing
        the reason and moving the request) is removed when that request is back in ``work/``: it is
        served again, and gets its own reason if it fails again. An error file whose request is
        elsewhere (removed by hand) is not the daemon's to judge and stays."""
        waiting = {_names(name, 0, failed=True)[1] for name in self._retry}
        for reason in self.dirs["failed"].glob("*.error.json"):
            stem = reason.name.removesuffix(".error.json")
            first = stem.split("~", 1)[0] + ".error.json"  # ID~3.error.json was ID's too
            if first not in waiting or any(
                os.path.lexists(reason.with_name(stem + suffix)) for suffix in (*SUFFIXES, ".request")
            ):
                continue
            with contextlib.suppress(OSError):
                reason.unlink()
                log.info(
                    "spool: removed failed/%s, left without its request, which is served again", shown(reason.name)
                )

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
        """Claim and serve requests until ``stop`` (and remove old answers beside it)."""
        loop = asyncio.get_running_loop()
        pruner = loop.create_task(self._pruning()) if self.keep_seconds else None
        try:
            await self._claiming(loop)
        finally:
            if pruner is not None:
                pruner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruner

    async def _claiming(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                if not self._prepared and not self._active:  # its folders were unusable at start-up
                    await loop.run_in_executor(None, self.prepare)
                if self._prepared:
                    # listing and stat'ing happen on a thread: 50,000 waiting files took 0.3 s a scan
                    skip = dict(self._unclaimable)
                    self._scan(*await loop.run_in_executor(None, self._list_incoming, skip))
            except (OSError, _Unusable) as exc:
                self._folder_problem(f"spool scan failed: {exc}")
            now = time.monotonic()
            wait = SETTLE_SECONDS if self._settle.seen else RESCAN_SECONDS
            due = [w.not_before for w in self._retry.values() if w.not_before > now]
            if due:
                wait = min(wait, min(due) - now)
            paused = self._paused_until - now
            if paused > 0:
                wait = min(wait, paused) if self._settle.seen else paused
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))

    def scan_now(self) -> None:
        """One scan as ``run`` makes it, listing on the caller's thread (on the event loop: for
        tests and a caller that drives the spool itself)."""
        if not self._prepared and not self._active:
            self.prepare()
        if self._prepared:
            self._scan(*self._list_incoming(dict(self._unclaimable)))
        if self._prune_due(time.monotonic()):
            self._pruned(self._prune(frozenset(self._serving)))

    def stop(self) -> None:
        """Stop claiming new requests (running ones finish; unfinished ones stay in work/)."""
        self._stopping = True
        self._prune_stop.set()  # a removal of old answers under way ends after its current file
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()

    async def drain(self) -> None:
        if self._active:
            await asyncio.gather(*self._active, return_exceptions=True)

    # -- old answers ---------------------------------------------------------------------------
    async def _pruning(self) -> None:
        """Remove old answers at start-up, then every ``interval``: a task of its own, so the
        first look at a spool left for months (200,000 files took 37 s) holds no request up, and
        ``stop`` ends it after the file it is removing."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            delay = RESCAN_SECONDS  # the folders are not usable yet: soon again
            if self._prepared:
                busy = frozenset(self._serving)
                try:
                    self._pruned(await loop.run_in_executor(None, self._prune, busy))
                except Exception:  # a bug: said, and tried again at the next look (the spool goes on)
                    log.exception("spool: removing old answers failed")
                delay = interval(self.keep_seconds)
            await asyncio.sleep(delay)

    def _prune_due(self, now: float) -> bool:
        """Whether ``scan_now`` looks for old answers now (once the folders are usable, then
        every ``interval``, as ``_pruning`` does)."""
        if not self.keep_seconds or not self._prepared or now < self._next_prune:
            return False
        self._next_prune = now + interval(self.keep_seconds)
        return True

    def _prune(self, busy: frozenset[str] = frozenset()) -> Pruned:
        """Remove the answers kept long enough, never those of IDs being served (``busy``: one
        waiting in work/ for done/ to take it would be spoken again without its ``ID.json``). On
        an executor thread."""
        since, started = self._started
        written = since if time.monotonic() - started < self.keep_seconds else None
        return prune(self.dirs, self.keep_seconds, time.time(), busy=busy, written_since=written, stop=self._prune_stop)

    def _pruned(self, pruned: Pruned) -> None:
        if pruned.total:
            folders = ", ".join(f"{name}/ {count}" for name, count in pruned.removed.items() if count)
            log.info("spool: removed %d files older than %s (%s)", pruned.total, age(self.keep_seconds), folders)
        for problem in sorted(set(pruned.problems) - self._prune_problems):
            log.warning("spool: old answers stay: %s", problem)
        self._prune_problems = set(pruned.problems)

    # -- the folders ---------------------------------------------------------------------------
    def _check_dirs(self, *, quiet: bool = False) -> None:
        """Each spool folder is a folder (``_Unusable`` if one is a link or a file: a link could
        make the spool empty a folder elsewhere into failed/); a missing one is made (again: said,
        unless ``quiet``, at start-up)."""
        for name in self.dirs:
            self._folder(name, quiet=quiet)

    def _folder(self, name: str, *, quiet: bool = False) -> Path:
        """Spool folder ``name``, checked just before it is used (a folder, not a link: one swapped
        for a link while a request was spoken was written through), made again if missing. A
        swap in the instant between the check and the use is not seen: only the daemon's user
        may write the spool dir itself (docs/spool.md)."""
        path = self.dirs[name]
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.mkdir(parents=True, exist_ok=True)
            self._share(path)
            if not quiet and self._problem != f"missing {name}":
                log.warning("spool: %s was missing; made it again", path)
            self._problem = f"missing {name}"
            return path
        if not stat.S_ISDIR(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise _Unusable(f"{path} is {what}; the spool does nothing until it is a directory again")
        return path

    def _share(self, path: Path) -> None:
        """A spool folder just made takes the spool dir's group permissions (and setgid): its
        writers are a group (docs/spool.md: mode 2770), and the daemon's umask (the example unit's
        0027) left ``incoming/`` unwritable to them."""
        with contextlib.suppress(OSError):
            group = os.stat(self.root).st_mode & 0o2070
            os.chmod(path, 0o700 | group)

    def _folder_problem(self, message: str) -> None:
        """Log a problem of the spool's folders once, not at every scan."""
        if message != self._problem:
            log.error("%s", message)
        self._problem = message

    # -- claiming ------------------------------------------------------------------------------
    def _list_incoming(
        self, skip: dict[str, tuple[int, float]] | None = None
    ) -> tuple[list[tuple[str, os.stat_result]], bool, set[str]]:
        """Up to ``SCAN_BATCH`` entries of ``incoming/`` (never following a link), oldest first;
        whether that was all of them; the names passed over as unclaimable (``skip``: tried less
        than ``UNCLAIMABLE_RETRY`` ago), which do not count towards the batch, so a thousand of
        them cannot hide the requests behind them. Runs on an executor thread."""
        self._check_dirs()
        skip, now = skip or {}, time.monotonic()
        found, passed, complete = [], set(), True
        with os.scandir(self._folder("incoming")) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(".tmp"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                tried = skip.get(entry.name)
                if tried is not None and tried[0] == st.st_ino and now - tried[1] < UNCLAIMABLE_RETRY:
                    passed.add(entry.name)
                    continue
                found.append((entry.name, st))
                if len(found) >= SCAN_BATCH:
                    complete = False
                    break
        found.sort(key=lambda item: (item[1].st_mtime_ns, item[0]))
        return found, complete, passed

    def _scan(
        self, entries: list[tuple[str, os.stat_result]], complete: bool = True, passed: set[str] | None = None
    ) -> None:
        now = time.monotonic()
        if self._problem.startswith(("spool scan failed", "spool: ")):
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
            self._settle.forget(path)
            self._claim(path, st, now)
        self._settle.keep_only(present)
        if complete:  # names no longer in incoming/ are forgotten (only a whole listing knows)
            keep = {p.name for p in present} | (passed or set())
            self._unclaimable = {k: v for k, v in self._unclaimable.items() if k in keep}

    def _may_start(self, now: float) -> bool:
        return len(self._active) < self.concurrency and self.backend.ready() and now >= self._paused_until

    def _take_up(self, now: float) -> None:
        """Serve the claimed requests waiting in ``work/``, oldest first: each once its delay is
        over, and one whose outputs did not fit once the disk has room for them."""
        for name, waiting in list(self._retry.items()):
            if not self._may_start(now):
                return
            if now < waiting.not_before or (waiting.needs and not _room_for(self.dirs["out"], waiting.needs)):
                continue
            del self._retry[name]
            self._start(self.dirs["work"] / name)

    def _claim(self, path: Path, st: os.stat_result, now: float) -> None:
        """Move a request into ``work/``: whoever moves it first owns it. Never over a file there
        (a hard link fails if the name exists; where links are not possible, a rename that does
        not replace). A file the daemon may link but not remove (a sticky ``incoming/`` holding
        another user's file) is left where it is, and said once."""
        try:
            incoming, work = self._folder("incoming"), self._folder("work")
        except _Unusable as exc:
            self._folder_problem(f"spool scan failed: {exc}")
            return
        path, target = incoming / path.name, work / path.name
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
        except (FileNotFoundError, FileExistsError):
            return
        except OSError as exc:
            if self._unclaimable.get(path.name, (None,))[0] != st.st_ino:
                log.error(
                    "spool: cannot claim %s (%s): the daemon must be able to move files out of %s",
                    shown(path.name),
                    exc.strerror or exc,
                    self.dirs["incoming"],
                )
            if len(self._unclaimable) < MAX_UNCLAIMABLE:
                self._unclaimable[path.name] = (st.st_ino, now)
            return
        self._unclaimable.pop(path.name, None)
        self._start(target)

    def _start(self, claimed: Path) -> None:
        self._serving.add(claimed.stem)  # until _serve ends: another file with this ID waits
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
        """One claimed request, to its end in ``done/`` or ``failed/``, or kept in ``work/`` to be
        served again. The files are moved on executor threads; what the spool remembers
        (``_retry``, ``_serving``, the pause) changes here, on the event loop, only."""
        loop = asyncio.get_running_loop()
        request_id = claimed.stem
        started = time.monotonic()
        waits = False  # still claimed when this ends (to be served again)
        served: Any = None  # the voice version once leased, for the request metrics
        try:
            if await loop.run_in_executor(None, self._already_published, claimed):
                # served, then kept by a failure to move it to done/: it goes there, not to failed/
                await loop.run_in_executor(None, self._finish_published, claimed)
                return
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
            job = Job(text=req.text, options=req.options, lease=lease, route=ROUTE)
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
                    "total": round(time.monotonic() - started, 3),
                },
                "request_sha256": hashlib.sha256(raw).hexdigest(),
            }
            await loop.run_in_executor(None, self._publish, claimed, req, result, meta)
            self._backoff = 0.0
            self.backend.metrics.spool.labels("ok").inc()
            self._count(served, "ok")
            self.backend.metrics.observe_request(served.name, served.version, ROUTE, time.monotonic() - started)
        except BusyError as exc:  # not the request's fault: served again once the queue may have room
            delay = max(1.0, float(exc.retry_after))
            waits = self._later(claimed, None, delay=delay)
            # and nothing else is claimed or taken up meanwhile: each would meet the same queue
            self._paused_until = max(self._paused_until, time.monotonic() + delay)
        except asyncio.CancelledError:
            raise  # shutting down: the request stays in work/ and is served after restart
        except _NoRoom as exc:
            never = await loop.run_in_executor(None, _never_fits, self.dirs["out"], exc.needs)
            if never is None:
                waits = self._later(claimed, exc.cause, needs=exc.needs)
            else:
                self._count(served, "insufficient_storage", "system")
                waits = await self._fail(claimed, "insufficient_storage", never)
        except _BoxError as exc:
            waits = self._later(claimed, exc.cause)
        except (ResourceError, MemoryError) as exc:
            waits = self._later(claimed, exc)
        except OSError as exc:
            if is_system_oserror(exc):
                waits = self._later(claimed, exc)
            else:  # a request file that vanished or cannot be read: that request's problem
                self._count(served, "bad_file", "request")
                waits = await self._fail(claimed, "bad_file", f"{shown(claimed.name)}: {exc.strerror or exc}")
        except TtsdError as exc:
            self._count(served, exc.code, exc.fault)
            waits = await self._fail(claimed, exc.code, str(exc))
        except Exception as exc:  # a bug; the request must still not vanish
            log.exception("spool request %s failed", shown(claimed.name))
            self._count(served, "internal", "system")
            waits = await self._fail(claimed, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            if not waits:
                self._serving.discard(request_id)

    def _count(self, served: Any, outcome: str, fault: str | None = None) -> None:
        """A request's outcome in the request metrics, as the other front ends count theirs (a
        request kept to be served again is not counted until it ends)."""
        voice, version = (served.name, served.version) if served is not None else ("-", "-")
        metrics = self.backend.metrics
        metrics.requests.labels(voice, version, ROUTE, outcome).inc()
        if fault is not None:
            metrics.failures.labels(voice, version, ROUTE, fault).inc()

    def _publish(self, claimed: Path, req: SynthRequest, result: Result, meta: dict[str, Any]) -> None:
        audio = result.audio
        assert audio is not None
        data = audio.to_pcm16() if req.format == "pcm" else encode(audio, req.format)
        text = json.dumps(meta, indent=1) + "\n"
        try:
            out = self._folder("out")
            atomic_write_bytes(out / f"{claimed.stem}.{req.format}", data, SHARED)
            atomic_write_text(out / f"{claimed.stem}.json", text, SHARED)
            placed = self._place(claimed, "done")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _NoRoom(exc, len(data) + len(text)) from exc
            raise _BoxError(exc) from exc
        except _Unusable as exc:
            raise _BoxError(exc) from exc
        fsync_dir(self.dirs["work"])
        log.info("spool %s: %.2f s of audio", shown(placed), result.audio_seconds)

    def _finish_published(self, claimed: Path) -> None:
        try:
            placed = self._place(claimed, "done")
            fsync_dir(self.dirs["work"])
        except (OSError, _Unusable) as exc:
            raise _BoxError(exc) from exc
        log.info("spool %s: served before; moved to done/%s", shown(claimed.name), shown(placed))

    def _place(self, claimed: Path, folder: str) -> str:
        """Move ``claimed`` into ``done/`` under its name, or ``ID~N`` where that is taken (never
        replacing anything). Returns the name it got."""
        self._folder("work")
        where = self._folder(folder)
        for n in range(_TRIES):
            name = _names(claimed.name, n)[0]
            try:
                rename_noreplace(claimed, where / name)
            except FileExistsError:
                continue
            return name
        raise OSError(errno.EEXIST, f"{folder}/ has no free name for {shown(claimed.name)}")

    async def _fail(self, claimed: Path, code: str, message: str) -> bool:
        """Put the request in ``failed/`` beside its error file (written first: a request never
        lands there without its reason). True when it must wait in ``work/`` instead (the box
        failed to take it: a full disk)."""
        cause = await asyncio.get_running_loop().run_in_executor(None, self._fail_files, claimed, code, message)
        if cause is not None:
            return self._later(claimed, cause)
        return False

    def _fail_files(self, claimed: Path, code: str, message: str) -> BaseException | None:
        """``_fail``'s files, on an executor thread: the error file under a name free for it and
        for the request, then the request moved beside it. A file with other hard links is not
        this writer's to keep (a name for a file elsewhere): only its name here is removed. A
        failure of the box is returned, to keep the request claimed; one of anything else leaves
        the request in ``work/``, logged."""
        body = json.dumps({"error": {"code": code, "message": message}}, indent=1) + "\n"
        written: Path | None = None
        try:
            self._folder("work")
            failed = self._folder("failed")
            st = os.lstat(claimed)
            linked = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
            for n in range(_TRIES):
                name, error = _names(claimed.name, n, failed=True)
                if not linked and os.path.lexists(failed / name):
                    continue
                try:
                    atomic_write_text(failed / error, body, SHARED, exclusive=True)
                except FileExistsError:
                    continue
                written = failed / error
                if linked:
                    os.unlink(claimed)
                else:
                    try:
                        rename_noreplace(claimed, failed / name)
                    except FileExistsError:  # taken meanwhile: the next name
                        written.unlink()
                        written = None
                        continue
                written = None  # the request is beside its reason now: both stay
                break
            else:
                raise OSError(errno.EEXIST, f"failed/ has no free name for {shown(claimed.name)}")
        except (OSError, _Unusable) as exc:
            if written is not None:  # no reason without its request
                with contextlib.suppress(OSError):
                    written.unlink()
            if os.path.lexists(claimed):  # the spool's folders failed it, not the request: it waits
                return exc
            log.error("spool %s: cannot put it in failed/ (%s)", shown(claimed.name), exc)
            return None
        with contextlib.suppress(OSError):
            fsync_dir(self.dirs["work"])
        self.backend.metrics.spool.labels("failed").inc()
        log.warning("spool %s failed: %s", shown(claimed.name), message)
        return None

    def _later(self, claimed: Path, cause: BaseException | None, *, needs: int = 0, delay: float = 0.0) -> bool:
        """Keep a claimed request in ``work/``, to be served again (on the event loop only): after
        ``delay`` (a busy queue); after a system ``cause`` (disk full, out of memory, I/O error, a
        spool folder it cannot use) once the spool's pause is over, longer each time; with
        ``needs``, once that many bytes are free. True (it waits)."""
        self._retry[claimed.name] = _Waiting(needs, time.monotonic() + delay)
        if cause is None:
            return True
        error = cause if isinstance(cause, ResourceError) else resource_error(cause, "serving a spool request")
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
        self._paused_until = time.monotonic() + self._backoff
        self.backend.metrics.spool.labels("retry").inc()
        room = f"; it is spoken again once {_mb(needs)} and a margin are free" if needs else ""
        log.error(
            "spool %s: %s; kept in work/, the spool pauses %.0f s%s", shown(claimed.name), error, self._backoff, room
        )
        return True


_TRIES = 1000  # names ID, ID~1, ... tried in done/ and failed/ (then a random one)


def _names(name: str, n: int, *, failed: bool = False) -> tuple[str, str]:
    """The ``n``-th name for request ``name`` in ``done/`` or ``failed/``, and its error file's:
    ``ID.txt`` and ``ID.error.json``, then ``ID~1.txt`` and ``ID~1.error.json``...; the last try
    a random tag. A name that is no request's (invalid, too long) goes to ``failed/`` under its
    error file's cleaned and hashed stem, as ``STEM.request``: never under its own name, which
    could be an error file's (``y.error.json``) or too long to take a tag."""
    tag = "" if n == 0 else f"~{n}" if n < _TRIES - 1 else f"~{os.urandom(4).hex()}"
    path = Path(name)
    if path.suffix in SUFFIXES and is_id(path.stem):
        return f"{path.stem}{tag}{path.suffix}", f"{path.stem}{tag}.error.json"
    base = hashed_stem(name)  # always hashed: "abc.doc" is no request "abc" and must not give its reason
    return f"{base}{tag}.request", f"{base}{tag}.error.json"


def failed_names(name: str) -> tuple[str, str]:
    """Where a failed request named ``name`` goes in ``failed/``, with its error file, when the
    names are free."""
    return _names(name, 0, failed=True)


def _capacity(fs: os.statvfs_result) -> int:
    """Bytes this process could have on the filesystem if everything else were deleted (without
    the blocks reserved for root, unless it is root)."""
    reserved = 0 if os.geteuid() == 0 else fs.f_bfree - fs.f_bavail
    return (fs.f_blocks - reserved) * fs.f_frsize


def _margin(fs: os.statvfs_result) -> int:
    """Room kept free beyond a waiting request's outputs: 1 MB, or a twentieth of a small disk."""
    return min(ROOM_MARGIN, _capacity(fs) // 20)


def _room_for(path: Path, needs: int) -> bool:
    """Whether ``needs`` bytes and the margin are free."""
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize
    return free >= needs + _margin(fs)


def _never_fits(path: Path, needs: int) -> str | None:
    """Why outputs of ``needs`` bytes could never fit on ``path``'s filesystem (with the margin
    ``_room_for`` waits for), or None."""
    try:
        fs = os.statvfs(path)
    except OSError:
        return None
    if needs + _margin(fs) <= _capacity(fs):
        return None
    return (
        f"its audio needs {_mb(needs)}, more than the spool's filesystem could ever hold ({_mb(_capacity(fs))}); "
        "ask for less text or another format"
    )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
