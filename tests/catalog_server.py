"""A voice mirror for tests: ``http.server`` in a thread on 127.0.0.1, serving files from memory
under a prefix, with ``Range: bytes=N-``, and told to misbehave: cut a connection after N bytes,
answer a path with a status, redirect it. It records every request (path and Range header)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

PREFIX = "piper/"  # the mirror lives below the server's root, as on Hugging Face


@dataclass
class Mirror:
    files: dict[str, bytes] = field(default_factory=dict)  # path below the prefix -> body
    cuts: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes sent before each cut, in turn
    statuses: dict[str, int] = field(default_factory=dict)  # path -> status to answer instead
    no_length: set[str] = field(default_factory=set)  # paths sent without Content-Length, until close
    glitches: dict[str, int] = field(default_factory=dict)  # path -> ranged requests answered 416 wrongly
    bare_416: set[str] = field(default_factory=set)  # paths whose 416 says no length (no Content-Range)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> URL of a 302 answer
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{PREFIX}"

    def fetched(self, path: str) -> list[str | None]:
        """The Range header of every request for ``path`` (None: from the start)."""
        return [rng for p, rng in self.requests if p == path]

    def publish(self, voices: dict[str, Any]) -> None:
        self.files["voices.json"] = json.dumps(voices).encode()


class _Handler(BaseHTTPRequestHandler):
    mirror: Mirror

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        self.mirror.requests.append((path.removeprefix(f"/{PREFIX}"), rng))
        if not path.startswith(f"/{PREFIX}"):
            self.send_error(404)
            return
        rel = path.removeprefix(f"/{PREFIX}")
        if rel in self.mirror.redirects:
            self.send_response(302)
            self.send_header("Location", self.mirror.redirects[rel])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rel in self.mirror.statuses:
            self.send_error(self.mirror.statuses[rel])
            return
        body = self.mirror.files.get(rel)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng is not None:
            match = re.fullmatch(r"bytes=(\d+)-", rng)
            assert match, rng
            start = int(match.group(1))
            if self.mirror.glitches.get(rel, 0) > 0:  # a CDN's 416 with its error page's length
                self.mirror.glitches[rel] -= 1
                self._refuse_range(177)
                return
            if start >= len(body):
                if rel in self.mirror.bare_416:
                    self.send_error(416)
                else:
                    self._refuse_range(len(body))  # as nginx, Apache and S3 answer: the length there is
                return
        self.send_response(206 if start else 200)
        if rel not in self.mirror.no_length:
            self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cuts = self.mirror.cuts.get(rel)
        if cuts:
            self.wfile.write(body[start:start + cuts.pop(0)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees the connection break
            self.close_connection = True
            return
        self.wfile.write(body[start:])


    def _refuse_range(self, length: int) -> None:
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{length}")
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a file it refused: expected here, not worth a traceback


@contextmanager
def serve() -> Iterator[Mirror]:
    mirror = Mirror()
    handler = type("Handler", (_Handler,), {"mirror": mirror})
    server = _Server(("127.0.0.1", 0), handler)
    mirror.port = server.server_address[1]
    # a short poll: shutdown() waits for the loop's next look at its flag (0.5 s by default, per test)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass(frozen=True)
class VoiceFiles:
    """The bytes of one Piper voice: what the built-in voice's package holds."""

    onnx: bytes
    config: bytes
    card: bytes

    @classmethod
    def builtin(cls) -> VoiceFiles:
        from ttsd.voices import builtin_voice_files

        onnx = builtin_voice_files()
        return cls(onnx.read_bytes(), Path(f"{onnx}.json").read_bytes(), (onnx.parent / "MODEL_CARD").read_bytes())


def add_voice(mirror: Mirror, voices: dict[str, Any], key: str, files: VoiceFiles, *,
              language: tuple[str, str, str] = ("en_US", "English", "United States"),
              quality: str = "medium") -> dict[str, Any]:
    """Put ``files`` on the mirror under catalog paths for ``key`` and its entry in ``voices``
    (returned, to be spoiled by a test); ``publish`` writes the catalog."""
    code, name_english, country = language
    base = f"{code.split('_')[0]}/{code}/{key.split('-')[1]}/{quality}"
    paths = {f"{base}/{key}.onnx": files.onnx, f"{base}/{key}.onnx.json": files.config,
             f"{base}/MODEL_CARD": files.card}
    mirror.files.update(paths)
    entry = {
        "key": key, "name": key.split("-")[1], "quality": quality, "num_speakers": 1, "speaker_id_map": {},
        "language": {"code": code, "family": code.split("_")[0], "region": code.split("_")[-1],
                     "name_native": name_english, "name_english": name_english, "country_english": country},
        "files": {path: {"size_bytes": len(body), "md5_digest": md5(body)} for path, body in paths.items()},
        "aliases": [],
    }
    voices[key] = entry
    return entry


def serve_dir(mirror: Mirror, root: Path) -> None:
    """What a web server over ``root`` would serve (the test server holds files in memory)."""
    mirror.files.clear()
    for path in root.rglob("*"):
        if path.is_file():
            mirror.files[path.relative_to(root).as_posix()] = path.read_bytes()
