"""Start ``ttsd serve`` in a subprocess and talk to it over its socket, as a user would."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttsd.manifest import pack


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    root: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120.0) -> Reply:
        conn = UnixHTTPConnection(self.socket, timeout)
        try:
            payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=payload, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def post(self, path: str, body: Any, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def logs(self, since: int = 0) -> str:
        """The daemon's log, from byte ``since`` (a ``log_mark``) on."""
        with open(self.log, "rb") as handle:
            handle.seek(since)
            return handle.read().decode(errors="replace")

    def log_mark(self) -> int:
        """Where the log ends now: what a later ``wait_for_log(..., since=mark)`` looks after."""
        return self.log.stat().st_size

    def wait_for_log(self, text: str, since: int = 0, timeout: float = 60) -> None:
        """Wait until ``text`` is in the log after ``since``: evidence that the daemon got that far."""
        wait_for(lambda: text in self.logs(since), timeout=timeout, what=f"{text!r} in the daemon log")

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (e.g. ``ttsd_model_transitions_total``, voice=..., event=...),
        0.0 when that series does not exist (yet): a counter, not a stopwatch."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics").body.decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


STARTED: list[Daemon] = []  # every daemon a test started; conftest kills leftovers after each test


def kill_leftovers() -> None:
    while STARTED:
        daemon = STARTED.pop()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


def start_daemon(root: Path, cache: Path, *args: str, models: Path | None = None,
                 wait_ready: bool = True, timeout: float = 120, per_test: bool = True) -> Daemon:
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "ttsd.sock"
    env = dict(os.environ, TTSD_CACHE=str(cache), PYTHONUNBUFFERED="1")
    log = root / f"daemon-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "ttsd", "serve", "--models", str(models or root / "models"),
           "--state", str(root / "state"), "--socket", str(sock), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(proc, sock, root, log, env)
    if per_test:  # a module-scoped fixture's daemon is stopped by the fixture instead
        STARTED.append(daemon)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{daemon.logs()}")
            try:
                if daemon.request("GET", "/readyz", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"daemon not ready after {timeout} s:\n{daemon.logs()}")
            time.sleep(0.2)
    return daemon


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


TESTS = Path(__file__).parent


def fake_site(tmp_path: Path) -> str:
    """A PYTHONPATH under which a daemon subprocess finds the fake engine (``fake_engine.py``)."""
    site = tmp_path / "site"
    info = site / "ttsd_fake-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ttsd-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ttsd.engines]\nfake = fake_engine:FakeEngine\n")
    # keep what the run was given (e.g. the checkout under test) instead of relying on the cwd
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(site), str(TESTS), *inherited])


def fake_daemon_model(folder: Path, version: str, blob_mb: int = 0, **settings: object) -> Path:
    """Version ``version`` of voice ``fake`` in ``folder``, told ``settings`` (see ``fake_engine``)."""
    folder.mkdir(parents=True)
    (folder / "fake.json").write_text(json.dumps(settings))
    if blob_mb:  # something big enough that checking and storing it takes a moment
        with open(folder / "weights.bin.safetensors", "wb") as handle:
            handle.write(os.urandom(1 << 20) * blob_mb)
    pack(folder, name="fake", version=version, engine="fake", sample_rate=8000)
    return folder
