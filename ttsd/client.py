"""A small client for the daemon's HTTP API over its Unix socket (stdlib only, so ``ttsd say``
through a running daemon starts fast: no torch, no aiohttp)."""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import DaemonError, from_http


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (the daemon's default listener)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 120.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = os.fspath(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


SWAP_KEYS = ("voice", "from", "to", "seconds")  # a rollback's or an activate's answer


class Client:
    def __init__(self, socket_path: Path, timeout: float = 300.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def available(self) -> bool:
        """True when a daemon answers on the socket."""
        if not self.socket_path.exists():
            return False
        try:
            status, _, _ = self._request("GET", "/healthz", timeout=2.0)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def _request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = UnixHTTPConnection(self.socket_path, timeout or self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): _utf8(v) for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> tuple[dict[str, str], bytes]:
        """Send a request; map an error answer to ttsd's error types."""
        try:
            status, headers, data = self._request(method, path, body)
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonError(f"daemon at {self.socket_path} did not answer: {exc}") from exc
        if status < 400:
            return headers, data
        try:
            error = json.loads(data)["error"]
            code, message = error.get("code", ""), error.get("message", "")
        except (ValueError, KeyError, TypeError):
            code, message = "", data.decode(errors="replace")[:200]
        raise from_http(status, code, message, int(headers.get("retry-after", "1") or 1)) from None

    def control(self, voice: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/voices/VOICE/ACTION`` (rollback, activate, withdraw, remove): the voice's name is quoted into
        the path, so a name in any script (``tugão``) is sent as the daemon reads it."""
        _, data = self.call("POST", f"/v1/voices/{quote(voice, safe='')}/{action}", body)
        keys = {"withdraw": ("voice", "withdrawn", "active"), "remove": ("voice", "removed", "seconds")}
        return self._answer(data, *keys.get(action, SWAP_KEYS))

    def synthesize(self, body: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        """``POST /v1/synthesize``: (headers, audio). Checked before the caller writes anything:
        audio, with the length the daemon says it has."""
        headers, data = self.call("POST", "/v1/synthesize", body)
        try:
            seconds = float(headers.get("x-ttsd-audio-seconds", "nan"))
        except ValueError:
            seconds = math.nan
        if not headers.get("content-type", "").startswith("audio/") or not math.isfinite(seconds):
            raise self._foreign()
        return headers, data

    def status(self) -> dict[str, Any]:
        _, data = self.call("GET", "/v1/status")
        return self._answer(data, "version", "pid", "uptime", "queue", "requests", "voices", "models", "folders")

    def _answer(self, data: bytes, *keys: str) -> dict[str, Any]:
        """A JSON object with ``keys``: anything else is not the answer of a ttsd of this version."""
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or any(key not in answer for key in keys):
            raise self._foreign()
        return answer

    def _foreign(self) -> DaemonError:
        return DaemonError(
            f"the answer on {self.socket_path} is not ttsd's (another program on that socket, or a ttsd of "
            "another version?)"
        )


def _utf8(value: str) -> str:
    """A header's value as the daemon wrote it: UTF-8 (a voice name in any script), which
    http.client reads as Latin-1 ("tugÃ£o" for "tugão"); a value that is not UTF-8 stays as read."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value
