"""Mirrors that answer in ways the per-read timeout does not bound: the head of an answer sent a
byte at a time (every read within the timeout, the whole never ending), and a Content-Length of
non-ASCII digits. A timer's run must end, with its one line and exit code, not hang for good (the
example ``ttsd-get@`` unit is a oneshot with no start timeout, and the timer never starts a run
while one is going) or end as "a bug"."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from test_catalog import invoke, one_line_error


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A server on loopback that reads a request, then ``answer``s it; its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                answer(conn)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/voices/"
    finally:
        stop.set()
        listener.close()


def test_a_mirror_that_drips_its_headers_is_given_up_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 200:
            conn.sendall(bytes([byte]))
            time.sleep(0.3)

    with raw_server(drip) as url:
        started = time.monotonic()
        result = invoke("models", "search", "--mirror", url, "--timeout", "1")
        took = time.monotonic() - started
    one_line_error(result, 14, " 4 s")  # "no answer within 4 s", or the body not read after them
    assert took < 15, f"search took {took:.0f} s against a 1 s timeout"


def test_a_content_length_of_other_digits_is_no_crash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def superscript(conn: socket.socket) -> None:
        conn.sendall("HTTP/1.1 200 OK\r\nContent-Length: ²\r\nConnection: close\r\n\r\n{}".encode("latin-1"))

    with raw_server(superscript) as url:
        result = invoke("models", "search", "--mirror", url, "--timeout", "2")
    assert result.exit_code not in (0, 1) and "internal error" not in result.output, result.output


def test_a_body_cut_short_of_its_content_length_is_not_taken_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """http.client ends a body that stops short of its Content-Length without a word: a cut index
    or catalog was taken as the whole (and, cached with its validators, kept by every later 304).
    It is a broken connection: exit 14, try again."""
    def short(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}")

    with raw_server(short) as url:
        result = invoke("models", "search", "--mirror", url, "--timeout", "2")
    one_line_error(result, 14, "broke off after 2 of 100 bytes")


def test_the_stale_build_clean_up_leaves_other_voices_builds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``get joe`` removed ``.joe-kids-3.abcd1234.partial``, another voice's build in progress,
    without holding that voice's lock (two timers breaking each other's assembly)."""
    from ttsd.fetch.get import _remove_stale_builds

    for name in (".joe-2.abcd1234.partial", ".joe-kids-3.abcd1234.partial", ".joe-kids.abcd1234.partial"):
        (tmp_path / name).mkdir()
    _remove_stale_builds(tmp_path, "joe")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".joe-kids-3.abcd1234.partial", ".joe-kids.abcd1234.partial"]
