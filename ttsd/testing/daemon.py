"""One real ``ttsd serve`` in a subprocess, for tests, benchmarks and scripts.

The test suite and the daemon benches all do the same few things: start the daemon on their own
dirs, wait until it is ready, talk HTTP to it over its Unix socket, read its log, look at its
memory and stop it. :class:`Daemon` does them once, so that a fix (a readiness race, a hung stop)
reaches every caller, and the callers differ only in the options they pass.

It imports the standard library only (``prometheus_client`` lazily, for :meth:`Daemon.metric`):
the daemon under test is a separate process, and a test or bench importing this must stay as cheap
as the CLI, with no torch, transformers or aiohttp loaded on its side.
"""

from __future__ import annotations

import http.client
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .probes import Reply, WaitTimeout, request, rss_mb, wait_for


class HarnessError(RuntimeError):
    """The daemon exited, or never got ready: the message carries its log, the only evidence of why."""


# Run before the daemon's own command when CPUs or niceness are asked for: set them, then exec, so
# they hold from the daemon's first instruction (and for every thread it starts) without
# subprocess's preexec_fn, which is unsafe in a process with threads (a bench's load clients).
_PRELUDE = (
    "import os, sys\n"
    "cpus, nice = sys.argv[1], int(sys.argv[2])\n"
    "if cpus:\n"
    "    os.sched_setaffinity(0, {int(c) for c in cpus.split(',')})\n"
    "if nice:\n"
    "    os.nice(nice)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


class Daemon:
    """One ``ttsd serve`` in a subprocess, on its own models dir, state dir and socket.

    Everything a caller varies is an option, not a subclass: the serve arguments (``args``,
    ``workers``, ``threads``), where its dirs are, its environment (e.g. ``TTSD_CACHE`` or a
    ``PYTHONPATH`` with a fake engine), the command (``python -m ttsd`` by default: the checkout's
    interpreter, whatever ``ttsd`` is on ``PATH``), and which CPUs and niceness it runs at. With no
    ``root`` the harness makes a temp dir and :meth:`cleanup` removes it.

    Construction starts nothing, so a caller can fill the models dir first; :meth:`start` starts
    it (again, after a stop or kill, on the same dirs: a restart), each time with a log file of
    its own in ``root``. The process's stdout and stderr go to that file, which :meth:`logs` reads:
    a test asserts on it and a failed start shows it (in the :class:`HarnessError`, since a failed
    start kills the process and removes a root the harness made).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        *,
        models: str | os.PathLike[str] | None = None,
        state: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
        cache: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        threads: int | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        cpus: Iterable[int] | None = None,
        nice: int = 0,
        prefix: str = "ttsd-daemon-",
    ) -> None:
        """``env`` is added to this process's environment (read now); the result is ``self.env``, which a
        test reuses for the ``ttsd`` commands it runs against this daemon. ``cache`` is passed as
        ``--cache``; ``models``, ``state`` and ``socket`` default to ``root/models``, ``root/state``
        and ``root/ttsd.sock``."""
        self.owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix=prefix) if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.models = Path(models) if models is not None else self.root / "models"
        self.state = Path(state) if state is not None else self.root / "state"
        self.socket = Path(socket) if socket is not None else self.root / "ttsd.sock"
        self.cache = Path(cache) if cache is not None else None
        self.args = list(args)
        if workers is not None:
            self.args += ["--workers", str(workers)]
        if threads is not None:
            self.args += ["--threads", str(threads)]
        # unbuffered, so the log shows what the daemon did up to now (wait_for_log depends on it)
        self.env: dict[str, str] = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.command = list(command) if command is not None else [sys.executable, "-m", "ttsd"]
        self.cpus = sorted(set(cpus)) if cpus is not None else None
        self.nice = nice
        self.log: Path | None = None  # the current (last started) incarnation's log
        self.incarnation = 0
        self.started = math.nan  # time.monotonic() just before the last start's Popen
        self.ready_seconds = math.nan  # from that Popen until /readyz answered 200
        self._proc: subprocess.Popen[bytes] | None = None

    # --- the process ---------------------------------------------------------------------------

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs (without the CPU/nice prelude): to print or rerun."""
        argv = [*self.command, "serve", "--models", str(self.models), "--state", str(self.state)]
        argv += ["--socket", str(self.socket)]
        if self.cache is not None:
            argv += ["--cache", str(self.cache)]
        return [*argv, *self.args]

    def start(
        self, *, wait: bool = True, timeout: float = 120.0, interval: float = 0.2, probe_timeout: float = 5.0
    ) -> Daemon:
        """Start the process; with ``wait``, return once ``/readyz`` answers 200 (see :meth:`wait_ready`).

        Refuses while an earlier start is still running: two daemons on one socket is a test of its
        own (the second refuses to start), not something to do by accident.
        """
        if self.running:
            raise HarnessError(f"already running (pid {self.proc.pid})")
        self.incarnation += 1
        self.log = self._new_log()
        argv = self.argv()
        if self.cpus is not None or self.nice:
            cpus = ",".join(map(str, self.cpus or []))
            argv = [sys.executable, "-c", _PRELUDE, cpus, str(self.nice), *argv]
        self.ready_seconds = math.nan
        with open(self.log, "wb") as out:
            self.started = time.monotonic()
            self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            try:
                self.wait_ready(timeout, interval, probe_timeout)
            except BaseException:
                if self.owns_root:  # nothing left behind in /tmp: the error carries the log
                    self.cleanup()
                raise
        return self

    def _new_log(self) -> Path:
        """``daemon.log``, else ``daemon-2.log``, ...: one per start, none overwritten (a restart's
        test reads the first incarnation's log too), created exclusively so two harnesses sharing
        a root cannot pick the same one."""
        for n in range(1, 10_000):
            path = self.root / ("daemon.log" if n == 1 else f"daemon-{n}.log")
            try:
                with open(path, "xb"):
                    return path
            except FileExistsError:
                continue
        raise HarnessError(f"no free log file name in {self.root}")

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The current process (tests signal and wait on it directly)."""
        if self._proc is None:
            raise HarnessError("the daemon was not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ready(self, timeout: float = 5.0) -> bool:
        """Whether ``/readyz`` answers 200 now. Raises :class:`HarnessError` (with the log) if the
        process has exited: waiting on for a dead daemon would only turn its crash into a timeout."""
        code = self.proc.poll()
        if code is not None:
            raise HarnessError(f"daemon exited with {code}:\n{self.logs()}")
        try:
            return request(self.socket, "GET", "/readyz", timeout=timeout).status == 200
        except (OSError, http.client.HTTPException):  # not listening yet, or mid-start
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.2, probe_timeout: float = 5.0) -> float:
        """Poll ``/readyz`` every ``interval`` s (each probe allowed ``probe_timeout`` s: a busy box
        answers slowly, which is not "not ready"); the seconds from the start, also kept in
        ``ready_seconds``. On a timeout (or Ctrl-C) the process is killed, not left behind."""
        try:
            wait_for(self.ready, timeout, "/readyz", interval)
        except WaitTimeout:
            self.kill()
            raise HarnessError(f"daemon not ready after {timeout:g} s:\n{self.logs()}") from None
        except BaseException:
            self.kill()
            raise
        self.ready_seconds = time.monotonic() - self.started
        return self.ready_seconds

    def send_signal(self, sig: int) -> None:
        """Signal the daemon if it still runs (SIGHUP: rescan, SIGINT/SIGTERM: stop)."""
        if self.running:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 60.0, *, raise_on_timeout: bool = True) -> int:
        """Send ``sig`` and wait up to ``grace`` seconds: the exit code (0 is a clean stop).

        A daemon still running after the grace period is killed either way; then
        ``subprocess.TimeoutExpired`` is raised (a test must fail on a hung stop), or with
        ``raise_on_timeout=False`` the kill's code is returned (a bench reports it and goes on).
        """
        self.send_signal(sig)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(30)
            if raise_on_timeout:
                raise
            return code

    def kill(self) -> int | None:
        """SIGKILL, as a crash or an OOM kill would: the exit code, None if never started."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.kill()
        return self._proc.wait(30)

    def cleanup(self) -> None:
        """Kill the daemon if it still runs; remove ``root`` if the harness made it."""
        self.kill()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The daemon process's ``VmRSS`` (or ``VmHWM``, its peak) in MB: see :func:`rss_mb`."""
        return rss_mb(self.pid, field)

    # --- talking to it -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> Reply:
        """One request over the daemon's Unix socket: see :func:`request`."""
        return request(self.socket, method, path, body, raw, headers, timeout)

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the ``/metrics`` samples called ``name`` whose labels include ``labels``
        (e.g. ``ttsd_model_transitions_total``, event="unloaded": over every voice); 0.0 when no
        such series exists (yet). A counter to compare before and after, not a stopwatch."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics").body.decode()
        return sum(
            float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    # --- its log -------------------------------------------------------------------------------

    def logs(self, since: int = 0) -> str:
        """The current incarnation's log from byte ``since`` (a :meth:`log_mark`) on; "" before a
        start, or once :meth:`cleanup` removed it (a failed start's error message carries it)."""
        if self.log is None:
            return ""
        try:
            with open(self.log, "rb") as handle:
                handle.seek(since)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            if self.owns_root and not self.root.exists():
                return ""
            raise

    def log_mark(self) -> int:
        """Where the log ends now: what a later ``wait_for_log(..., since=mark)`` looks after, so an
        earlier line with the same text does not count."""
        return self.log.stat().st_size if self.log is not None else 0

    def wait_for_log(self, text: str, since: int = 0, timeout: float = 60.0, interval: float = 0.1) -> float:
        """Wait until ``text`` is in the log after ``since``: evidence that the daemon got that far,
        for steps no route shows. The seconds that took."""
        return wait_for(lambda: text in self.logs(since), timeout, f"{text!r} in the daemon log", interval)
