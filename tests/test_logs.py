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
