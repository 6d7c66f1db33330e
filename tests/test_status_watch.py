"""``ttsd status --watch``: the status redrawn until Ctrl-C, against a real daemon."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import plausible, save_tiny_vits
from daemon_util import Daemon, start_daemon

TITLE = "ttsd "  # each frame's title starts so: "ttsd 0.x pid N, up S s, queue ..."


def _tiny_daemon(root: Path, cache_dir: Path, per_test: bool) -> Daemon:
    models = root / "models"
    save_tiny_vits(models / "tiny-1", edit=plausible, noise_scale_duration=0.0)
    return start_daemon(root, cache_dir, "--workers", "1", "--threads", "1", "--no-seed", models=models,
                        per_test=per_test)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Daemon]:
    """One daemon for the tests that only watch it (each start is seconds of torch's import)."""
    d = _tiny_daemon(tmp_path_factory.mktemp("watched"), cache_dir, per_test=False)
    yield d
    d.stop()


@pytest.fixture
def own_daemon(tmp_path: Path, cache_dir: Path) -> Daemon:
    """A daemon of the test's own, which it stops."""
    return _tiny_daemon(tmp_path, cache_dir, per_test=True)


def watcher(daemon: Daemon, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    """``ttsd status --watch`` with Ctrl-C's default action, as on a terminal: a test run started in
    the background (``cmd &``) ignores SIGINT, every child inherits that, and Python then leaves
    it ignored, so the Ctrl-C tests would wait for nothing."""
    env = dict(daemon.env, TTSD_SOCKET=str(daemon.socket), COLUMNS="160")
    return subprocess.Popen([sys.executable, "-m", "ttsd", "status", "--watch", "--interval", "0.2", *args],
                            env=env, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kw)  # type: ignore[call-overload]


def read_until(fd: int, done: object, timeout: float = 30) -> str:
    """Read ``fd`` until ``done(text)`` or the time is up; the text read."""
    text, deadline = b"", time.monotonic() + timeout
    while not done(text.decode(errors="replace")) and time.monotonic() < deadline:  # type: ignore[operator]
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty whose other end closed
                break
            if not chunk:
                break
            text += chunk
    return text.decode(errors="replace")


@pytest.mark.daemon
def test_the_view_of_a_real_status(daemon: Daemon) -> None:
    """The table drawn from a live daemon's /v1/status: voice, versions with states, queue, uptime."""
    from rich.console import Console

    from ttsd.cli.control import status_view

    assert daemon.post("/v1/synthesize", {"text": "hello there"}).status == 200
    out = Console(file=io.StringIO(), width=160)
    out.print(status_view(daemon.request("GET", "/v1/status").json(), caption="every 1 s"))
    text = " ".join(out.file.getvalue().split())  # type: ignore[attr-defined]  # the title wraps to the table
    assert "tiny (default)" in text and "1 active" in text, text
    assert "queue 0 waiting / 0 running, 1 done, 0 failed" in text and ", up " in text and "every 1 s" in text


@pytest.mark.daemon
def test_watch_into_a_pipe_prints_frames_until_ctrl_c(daemon: Daemon) -> None:
    """1. Watch into a pipe: a frame every 0.2 s, one after the other. 2. A request shows up in a
    later frame. 3. Ctrl-C ends it with 0 and no traceback."""
    proc = watcher(daemon, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    text = read_until(proc.stdout.fileno(), lambda t: t.count(TITLE) >= 2)
    assert text.count(TITLE) >= 2 and "tiny (default)" in text and "Ctrl-C to stop" in text, text
    # the title wraps to the table's width, so where its words break moves as the uptime grows
    done = int(re.findall(r"(\d+) done", " ".join(text.split()))[-1])  # other tests' requests on this daemon
    assert daemon.post("/v1/synthesize", {"text": "hello there"}).status == 200
    text = read_until(proc.stdout.fileno(), lambda t: f"{done + 1} done" in " ".join(t.split()))
    assert f"{done + 1} done" in " ".join(text.split()), text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read().decode()


@pytest.mark.daemon
def test_watch_ends_quietly_when_the_reader_of_its_pipe_goes_away(daemon: Daemon) -> None:
    """``ttsd status -w | head``: once the reader has what it wanted and leaves, the watch ends as
    Ctrl-C ends it, 0 and nothing on stderr (rich's own handler exited 1, saying nothing)."""
    proc = watcher(daemon, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    text = read_until(proc.stdout.fileno(), lambda t: TITLE in t)
    assert TITLE in text, text
    proc.stdout.close()  # head has its line
    assert proc.wait(30) == 0
    assert proc.stderr is not None and proc.stderr.read().decode() == ""


@pytest.mark.daemon
def test_watch_on_a_terminal_redraws_in_place_until_ctrl_c(daemon: Daemon) -> None:
    """On a terminal (a pty) rich's Live view redraws the table in place: cursor moves, not a log."""
    main, sub = pty.openpty()
    try:
        proc = watcher(daemon, stdout=sub)
        os.close(sub)
        text = read_until(main, lambda t: t.count(TITLE) >= 3)
        assert text.count(TITLE) >= 3 and "tiny (default)" in text, text
        assert "\x1b[" in text  # redrawn with cursor movements: rich's Live, not printed frames
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read().decode()
    finally:
        os.close(main)


@pytest.mark.daemon
def test_watch_ends_with_one_line_when_the_daemon_goes_away(own_daemon: Daemon, tmp_path: Path,
                                                           cli_env: dict[str, str]) -> None:
    """1. Watching, the daemon stops: exit 9 and one line saying so. 2. With no daemon at all it
    does not start: 9 too."""
    proc = watcher(own_daemon, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), lambda t: TITLE in t)
    assert own_daemon.stop() == 0
    assert proc.wait(30) == 9
    assert proc.stderr is not None
    lines = proc.stderr.read().decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did not answer" in lines[0], lines
    gone = subprocess.run([sys.executable, "-m", "ttsd", "status", "-w", "--socket", str(tmp_path / "none.sock")],
                          env=cli_env, capture_output=True, timeout=60, check=False)
    assert gone.returncode == 9 and "no daemon answers" in gone.stderr.decode()


def test_watch_options() -> None:
    from ttsd.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["status", "--watch", "--interval", "0"]).exit_code == 2
    result = runner.invoke(main, ["status", "--watch", "--json"])
    assert result.exit_code == 2 and "do not go together" in result.output
