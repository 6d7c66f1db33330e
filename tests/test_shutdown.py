"""A stop (SIGTERM, as systemd sends it) ends within ``--grace`` and a few seconds, whatever is in
flight: the HTTP listener, Wyoming and the spool drain at once, and what still runs after the grace
is stopped after its current sentence. A probe of the example unit stopped in 75 s with the default
grace of 30 (the HTTP listener waited twice the grace, then the spool once more, then the exit
waited for the spool's synthesis), past the unit's TimeoutStopSec of 45."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from daemon_util import fake_daemon_model, fake_site, start_daemon, wait_for

from ttsd.daemon import GRACE_SLACK

SENTENCES = ". ".join(f"Sentence {i}" for i in range(60))  # 60 units of 0.5 s: 30 s of synthesis


@pytest.mark.daemon
def test_a_stop_with_long_requests_in_flight_ends_within_the_grace(tmp_path: Path, cache_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    models, spool = tmp_path / "models", tmp_path / "spool"
    fake_daemon_model(models / "fake-1", "1", delay=0.5, sentences=True)
    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--grace", "2", "--workers", "1", "--max-chars", "5000",
                     "--spool", str(spool))
    answers: list[int] = []

    def ask() -> None:
        try:
            answers.append(d.post("/v1/synthesize", {"text": SENTENCES}, timeout=60).status)
        except OSError:
            answers.append(0)

    clients = [threading.Thread(target=ask, daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    (spool / "incoming" / "long.txt").write_text(SENTENCES)
    wait_for(lambda: d.metric("ttsd_requests_in_flight") == 1 and (spool / "work" / "long.txt").exists(),
             timeout=30, interval=0.1, what="a request running and the spool's claimed")
    started = time.monotonic()
    code = d.stop(signal.SIGTERM, grace=60)
    took = time.monotonic() - started
    assert code == 0, d.logs()
    assert took < 2 + GRACE_SLACK + 2, f"the stop took {took:.1f} s with --grace 2"
    assert (spool / "work" / "long.txt").exists(), "the spool's request waits in work/ for the restart"
    for client in clients:
        client.join(10)
    # each whole-file request still being spoken gets an answer to retry, not a connection closed
    # with none ("Empty reply from server")
    assert answers == [503, 503], answers
    assert "Traceback" not in d.logs()


@pytest.mark.daemon
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_during_start_up_exits_at_once(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                              sig: int, code: int) -> None:
    """The voice takes 30 s to load. SIGTERM (systemctl stop) or Ctrl-C during the load exits at
    once, with one line: both waited for the whole start-up (and a SIGTERM then served first)."""
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    fake_daemon_model(tmp_path / "models" / "fake-1", "1", load_delay=30)
    d = start_daemon(tmp_path, cache_dir, "--no-seed", wait_ready=False)
    wait_for(lambda: "box id" in d.logs(), timeout=30, interval=0.1, what="the start-up under way")
    time.sleep(1.0)  # into the load
    started = time.monotonic()
    assert d.stop(sig, grace=20) == code, d.logs()
    assert time.monotonic() - started < 5, d.logs()
    assert "during start-up: exiting now" in d.logs() and "Traceback" not in d.logs()


@pytest.mark.daemon
def test_a_daemon_with_no_voice_yet_tells_systemd_it_is_up(tmp_path: Path, cache_dir: Path) -> None:
    """A fleet box before its first get has no voice: READY=1 never came, so systemd killed the
    daemon at TimeoutStartSec and started it again, every 5 minutes. It is up and waiting: READY=1
    with a status that says so, and /readyz 503 until a voice serves."""
    import os
    import socket

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    os.environ["NOTIFY_SOCKET"] = str(notify)
    try:
        d = start_daemon(tmp_path, cache_dir, "--no-seed", wait_ready=False)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        said = ""
        while "READY=1" not in said:
            said = listener.recv(4096).decode()
        assert "STATUS=no voice yet: waiting for one in" in said, said
        assert d.get("/readyz").status == 503
    finally:
        listener.close()
        assert d.stop() == 0, d.logs()
