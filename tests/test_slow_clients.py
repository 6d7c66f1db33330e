"""No HTTP client can hold the daemon hostage by not reading its answer: with every connection slot
taken by clients that asked for long speech (whole or streamed) and read nothing, the daemon cuts
them off after --write-timeout, frees their slots and stops their synthesis. A real daemon: the
kernel's socket buffers and aiohttp's flow control are the behaviour under test."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from conftest import plausible, save_tiny_vits
from daemon_util import start_daemon, wait_for

TEXT = ("A long sentence that takes a while to say out loud, read again and again. " * 60)[:4990]


def _ask_and_never_read(path: Path, body: dict[str, object]) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up fast
    client.connect(str(path))
    data = json.dumps(body).encode()
    client.sendall(b"POST /v1/synthesize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return client


@pytest.mark.daemon
def test_clients_that_never_read_are_cut_off_and_free_their_slots(tmp_path: Path, cache_dir: Path) -> None:
    models = tmp_path / "models"
    save_tiny_vits(models / "tiny-1", edit=plausible, noise_scale_duration=0.0)
    daemon = start_daemon(tmp_path, cache_dir, "--no-seed", "--workers", "2", "--threads", "1",
                          "--max-connections", "2", "--write-timeout", "2", "--max-chars", "5000", models=models)
    try:
        hogs = [_ask_and_never_read(daemon.socket, {"text": TEXT}),
                _ask_and_never_read(daemon.socket, {"text": TEXT, "stream": True})]
        started = time.monotonic()
        wait_for(lambda: daemon.logs().count("left its answer unread") >= 2, timeout=120, interval=0.2,
                 what="both clients cut off")
        cut_after = time.monotonic() - started
        assert daemon.get("/healthz").status == 200  # a slot is free again
        for hog in hogs:  # each was aborted: reading now ends without the whole answer
            hog.settimeout(10)
            received = b""
            try:
                while chunk := hog.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            hog.close()
            assert len(received) < 4_000_000  # not the whole minutes of audio the text makes
        # the streamed request's synthesis stopped: no worker is still busy with it
        wait_for(lambda: daemon.metric("ttsd_requests_in_flight") == 0, timeout=30, what="no synthesis left")
        print(f"cut off after {cut_after:.1f} s")
    finally:
        assert daemon.stop() == 0, daemon.logs()
