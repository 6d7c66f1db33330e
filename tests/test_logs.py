"""Where the daemon's log goes decides its form (ttsd.logs): journald gets syslog priorities and no
time, a file gets ISO times; the access log is off unless asked for. In-process, on real files
(a daemon writing to a file: tests/test_lifecycle.py)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from ttsd import logs


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[IO[str]]:
    """A file to log to, as the daemon's stderr would be; the root logger put back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(logs.ACCESS).setLevel(logging.NOTSET)


def _emit(stream: IO[str]) -> list[str]:
    log = logging.getLogger("ttsd.test")
    log.info("loaded")
    log.warning("refused v2: signature")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    logging.getLogger(logs.ACCESS).info("peer \"GET / HTTP/1.1\" 200")
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journald_lines_carry_their_priority_and_no_time(stderr_file: IO[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(stderr_file.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    logs.configure("info", stream=stderr_file)
    lines = _emit(stderr_file)
    assert lines[0] == "<6>INFO ttsd.test: loaded"
    assert lines[1] == "<4>WARNING ttsd.test: refused v2: signature"
    assert lines[2] == "<3>ERROR ttsd.test: failed"
    assert all(line.startswith("<3>") for line in lines[3:]), lines  # the traceback keeps its priority
    assert not any("ttsd.access" in line for line in lines)  # off by default


def test_another_stream_is_not_taken_for_the_journal(stderr_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A JOURNAL_STREAM inherited by a process whose stderr was redirected (to this file) names
    another stream: plain lines with times, no priorities."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    logs.configure("info", access_log=True, stream=stderr_file)
    lines = _emit(stderr_file)
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"
    assert re.fullmatch(stamp + r" INFO ttsd\.test: loaded", lines[0]), lines[0]
    assert re.fullmatch(stamp + r" WARNING ttsd\.test: refused v2: signature", lines[1]), lines[1]
    assert re.fullmatch(stamp + r' INFO ttsd\.access: peer "GET / HTTP/1\.1" 200', lines[-1]), lines[-1]


@pytest.mark.parametrize("journal", [True, False])
def test_a_name_with_line_breaks_or_escapes_cannot_forge_a_line(stderr_file: IO[str], journal: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder named with a line break and a fake record (a fleet mirror names the folders an
    rsync drops in) wrote a second, forged line, in the journal with its own priority; a terminal
    escape went to the reader's terminal. Each record is one line now, with those escaped; a
    traceback still follows on lines of its own."""
    st = os.fstat(stderr_file.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else "1:2")
    logs.configure("info", stream=stderr_file)
    forged = "x\n<3>ERROR ttsd.manager: joe: 2 -> 1 (rolled back by an operator)\x1b]0;PWNED\x07"
    log = logging.getLogger("ttsd.test")
    log.warning("refused %s: %s", f"/models/{forged}", "no ttsd.json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("checking %s failed", "/models/ok")
    stderr_file.flush()
    stderr_file.seek(0)
    lines = stderr_file.read().splitlines()
    assert "x\\n<3>ERROR ttsd.manager" in lines[0] and "\\x1b]0;PWNED\\x07" in lines[0], lines
    assert not any(line.lstrip("<34>").startswith("ERROR ttsd.manager") for line in lines)
    assert "Traceback" in "\n".join(lines[2:])
    assert all("\x1b" not in line for line in lines)


def test_the_line_that_stops_the_daemon_carries_the_error_priority(tmp_path: Path) -> None:
    """Under systemd the one line saying why ``ttsd serve`` did not start was filed as info
    (``journalctl -p err`` showed nothing): it carries ``<3>`` now, and no markup."""
    import subprocess
    import sys

    out = tmp_path / "journal"
    with open(out, "w") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        code = subprocess.run(
            [sys.executable, "-m", "ttsd", "serve", "--models", str(tmp_path / "m"), "--state", str(tmp_path / "s"),
             "--socket", str(tmp_path / "t.sock"), "--no-seed", "--socket-group", "no-such-group-here"],
            stderr=stream, stdout=subprocess.DEVNULL, env=env, timeout=120).returncode
    assert code == 3
    lines = [line for line in out.read_text().splitlines() if "no such group" in line]
    assert lines == ["<3>error: --socket-group no-such-group-here: no such group"], out.read_text()
