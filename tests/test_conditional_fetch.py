"""Cheap polling of a fleet mirror's small index (ttsd.fetch.small_cache, issue 30, item 5): the
box keeps the last body and its validators, asks with ``If-None-Match`` / ``If-Modified-Since``,
and an unchanged mirror costs one request answered 304 and no disk write. Real HTTP servers on
127.0.0.1: Python's own static one (Last-Modified only), one with ETags, one that answers 304 to
anything; each records the conditional headers of every request. The kept file is hostile input:
a corrupt, forged, linked, oversized or foreign one is never trusted."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ttsd.errors import CatalogError
from ttsd.fetch import download
from ttsd.fetch.download import Mirror
from ttsd.fetch.small_cache import fetch_small_cached, kept_path

INDEX = "ttsd-index.json"
LIMIT = 4096
V1 = b'{"format": 1, "voices": {"joe": {"version": "1"}}}'
V2 = b'{"format": 1, "voices": {"joe": {"version": "2"}}}'


@dataclass
class Log:
    """Every request a server saw: (path, If-None-Match, If-Modified-Since, status answered)."""

    seen: list[tuple[str, str | None, str | None, int]] = field(default_factory=list)

    def conditional(self) -> list[bool]:
        return [inm is not None or ims is not None for _, inm, ims, _ in self.seen]

    def statuses(self) -> list[int]:
        return [status for *_, status in self.seen]


class _Recording(BaseHTTPRequestHandler):
    log: Log

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:  # called once per answer
        self.log.seen.append(
            (self.path, self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since"), int(code))
        )


class _Static(_Recording, SimpleHTTPRequestHandler):
    """Python's static file server, as a fleet might run it: Last-Modified, no ETag."""


@dataclass
class Document:
    body: bytes
    etag: str


class _Tagged(_Recording):
    """A server with ETags that honours If-None-Match (as nginx and buckets do)."""

    doc: Document

    def do_GET(self) -> None:
        if self.headers.get("If-None-Match") == self.doc.etag:
            self.send_response(304)
            self.send_header("ETag", self.doc.etag)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", self.doc.etag)
        self.send_header("Content-Length", str(len(self.doc.body)))
        self.end_headers()
        self.wfile.write(self.doc.body)


class _AlwaysNotModified(_Recording):
    """A broken server (or cache in between) that answers 304 to anything; ``before`` runs first."""

    before: Callable[[], None] = staticmethod(lambda: None)

    def do_GET(self) -> None:
        self.before()
        self.send_response(304)
        self.end_headers()


class _Redirect(_Recording):
    target: str

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def running(handler: Any) -> Iterator[Mirror]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Mirror.parse(f"http://127.0.0.1:{server.server_address[1]}/", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def static(root: Path, log: Log) -> Any:
    return partial(type("Static", (_Static,), {"log": log}), directory=str(root))


def tagged(doc: Document, log: Log) -> Any:
    return type("Tagged", (_Tagged,), {"log": log, "doc": doc})


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each entry's (inode, size, mtime) and the folder's own: what any write would change."""
    entries = {p.name: os.lstat(p) for p in folder.iterdir()}
    shot = {name: (st.st_ino, st.st_size, st.st_mtime_ns) for name, st in entries.items()}
    st = os.stat(folder)
    shot["."] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return shot


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir(mode=0o700)
    return folder


def test_python_static_server_answers_304_and_the_box_writes_nothing(tmp_path: Path, downloads: Path) -> None:
    """1. A box polls Python's http.server (Last-Modified only): a plain GET, answered 200; the body
       and its Last-Modified are kept in one private file (0600).
    2. It polls again, unchanged: If-Modified-Since is sent, the server answers 304, the body
       comes back equal, changed is False, and the downloads folder is as it was (no write at all).
    3. The index changes (a later mtime): 200, the new body, changed; the kept copy is replaced."""
    root = tmp_path / "mirror"
    root.mkdir()
    index = root / INDEX
    index.write_bytes(V1)
    then = time.time() - 100
    os.utime(index, (then, then))
    log = Log()
    with running(static(root, log)) as mirror:
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, True)  # 1
        assert log.conditional() == [False] and log.statuses() == [200]
        [kept] = list(downloads.iterdir())
        assert kept == kept_path(downloads, mirror.url(INDEX))
        assert os.stat(kept).st_mode & 0o777 == 0o600
        before = snapshot(downloads)

        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, False)  # 2
        assert log.statuses() == [200, 304]
        _, inm, ims, _ = log.seen[1]
        assert inm is None and ims is not None  # Python's server compares only If-Modified-Since
        assert snapshot(downloads) == before

        index.write_bytes(V2)  # 3
        os.utime(index, (then + 50, then + 50))
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V2, True)
        assert log.statuses() == [200, 304, 200] and log.conditional() == [False, True, True]
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V2, False)
        assert log.statuses()[-1] == 304
        assert [p.name for p in downloads.iterdir()] == [kept.name]


def test_etag_server_answers_if_none_match_with_304(downloads: Path) -> None:
    """1. A server with ETags: the first poll is plain, the second sends If-None-Match and gets 304.
    2. The document changes (a new ETag): 200 and the new body; the next poll sends the new ETag.
    3. The ETag changes but not the bytes (a re-upload): 200, changed is False, and the kept
       file is rewritten once, with the new ETag, so the next poll is a 304 again."""
    doc, log = Document(V1, '"v1"'), Log()
    with running(tagged(doc, log)) as mirror:
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, True)  # 1
        before = snapshot(downloads)
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, False)
        assert log.seen[1][1:] == ('"v1"', None, 304)
        assert snapshot(downloads) == before

        doc.body, doc.etag = V2, 'W/"v2"'  # 2
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V2, True)
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V2, False)
        assert log.seen[-1][1:] == ('W/"v2"', None, 304)

        doc.etag = '"v2-again"'  # 3
        before = snapshot(downloads)
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V2, False)
        assert log.statuses()[-1] == 200 and snapshot(downloads) != before
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V2, False)
        assert log.seen[-1][1:] == ('"v2-again"', None, 304)


def forge(path: Path, url: str, body: bytes, etag: object, **changes: Any) -> None:
    """A kept file as the code writes one, with ``changes`` to its JSON line."""
    meta = {"format": 1, "url": url, "etag": etag, "last_modified": None, "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(), **changes}
    path.write_bytes(json.dumps(meta).encode() + b"\n" + body)
    os.chmod(path, 0o600)


def _tampered_body(path: Path, url: str) -> None:  # the body edited, the digest left as it was
    path.write_bytes(path.read_bytes().replace(b'"1"', b'"9"'))


def _symlink(path: Path, url: str) -> None:  # a link to a well-formed copy elsewhere
    elsewhere = path.parent.parent / "elsewhere"
    forge(elsewhere, url, b"FORGED", '"v1"')
    path.unlink()
    path.symlink_to(elsewhere)


def _fifo(path: Path, url: str) -> None:  # opening it must not wait for a writer
    path.unlink()
    os.mkfifo(path)


HOSTILE: dict[str, Callable[[Path, str], None]] = {
    "garbage": lambda path, url: path.write_bytes(b"\x00\xff not a kept file"),
    "no newline": lambda path, url: path.write_bytes(b'{"format": 1}'),
    "tampered body": _tampered_body,
    "forged, another mirror's": lambda path, url: forge(path, "http://other.example/" + INDEX, b"FORGED", '"v1"'),
    "forged, bad digest": lambda path, url: forge(path, url, b"FORGED", '"v1"', sha256="0" * 64),
    "forged, wrong size": lambda path, url: forge(path, url, b"FORGED", '"v1"', size=99),
    "forged, other format": lambda path, url: forge(path, url, b"FORGED", '"v1"', format=2),
    "forged, header injection": lambda path, url: forge(path, url, b"FORGED", '"v1"\r\nX-Evil: 1'),
    "forged, long etag": lambda path, url: forge(path, url, b"FORGED", '"' + "v" * 300 + '"'),
    "forged, etag not a string": lambda path, url: forge(path, url, b"FORGED", ["v1"]),
    "forged, no validators": lambda path, url: forge(path, url, b"FORGED", None),
    "oversized body": lambda path, url: forge(path, url, b"F" * (LIMIT + 1), '"v1"'),
    "oversized file": lambda path, url: forge(path, url, b"F" * (LIMIT + 10_000), '"v1"'),
    "writable by others": lambda path, url: (forge(path, url, b"FORGED", '"v1"'), os.chmod(path, 0o666)),
    "symlink": _symlink,
    "fifo": _fifo,
    "a directory": lambda path, url: (path.unlink(), path.mkdir()),
}


@pytest.mark.parametrize("spoil", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_kept_file_that_cannot_be_trusted_means_a_plain_get(
    tmp_path: Path, downloads: Path, spoil: Callable[[Path, str], None]
) -> None:
    """1. A first poll keeps the index (ETag "v1").
    2. The kept file is spoiled: garbage, edited, forged (with the server's very ETag, so a
       trusted forgery would be answered 304 and its body returned), linked, oversized, foreign.
    3. The next poll sends no conditional header, gets 200 and returns the mirror's body; a link's
       target is never written through."""
    doc, log = Document(V1, '"v1"'), Log()
    with running(tagged(doc, log)) as mirror:
        url = mirror.url(INDEX)
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, True)  # 1
        spoil(kept_path(downloads, url), url)  # 2
        elsewhere = tmp_path / "elsewhere"
        linked = elsewhere.read_bytes() if elsewhere.exists() else None
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, True)  # 3
        assert log.conditional() == [False, False] and log.statuses() == [200, 200]
        if linked is not None:
            assert elsewhere.read_bytes() == linked
        if kept_path(downloads, url).is_dir():
            return  # nothing can be kept there; every poll is a plain one
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, False)  # kept again, properly
        assert log.statuses()[-1] == 304


def test_a_304_to_a_plain_request_is_an_error_not_nothing(downloads: Path) -> None:
    """A server that answers 304 although the box kept nothing (deleted, never fetched) and so
    asked for nothing conditional: a ``CatalogError`` that says so, after one plain request (no
    retry: a plain request is what was just refused). "Nothing new" is never taken from it, and
    nothing is written."""
    log = Log()
    handler = type("NotModified", (_AlwaysNotModified,), {"log": log})
    with running(handler) as mirror, pytest.raises(CatalogError, match="304 Not Modified to a request that was not"):
        fetch_small_cached(mirror, INDEX, LIMIT, downloads)
    assert log.conditional() == [False] and list(downloads.iterdir()) == []


def test_a_304_while_the_kept_file_is_deleted_returns_the_body_read_before(downloads: Path) -> None:
    """The kept copy is read (and checked) before the request, and only its validators are sent:
    a 304 that arrives after the file was deleted returns those very bytes, and writes nothing
    back; the next poll, with nothing kept, is a plain one."""
    log, kept = Log(), list[Path]()
    delete = staticmethod(lambda: kept[0].unlink(missing_ok=True))  # as the request arrives
    handler = type("NotModified", (_AlwaysNotModified,), {"log": log, "before": delete})
    with running(handler) as mirror:
        kept.append(kept_path(downloads, mirror.url(INDEX)))
        forge(kept[0], mirror.url(INDEX), V1, '"v1"')  # as a 200 with ETag "v1" would have left it
        assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, False)
        assert log.seen[-1][1:] == ('"v1"', None, 304)
        assert list(downloads.iterdir()) == []
        with pytest.raises(CatalogError, match="not conditional"):
            fetch_small_cached(mirror, INDEX, LIMIT, downloads)
        assert log.conditional()[-1] is False


def test_validators_follow_a_redirect_and_the_redirect_policy_still_holds(
    downloads: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. A local mirror redirects the index to another local server: the conditional headers go
       along, and the 304 comes from there.
    2. A mirror judged as one on the internet (the module's test seam) redirecting into the box's
       own addresses is refused as before, conditional or not."""
    doc, log, hops = Document(V1, '"v1"'), Log(), Log()
    with running(tagged(doc, log)) as target:
        redirect = type("Redirect", (_Redirect,), {"log": hops, "target": target.url(INDEX)})
        with running(redirect) as mirror:
            assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, True)  # 1
            assert fetch_small_cached(mirror, INDEX, LIMIT, downloads) == (V1, False)
            assert hops.statuses() == [302, 302] and hops.conditional() == [False, True]
            assert log.statuses() == [200, 304] and log.seen[1][1] == '"v1"'

            monkeypatch.setattr(download, "mirror_addresses", lambda host: ["93.184.215.14"])  # 2
            with pytest.raises(CatalogError, match="an address of this box's own network"):
                fetch_small_cached(mirror, INDEX, LIMIT, downloads)
            assert log.statuses() == [200, 304]


def test_a_copy_that_cannot_be_kept_still_returns_the_body(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The downloads folder cannot be made (a file stands where its parent should be): the body
    comes back all the same, and a warning says the next poll will not be cheap."""
    (tmp_path / "file").write_text("")
    doc, log = Document(V1, '"v1"'), Log()
    with running(tagged(doc, log)) as mirror:
        assert fetch_small_cached(mirror, INDEX, LIMIT, tmp_path / "file" / "downloads") == (V1, True)
    assert "cannot keep" in caplog.text
