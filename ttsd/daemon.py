"""``ttsd serve``: wires the model manager, synthesis pool, HTTP API and spool, and runs the
main loop.

Shape taken from gunicorn's arbiter: signal handlers only record the signal; the main loop
handles it (``SIGHUP`` rescans the models dir; ``SIGTERM``/``SIGINT`` drain and exit 0; a second
``SIGINT`` exits at once). Only a failure at start-up ends the process with an error; a bad model
folder later is refused and logged while the rest keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from aiohttp import web

from . import __version__
from .config import KERNEL_CACHE, ServeConfig
from .errors import ConfigError
from .fetch.box import box_id
from .fresh_thread import in_fresh_thread
from .front.backend import Backend
from .front.endpoints import check_ports, open_http, open_metrics, open_wyoming
from .front.listeners import check_socket, probe_socket, socket_gid
from .front.spool import Spool
from .front.spool_prune import DAY, kept
from .front.synth import SynthesisPool
from .front.wyoming import WyomingServer
from .front.wyoming_mdns import Advertisement
from .malloc import describe, freeze_heap, resident_bytes, tune
from .metrics import Metrics
from .models_dir import holds_voices
from .reloader import ModelWatcher
from .serving.manager import ModelManager
from .serving.residency import Budget
from .serving.source import LocalFolderSource
from .serving.state import StateDirLock
from .serving.versions import ModelVersion, Policy
from .signing import TrustedKeys
from .systemd import Notifier
from .voices import seed_models

log = logging.getLogger("ttsd.daemon")

EXIT_FORCED = 130
REMOVED_SERIES_LATE = 10.0  # seconds after a removal that its series are dropped again (late requests' times)
GRACE_SLACK = 5.0  # seconds past --grace that a stop may take to cut off what is left (a unit allows 15)
T = TypeVar("T")


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


def _writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable by this user")


class Daemon:
    def __init__(self, config: ServeConfig, notifier: Notifier | None = None) -> None:
        self.malloc = tune()  # `ttsd` did this already; here for a Daemon built in-process
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = Metrics.create()
        self.started = time.monotonic()  # uptime: a clock step (a box without an RTC at boot) must not make it negative
        # keys are read before anything starts: a bad trusted-keys dir is a start-up error
        self.trust = TrustedKeys.load(config.trusted_keys) if config.trusted_keys is not None else None
        self.manager = ModelManager(
            LocalFolderSource(config.models, settle=config.settle, incomplete_timeout=config.incomplete_timeout),
            state_dir=config.state,
            policy=Policy(
                keep=config.keep,
                swap=config.swap_policy,
                settle=config.settle,
                auto_rollback_requests=config.auto_rollback_requests,
                auto_rollback_share=config.auto_rollback_share,
                canary=dict(config.canary),
                canary_requests=config.canary_requests,
            ),
            engine_options={
                "max_chars": config.max_chars,
                "threads": config.threads,
                "max_audio_seconds": config.max_audio_seconds,
                "precision": config.precision,
                "kernel_cache": config.cache / KERNEL_CACHE,
            },
            default_voice=config.default_voice,
            listener=self._on_model_event,
            trust=self.trust,
            budget=Budget(
                max_loaded=config.max_loaded, memory=config.memory_budget, preload=config.preload, wait=config.load_wait
            ),
            wake=lambda: self.watcher.soon(max(config.settle / 2, 0.2)),
        )
        self.metrics.watch_voices(self.manager.snapshot)
        self.state_lock = StateDirLock(config.state)
        self._serving = False
        self._reconcile_lock = threading.Lock()
        self._reconcile_running = False
        self._reconcile_again = False
        # the one clock for looking at the models dir again: file events, a folder still settling
        # (asked for after each reconcile), the periodic tick, and SIGHUP
        self.watcher = ModelWatcher(config.models, self.request_reconcile, interval=config.rescan_interval)
        self.pool = SynthesisPool(workers=config.workers, queue_size=config.queue_size, metrics=self.metrics)
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        # set just before a stop's grace runs out: a whole-file request still being spoken answers
        # 503 then, rather than have its connection closed with no answer
        self._out_of_time = asyncio.Event()
        self._interrupts = 0
        self.force_exit: Callable[[int], None] = _exit_now  # tests driving _shutdown in-process replace it

    # -- wiring --------------------------------------------------------------------------------
    def _on_model_event(self, event: str, model: ModelVersion) -> None:
        """Every transition is counted; the manager logs it. Called on the manager's threads."""
        self.metrics.transitions.labels(model.name, event).inc()
        # any event may start or end a canary (canary, activated on promotion, rolled_back): ask
        # the map rather than follow the events, so the gauge cannot drift from what serves
        canary = self.manager.map.canary(model.name) is not None
        self.metrics.canary_share.labels(model.name).set(self.manager.policy.canary_share(model.name) if canary else 0)
        if event in ("loaded", "refused"):
            self.metrics.model_loads.labels(model.name, "ok" if event == "loaded" else "refused").inc()
        if event == "signature_refused":
            self.metrics.signature_failures.labels(model.name, model.signature_failure or "invalid").inc()
        if event == "loaded-for-request":
            self.metrics.voice_loads.labels(model.name).inc()
        elif event == "evicted":
            self.metrics.voice_evictions.labels(model.name).inc()
        if event == "unloaded" and model.key not in (
            self.manager.map.active(model.name),
            self.manager.map.canary(model.name),
        ):
            self.metrics.forget_version(model.name, model.version)  # (bounded: only what is loaded has series)
        if event == "removed":  # (``ttsd models remove``): its series go, and the voice's canary gauge
            self._forget_removed(model.name, model.version)
        if event == "activated":
            self.metrics.model_swaps.labels(model.name).inc()
            if self._serving:  # READY=1 again is harmless; before the socket exists it would be a lie
                self.notifier.ready(f"serving {model.name} {model.version}")

    def _forget_removed(self, voice: str, version: str) -> None:
        """A removed version's series go now, and once more a little later: a request that held
        it records its time after its answer is written, after the removal saw it end."""
        with contextlib.suppress(KeyError):
            self.metrics.canary_share.remove(voice)
        self.metrics.forget_version(voice, version)

        def again() -> None:  # unless it serves again by then (its folder copied back): its new series stay
            if self.manager.version(voice, version) is None:
                self.metrics.forget_version(voice, version)

        later = threading.Timer(REMOVED_SERIES_LATE, again)
        later.daemon = True
        later.start()

    # -- reloading (any thread asks; one loader thread at a time does it) ------------------------
    def request_reconcile(self) -> None:
        with self._reconcile_lock:
            if self._reconcile_running:
                self._reconcile_again = True
                return
            self._reconcile_running = True
        threading.Thread(target=self._reconcile_loop, name="ttsd-loader", daemon=True).start()

    def _reconcile_loop(self) -> None:
        # the jobs a reconcile starts run on their own threads: the next rescan does not wait for
        # them, so a newer folder supersedes an upgrade still loading
        while True:
            try:
                self.manager.reconcile(wait=False)
            except Exception:
                log.exception("checking the models dir failed")
            with self._reconcile_lock:
                if not self._reconcile_again:
                    self._reconcile_running = False
                    break
                self._reconcile_again = False
        if self.manager.waiting:  # a folder is still settling or incomplete: look again soon
            self.watcher.soon(max(self.config.settle / 2, 0.2))

    async def rollback(self, voice: str, to: str | None, reason: str | None = None) -> dict[str, Any]:
        why = reason or "rollback requested"  # the audit trail's words (a fleet mirror's withdrawal says so)
        return await in_fresh_thread(lambda: self.manager.rollback(voice, to, why), "ttsd-rollback")

    async def withdraw(self, voice: str, version: str, to: str | None, reason: str) -> dict[str, Any]:
        return await in_fresh_thread(lambda: self.manager.withdraw(voice, version, reason, to), "ttsd-withdraw")

    async def remove(self, voice: str, reason: str) -> dict[str, Any]:
        return await in_fresh_thread(lambda: self.manager.remove(voice, reason), "ttsd-remove")

    async def activate(self, voice: str, version: str) -> dict[str, Any]:
        return await in_fresh_thread(lambda: self.manager.activate(voice, version), "ttsd-activate")

    def status(self) -> dict[str, Any]:
        waiting, running = self.pool.depth()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 1),
            "socket": str(self.config.socket),
            "models": str(self.config.models.absolute()),  # a client elsewhere reads it (``models list --verify``)
            "state": str(self.config.state.absolute()),  # (``models remove --state``: this daemon's, or on disk)
            "spool": str(self.config.spool) if self.config.spool else None,
            "workers": self.config.workers,
            "queue": {"waiting": waiting, "running": running, "capacity": self.config.queue_size},
            "requests": {
                "completed": self.pool.completed,
                "failed": self.pool.failed,
                "refused": self.pool.refused,
                "cancelled": self.pool.cancelled,
            },
            "voices": self.manager.snapshot(),
            "memory": self.manager.memory(),
            "folders": self.manager.folders(),
            "history": self.manager.history()[-20:],
        }

    def backend(self) -> Backend:
        return Backend(
            acquire=self.manager.map.acquire,
            submit=self.pool.submit,
            voices=self.manager.snapshot,
            ready=self.manager.map.ready,
            status=self.status,
            metrics=self.metrics,
            max_chars=self.config.max_chars,
            max_audio_seconds=self.config.max_audio_seconds,
            capacity=self.pool.workers + self.pool.queue_size,
            judge=self.manager.map.judge,
            rollback=self.rollback,
            activate=self.activate,
            token=self.config.token,
            wanting=self.manager.wanting,
            load_wait=self.config.load_wait,
            withdraw=self.withdraw,
            remove=self.remove,
            out_of_time=self._out_of_time,
        )

    # -- running -------------------------------------------------------------------------------
    def run(self) -> int:
        return asyncio.run(self._main())

    def _record_signal(self, signum: int) -> None:
        self._signals.put_nowait(signum)  # handler does nothing else; the main loop acts

    async def _main(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if cfg.wyoming_zeroconf:
            Advertisement.check()  # a missing zeroconf package, before any dir is made
        _writable_dir(cfg.state, "state dir")
        self.state_lock.acquire()  # before anything is made, loaded or written: one daemon per state dir
        box = box_id(cfg.box_id, keep_in=cfg.state)  # kept there when not given nor derived from the machine id
        self.metrics.identify(box)
        log.info("box id %s (what a fleet mirror's staged rollout picks boxes by)", box)
        self._check_budget(loaded=False)
        _writable_dir(cfg.models, "models dir")
        _writable_dir(cfg.socket.parent, "socket dir")
        sockets = [(cfg.socket, "--socket")]
        if cfg.wyoming and (wyoming_uri := urlparse(cfg.wyoming)).scheme == "unix":
            sockets.append((Path(wyoming_uri.path), "--wyoming"))
        for path, flag in sockets:
            check_socket(path, flag)  # a live daemon's: refused; a stale one: removed
            probe_socket(path, flag)  # one can be made there
        if cfg.socket_group is not None:
            socket_gid(cfg.socket_group)  # it exists, and ttsd may give the sockets to it
        check_ports(cfg)  # before the voices load: a port in use is reported in a second, not a minute
        spool: Spool | None = None
        if cfg.spool is not None:
            spool = Spool(cfg.spool, self.backend(), concurrency=cfg.workers, keep_seconds=cfg.spool_keep_days * DAY)
            spool.lock()  # one daemon per spool: a second would speak the first's requests again
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(handled, self._record_signal, handled)

        # a new box only: not one whose voices all serve from the store (their folders deleted),
        # where the built-in voice may have been removed on purpose (``ttsd models remove``)
        fresh = cfg.seed_builtin and not holds_voices(cfg.models) and not self.manager.store.scan()
        if fresh and self.trust is not None:
            # the built-in voice is converted on this box and signed by nobody: seeded, it would be
            # refused, and sit in the models dir as a version 1 that blocks nothing but confuses all
            log.warning(
                "not seeding the built-in voice into %s: it is unsigned, and with --trusted-keys only signed "
                "folders load; get a signed voice: ttsd models get VOICE --mirror URL --trusted-keys %s",
                cfg.models,
                cfg.trusted_keys,
            )
        elif fresh:
            await self._starting(in_fresh_thread(lambda: seed_models(cfg.models, cfg.cache), "ttsd-seed"))
        self.notifier.status("loading voices")
        await self._starting(in_fresh_thread(self.manager.start, "ttsd-loader"))
        self._check_budget()
        self._check_names()
        if not self.manager.ready():
            if self.manager.waiting:  # a folder is still being copied in: not a failure yet
                log.warning("no voice is ready yet: waiting for a folder in %s to be complete", cfg.models)
            else:
                log.error(
                    "no voice serves from %s (the lines above say why); serving /healthz and waiting (SIGHUP rescans)",
                    cfg.models,
                )

        runner = await open_http(cfg, self.backend())
        wyoming = await open_wyoming(cfg, self.backend()) if cfg.wyoming else None
        metrics = await open_metrics(cfg, self.backend()) if cfg.metrics_listen else None
        spool_task: asyncio.Task[None] | None = None
        if spool is not None:
            await loop.run_in_executor(None, spool.prepare)
            spool.start_watching(loop)
            spool_task = loop.create_task(spool.run())

        voices = ", ".join(f"{v['name']} {v['active']}" for v in self.manager.snapshot() if v["active"])
        where = (
            str(cfg.socket)
            + (f" and {cfg.listen[0]}:{cfg.listen[1]}" if cfg.listen else "")
            + (f", Wyoming on {cfg.wyoming}" if cfg.wyoming else "")
            + (f", metrics on {cfg.metrics_listen[0]}:{cfg.metrics_listen[1]}" if cfg.metrics_listen else "")
            + (f", spool {cfg.spool} ({kept(cfg.spool_keep_days * DAY)})" if cfg.spool else "")
        )
        log.info("ttsd %s serving on %s (voices: %s)", __version__, where, voices or "none")
        log.info("malloc: %s", describe(self.malloc))
        if self.trust is not None:
            log.info(
                "loading only model folders signed by: %s",
                ", ".join(f"{k['key']} ({k['hint']})" for k in self.trust.describe()),
            )
        log.info("gc: %d objects made at start-up left out of later collections", freeze_heap())
        self._serving = True
        if self.manager.ready():
            self.notifier.ready(f"serving {voices}")
        else:  # up and waiting (a fleet box before its first get): not a start that never ends, which
            # systemd would kill at TimeoutStartSec and start again, every 5 minutes, for good
            self.notifier.ready(f"no voice yet: waiting for one in {cfg.models}")
        watchdog = loop.create_task(self._watchdog()) if self.notifier.watchdog_seconds else None
        self.watcher.start()
        if self.manager.waiting:
            self.watcher.soon(0.0)

        while True:
            signum = await self._signals.get()
            if signum == signal.SIGHUP:
                log.info("SIGHUP: rescanning %s and retrying deferred versions now", cfg.models)
                self.manager.retry_now()
                self.watcher.poke()
                continue
            break
        self.watcher.stop()
        self._interrupts = 1 if signum == signal.SIGINT else 0
        return await self._shutdown(runner, spool, spool_task, watchdog, wyoming, metrics)

    async def _starting(self, work: Awaitable[None]) -> None:
        """A step of the start-up (converting the built-in voice, loading the voices: seconds to
        minutes on a busy box), during which SIGTERM or SIGINT stops the daemon at once: nothing
        is served yet, and every step is safe to cut (as a kill -9 is). They waited for the end
        of the start-up, so ``systemctl stop`` of a daemon still loading ran into its SIGKILL.
        A SIGHUP waits for the end (a rescan then)."""
        step = asyncio.ensure_future(work)
        held: list[int] = []
        try:
            while not step.done():
                arrived = asyncio.ensure_future(self._signals.get())
                await asyncio.wait({step, arrived}, return_when=asyncio.FIRST_COMPLETED)
                if not arrived.done():
                    arrived.cancel()
                    continue
                signum = arrived.result()
                if signum == signal.SIGHUP:
                    held.append(signum)
                    continue
                name = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
                log.warning("%s during start-up: exiting now (nothing was served yet)", name)
                self.notifier.stopping("stopped during start-up")
                self.manager.stopping()  # the load it cuts short is no crash of the version's
                self.force_exit(0 if signum == signal.SIGTERM else EXIT_FORCED)
                raise asyncio.CancelledError  # (force_exit does not return, but in tests)
        finally:
            for signum in held:
                self._signals.put_nowait(signum)
        step.result()

    def _check_names(self) -> None:
        """A ``--preload``, ``--canary`` or ``--default-voice`` that names no voice in the models dir
        (a typo, a voice not copied in yet) is said at start-up: it would do nothing without a
        word (a typo in ``--canary`` sent the real voice's next version to every request). So is a
        canary share under the memory policy, which cannot hold one."""
        known = set(self.manager.table.names())
        named = [("--preload", name) for name in self.config.preload]
        named += [("--canary", name) for name, _share in self.config.canary if name != "*"]
        if self.config.swap_policy == "memory" and any(share > 0 for _name, share in self.config.canary):
            log.warning(
                "--canary does nothing under --swap-policy memory: it holds one version of a voice at a "
                "time, so a new version serves every request at once (auto-rollback still judges it)"
            )
        if self.config.default_voice:
            named.append(("--default-voice", self.config.default_voice))
        for flag, name in named:
            if name not in known:
                log.warning(
                    "%s %s: no such voice in %s (yet); voices: %s",
                    flag,
                    name,
                    self.config.models,
                    ", ".join(sorted(known)) or "none",
                )

    def _check_budget(self, loaded: bool = True) -> None:
        """A memory budget below what the daemon already uses could never load another voice:
        every request for one would be refused. A start-up error, not a daemon that answers
        "retry" forever. Checked before anything loads (the process alone), and again once the
        preloaded voices are up (``loaded``)."""
        budget, rss = self.config.memory_budget, resident_bytes()
        if budget is None or rss <= budget:
            return
        uses = (
            "with its preloaded voices ({})".format(", ".join(sorted(self.manager.demand.pinned())) or "none")
            if loaded
            else "before loading any voice"
        )
        self.manager.close()
        raise ConfigError(
            f"--memory-budget {budget / 2**20:.0f} MB is less than the {rss / 2**20:.0f} MB this "
            f"process uses {uses}: no other voice could load; give a larger budget or none"
        )

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_seconds
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_seconds / 2)

    async def _shutdown(
        self,
        runner: web.AppRunner,
        spool: Spool | None,
        spool_task: asyncio.Task[None] | None,
        watchdog: asyncio.Task[None] | None,
        wyoming: WyomingServer | None = None,
        metrics: web.AppRunner | None = None,
    ) -> int:
        cfg = self.config
        if self._interrupts:  # Ctrl-C at a terminal: a second one forces the exit
            log.info("shutting down: finishing in-flight requests (up to %.0f s; Ctrl-C again to force)", cfg.grace)
        else:  # SIGTERM (systemd, docker stop): no one to press anything
            log.info("SIGTERM: finishing in-flight requests (up to %.0f s), then exiting", cfg.grace)
        self.notifier.stopping("draining")
        if spool is not None:
            spool.stop()
        loop = asyncio.get_running_loop()
        # (aiohttp closes what still runs at the grace: a margin to answer and write 503s first)
        answer_by = loop.call_later(max(0.0, cfg.grace - min(1.0, cfg.grace / 4)), self._out_of_time.set)

        async def drain() -> bool:
            """Every front end stops accepting, then all wait for their requests at once, each up
            to the grace period (one after another, a stop took up to three times it). Whether
            the spool's requests ended in time."""
            ended = await asyncio.gather(
                runner.cleanup(),
                wyoming.drain(cfg.grace) if wyoming else asyncio.sleep(0),
                metrics.cleanup() if metrics else asyncio.sleep(0),
                asyncio.wait_for(spool.drain(), timeout=cfg.grace) if spool is not None else asyncio.sleep(0),
                return_exceptions=True,
            )
            timed_out = (TimeoutError, asyncio.TimeoutError)  # one class from Python 3.11, two on 3.10
            for outcome in ended:
                if isinstance(outcome, BaseException) and not isinstance(outcome, timed_out):
                    raise outcome
            return not isinstance(ended[3], timed_out)

        loop = asyncio.get_running_loop()
        # aiohttp waits the grace period for a request, then cancels it and waits again: the
        # stop's own limit, so a unit's TimeoutStopSec (45 s for a grace of 30) is never passed
        limit = loop.time() + cfg.grace + GRACE_SLACK
        drain_task = asyncio.ensure_future(drain())
        while not drain_task.done():
            forced = asyncio.ensure_future(self._signals.get())
            done, _ = await asyncio.wait(
                {drain_task, forced}, timeout=max(0.0, limit - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:  # the grace period is over
                forced.cancel()
                drain_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain_task
                break
            if forced in done:
                if forced.result() == signal.SIGINT and self._interrupts >= 1:
                    log.warning("second interrupt: exiting now")
                    self._unlink_socket()
                    # Not a return: the interpreter's exit would join the synthesis threads and
                    # wait for the running sentence (seconds). Spool requests stay in work/.
                    self.force_exit(EXIT_FORCED)
                    return EXIT_FORCED
                self._interrupts += forced.result() == signal.SIGINT
            else:
                forced.cancel()
        if not drain_task.cancelled() and not drain_task.result():
            log.warning("grace period over with spool requests still running; they resume after restart")
        # what still runs is given up (a spool request's, or one whose client stayed past the
        # grace): each stops after its current piece, so the exit, which joins the workers, is not
        # held by minutes of synthesis
        answer_by.cancel()
        if cut := self.pool.cancel_all():
            log.warning("grace period over: %d synthesis(es) stopped", cut)
        for task in (spool_task, watchdog):
            if task is not None:
                task.cancel()
        self.pool.shutdown(wait=False)
        self.manager.close()
        self._unlink_socket()
        log.info("stopped")
        return 0

    def _unlink_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()
