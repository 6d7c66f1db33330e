"""What the daemon benches (``busy.py``, ``hotswap.py``, ``serve.py``, ``voices.py``) share: one HTTP
request to a daemon's Unix socket on a fresh connection, as a client that connects per request does,
and polling until something holds."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any


def request(sock: str, method: str, path: str, body: Any = None, timeout: float = 120.0
            ) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh Unix-socket connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    try:
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # preset: connect() is skipped
        conn.sock.settimeout(timeout)
        conn.sock.connect(sock)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_for(ok: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll ``ok()`` every ``poll`` seconds until it holds; that monotonic time. ``RuntimeError``
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic()
