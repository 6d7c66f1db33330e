"""HTTP(S) from the voice mirror: a bounded fetch of a small document, and a resumable download
checked against the catalog's size and digest (Piper's md5, or the sha256 of a ttsd manifest).

urllib does the HTTP (framing, chunked bodies, TLS and its certificate check, proxies from the
environment); what is ttsd's own is the policy around it:

* every request has a timeout for the connect and for each read (``Mirror.timeout``);
* a redirect may only go to http(s), never from https down to http, and never into this box's
  or its network's own addresses (loopback, link-local, private, unique-local, shared, unspecified,
  multicast, reserved) unless the mirror itself is there: a catalog on the internet must not make
  the box send requests to its LAN's services (``redirect_allowed``). The check is made on the
  redirect's host name, and again on the very addresses a connection to a host other than the
  mirror's is made to (``_Guard``), so a name that resolves elsewhere the second time (DNS
  rebinding) gains nothing;
* nothing is read past its bound: a document past its limit, a file past its catalog size is cut
  off and refused, and a ``Content-Length`` over the bound is refused before a byte is read;
* a download goes into ``.NAME.MD5.part`` in a private folder (never the models dir), and goes
  on from there with ``Range: bytes=N-`` after a cut connection, within one run (up to
  ``Mirror.attempts`` connections) and across runs; its digest is checked once it is whole, and only
  then is it renamed to NAME.

A small document may be asked for conditionally (``fetch_small_conditional``): with the
``ETag`` and ``Last-Modified`` the server gave last time (``Validators``, each only a plain printable
value of sane length), so an unchanged one costs a 304 and no body. A 304 answers only a request
that asked for it; to any other it is the mirror's error.

Errors: ``NetworkError`` when the mirror cannot be reached or keeps cutting off (the partial file
is kept), ``CatalogError`` when it answers but not with the file (404, a bad redirect),
``ChecksumError`` when the bytes are not what the catalog says (the partial file is deleted).
Called from the CLI's thread only; blocks on the network for at most ``timeout`` per read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import ipaddress
import os
import re
import shutil
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .. import __version__
from ..errors import CatalogError, ChecksumError, ConfigError, NetworkError, NotOnMirror, ResourceError
from .index import CatalogFile, check_remote_path

DEFAULT_MIRROR = "https://huggingface.co/rhasspy/piper-voices/resolve/main/"
_CHUNK = 1 << 16
SMALL_DEADLINE = 4  # a small document must arrive within this many read timeouts
_HEADERS = {"User-Agent": f"ttsd/{__version__}", "Accept-Encoding": "identity"}

Progress = Callable[[int], None]  # bytes of the file on disk so far


@dataclass(frozen=True)
class Mirror:
    """Where the catalog and the voices' files are: ``base`` + a catalog path is a file's URL."""

    base: str
    timeout: float = 30.0  # seconds, for the connect and for each read
    attempts: int = 5  # connections per file in one run, each going on where the last stopped
    backoff: float = 0.5  # seconds before the second connection; grows linearly

    @classmethod
    def parse(cls, url: str | None, timeout: float = 30.0) -> Mirror:
        """The mirror at ``url`` (default: the public Piper voices), checked: http(s), a host,
        no credentials, query or fragment (``ConfigError`` otherwise)."""
        url = url or DEFAULT_MIRROR
        if not url.isprintable() or any(c.isspace() for c in url):  # urlsplit drops tabs and newlines
            raise ConfigError(f"mirror {url!r}: a URL has no spaces or control characters")
        try:
            parts = urlsplit(url)
            host = parts.hostname
            _ = parts.port  # raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ConfigError(f"mirror {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise ConfigError(f"mirror {url!r}: must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(f"mirror {url!r}: must not carry credentials, a query or a fragment")
        return cls(url if url.endswith("/") else f"{url}/", timeout)

    def url(self, rel: str) -> str:
        """The URL of catalog path ``rel`` (checked again here: nothing leaves the mirror)."""
        return self.base + quote(check_remote_path(rel), safe="/")

    @property
    def host(self) -> str:
        return urlsplit(self.base).netloc


# networks that embed an IPv4 address in their last 32 bits (NAT64's well-known prefix, SIIT's
# translated addresses): such an address reaches the IPv4 one, and is judged as that one is
_EMBEDDING = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96"))
# not for the internet, though the ipaddress module of some Pythons calls them global
_ALSO_INTERNAL = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "64:ff9b:1::/48", "fec0::/10"))


def _internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or any(ip in net for net in _ALSO_INTERNAL)
    )


def is_internal(address: str) -> bool:
    """Whether an IP address is this box's or its network's own rather than the internet's:
    loopback, private (RFC 1918, unique-local fc00::/7), shared (100.64/10), link-local (a cloud's
    metadata service), site-local, unspecified, multicast, reserved, documentation; an IPv6
    address that carries an IPv4 one (mapped, 6to4, NAT64, SIIT) is judged by that one too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index is no part of the address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _internal(ip.ipv4_mapped)
        if any(ip in net for net in _EMBEDDING):  # a DNS64 network's name for an IPv4 address
            return _internal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and _internal(ip.sixtofour):
            return True
    return _internal(ip)


def addresses(host: str) -> list[str]:
    """Every address ``host`` resolves to (an IP literal: itself); [] when it does not resolve."""
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError):
        return []


def mirror_addresses(host: str) -> list[str]:
    """The configured mirror's own addresses, which decide where its redirects may go.

    The one test seam of this module: tests/test_redirects.py replaces it to have a mirror on
    127.0.0.1 judged as one on the internet would be (a test has no internet). Nothing else does."""
    return addresses(host)


def redirect_allowed(target: list[str], mirror: list[str]) -> bool:
    """A redirect to a host with addresses ``target`` from a mirror with ``mirror``: refused when
    any target address is internal (``is_internal``) and no mirror address is. So a mirror whose
    host has an internal address (127.0.0.1, a LAN server) may send the box anywhere, and one with
    only internet addresses only to the internet. Cross-host redirects stay (Hugging Face sends
    downloads to its CDN)."""
    if not target:
        return True  # it does not resolve: the connect fails on its own
    return not any(is_internal(a) for a in target) or any(is_internal(a) for a in mirror)


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


class _Guard:
    """Where one mirror's requests may go. The mirror itself (its host and port, as configured)
    anywhere its name resolves: the admin chose it. Any other host, which only a redirect brings,
    when ``redirect_allowed``: checked by name when the redirect comes (``_Redirects``), and again
    when the connection is made, on the addresses it is made to (``connect``): the name is resolved
    once there, every address checked, and the socket connected to those very addresses, so a DNS
    server that answers differently the second time (rebinding) gains nothing. Through a proxy
    (``https_proxy``, ``http_proxy``) the proxy resolves the name and connects: only the check by
    name applies there."""

    def __init__(self, mirror: Mirror) -> None:
        self.origin = _origin(mirror.base)
        self.addresses = mirror_addresses(self.origin[0])
        self.sockets: list[socket.socket] = []  # every connection made, for ``cut``
        self.cut_off = False

    def cut(self) -> None:
        """End every connection (a deadline passed; from a timer's thread): a read waiting on one
        returns at once."""
        self.cut_off = True
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _kept(self, make: Callable[..., socket.socket]) -> Callable[..., socket.socket]:
        def connect(*args: Any, **kwargs: Any) -> socket.socket:
            sock = make(*args, **kwargs)
            self.sockets.append(sock)
            if self.cut_off:
                self.cut()
            return sock

        return connect

    def refusal(self, url: str, host: str, found: list[str]) -> str | None:
        """Why a request for ``url`` may not go to ``found`` (the addresses of its ``host``), or None."""
        if _origin(url) == self.origin or redirect_allowed(found, self.addresses):
            return None
        inside = ", ".join(a for a in found if is_internal(a))
        return (
            f"{url}: a redirect to {host} ({inside}), an address of this box's own network, from a mirror "
            "that is not on it; refused"
        )

    def connection(self, http_class: Any, request: urllib.request.Request) -> Any:
        """``http_class``, or a maker of its connections that go through ``connect``."""
        proxied = request.has_proxy() or getattr(request, "_tunnel_host", None)
        url = request.full_url
        checked = not proxied and _origin(url) != self.origin

        def make(host: str, **kwargs: Any) -> Any:
            connection = http_class(host, **kwargs)
            # http.client's own hook for opening the socket (socket.create_connection's signature)
            opener = functools.partial(self.connect, url) if checked else socket.create_connection
            connection._create_connection = self._kept(opener)
            plain_connect = connection.connect

            def connect() -> None:  # https wraps the socket in TLS, detaching the one kept above
                plain_connect()
                if connection.sock is not None:
                    self.sockets.append(connection.sock)
                    if self.cut_off:
                        self.cut()

            connection.connect = connect
            return connection

        return make

    def connect(
        self, url: str, address: tuple[str, int], timeout: Any = None, source_address: Any = None, *_: Any
    ) -> socket.socket:
        host, port = address[0], address[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:
            raise OSError(f"{host}: {exc}") from None
        why = self.refusal(url, host, sorted({str(info[4][0]) for info in infos}))
        if why is not None:
            raise CatalogError(why)
        error: OSError | None = None
        for family, kind, proto, _name, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"{host}: no address")


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, but only to http(s), never from https down to http, and never into
    internal addresses from a mirror that is not itself internal (``_Guard``)."""

    max_redirections = 5

    def __init__(self, guard: _Guard) -> None:
        super().__init__()
        self.guard = guard

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        old, new = urlsplit(req.full_url).scheme, urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise CatalogError(f"{req.full_url}: redirected to a {new or 'relative'}: URL, refused")
        host = urlsplit(newurl).hostname or ""
        why = self.guard.refusal(newurl, host, addresses(host))
        if why is not None:
            raise CatalogError(why)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _GuardedConnections(urllib.request.AbstractHTTPHandler):
    """An http(s) handler whose connections to hosts other than the mirror go through ``_Guard``."""

    def __init__(self, guard: _Guard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def do_open(self, http_class: Any, req: urllib.request.Request, **http_conn_args: Any) -> Any:
        return super().do_open(self.guard.connection(http_class, req), req, **http_conn_args)


class _HTTP(_GuardedConnections, urllib.request.HTTPHandler):
    pass


class _HTTPS(_GuardedConnections, urllib.request.HTTPSHandler):
    pass


class _RangeRefused(Exception):
    """HTTP 416 to ``Range: bytes=N-``: the mirror's file has no byte N (it ends before), and its
    length when the answer says (``Content-Range: bytes */LENGTH``)."""

    def __init__(self, length: int | None) -> None:
        super().__init__(length)
        self.length = length


class _NotModified(Exception):
    """HTTP 304 to a conditional request: the document is the one the validators name."""


_CONDITIONAL = ("If-None-Match", "If-Modified-Since")


ROOM_MARGIN = 16 << 20  # free space kept beyond what a get's files need


def ensure_room(parts: dict[Path, int], what: str) -> None:
    """Refuse (``ResourceError``, exit 12) before anything is downloaded when a disk has no room
    for its part: ``parts`` maps a dir to the bytes it will take (the downloads in the cache dir,
    the folder in the models dir); dirs on one filesystem add up."""
    by_disk: dict[int, tuple[Path, int]] = {}
    for where, size in parts.items():
        device = os.stat(where).st_dev
        first, total = by_disk.get(device, (where, 0))
        by_disk[device] = (first, total + max(0, size))
    for where, size in by_disk.values():
        free = shutil.disk_usage(where).free
        if free < size + ROOM_MARGIN:
            raise ResourceError(
                f"{where}: {free >> 20} MiB free, {what} needs {(size + ROOM_MARGIN) >> 20} MiB", storage=True
            )


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def _open(mirror: Mirror, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    """The response to GET ``url``, or the error that says whose problem it is."""
    guard = _Guard(mirror)
    opener = urllib.request.build_opener(_Redirects(guard), _HTTP(guard), _HTTPS(guard))
    request = urllib.request.Request(url, headers={**_HEADERS, **headers})
    # the timeout bounds each read; this bounds the whole answer's head (a mirror that sends its
    # headers a byte at a time held a timer's run, and the voice's withdrawals, for good)
    limit = SMALL_DEADLINE * mirror.timeout
    timer = threading.Timer(limit, guard.cut)
    timer.daemon = True
    timer.start()
    try:
        return opener.open(request, timeout=mirror.timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:
            match = re.fullmatch(r"\s*bytes\s+\*/(\d{1,19})\s*", exc.headers.get("Content-Range") or "")
            raise _RangeRefused(int(match.group(1)) if match else None) from None
        if exc.code == 304:  # urllib's redirect handler leaves 304 alone: it arrives here
            if any(name in headers for name in _CONDITIONAL):
                raise _NotModified() from None
            raise CatalogError(f"{url}: HTTP 304 Not Modified to a request that was not conditional; refused") from None
        if exc.code in (404, 410):
            raise NotOnMirror(f"{url}: not on the mirror (HTTP {exc.code})") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise NetworkError(f"{mirror.host} answered HTTP {exc.code} for {url}; try again later") from None
        raise CatalogError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if guard.cut_off:
            raise NetworkError(f"{url}: no answer within {limit:.0f} s; try again later") from None
        raise NetworkError(
            f"cannot reach {mirror.host}: {_why(exc)} (no network? another mirror can be "
            "given with --mirror or TTSD_MIRROR)"
        ) from None
    finally:
        timer.cancel()


# a validator is sent back as a header: one line of printable ASCII, and short
_VALIDATOR = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?")


def _validator(value: object) -> str | None:
    return value if isinstance(value, str) and _VALIDATOR.fullmatch(value) else None


@dataclass(frozen=True)
class Validators:
    """What identifies the version of a document the server sent: its ``ETag`` and its
    ``Last-Modified``, each None when absent or not a plain printable value of at most 256
    characters (never sent back then)."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, etag: object, last_modified: object) -> Validators:
        """The validators among ``etag`` and ``last_modified`` (header values, or a cache's)."""
        return cls(_validator(etag), _validator(last_modified))

    def __bool__(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def headers(self) -> dict[str, str]:
        """The request headers that ask for the document only if it changed since."""
        headers = {}
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        if self.last_modified is not None:  # what plain static servers (Python's among them) compare
            headers["If-Modified-Since"] = self.last_modified
        return headers


def _strong_date(modified: str | None, date: str | None) -> bool:
    """Whether ``Last-Modified`` can tell versions apart (RFC 9110 8.8.2.2): it is at least a
    second older than the answer's ``Date``. A file written twice within one second has one date,
    so a document changed again in the second it was fetched would be answered 304 for ever."""
    from email.utils import parsedate_to_datetime

    if modified is None or date is None:
        return False
    try:
        return (parsedate_to_datetime(date) - parsedate_to_datetime(modified)).total_seconds() >= 1
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


def _fetch_small(mirror: Mirror, url: str, limit: int, headers: dict[str, str]) -> tuple[bytes, Validators]:
    """The body of ``url`` (see ``fetch_small``) and its validators (none unless a 200 gave them);
    ``_NotModified`` for a 304 to conditional ``headers``."""
    deadline = time.monotonic() + SMALL_DEADLINE * mirror.timeout
    with _open(mirror, url, headers) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise CatalogError(f"{url}: {int(length)} bytes, more than the {limit} allowed; refused")
        validators = Validators()
        if response.status == 200:
            modified = response.headers.get("Last-Modified")
            if not _strong_date(modified, response.headers.get("Date")):
                modified = None  # a second later the file may change again under the same date
            validators = Validators.of(response.headers.get("ETag"), modified)
        body = bytearray()
        while len(body) <= limit:
            if time.monotonic() > deadline:
                raise NetworkError(f"{url}: still not read after {SMALL_DEADLINE * mirror.timeout:.0f} s; try again")
            try:
                chunk = response.read1(min(_CHUNK, limit + 1 - len(body)))
            except (http.client.HTTPException, OSError) as exc:
                raise NetworkError(f"{url}: the connection broke off ({_why(exc)}); try again") from None
            if not chunk:
                break
            body += chunk
    if len(body) > limit:
        raise CatalogError(f"{url}: more than the {limit} bytes allowed; refused")
    if length is not None and length.isascii() and length.isdigit() and len(body) < int(length):
        # (http.client ends a short body without a word) taken whole, a cut index could be kept
        # with its validators, and every later 304 would keep it
        raise NetworkError(f"{url}: the connection broke off after {len(body)} of {int(length)} bytes; try again")
    return bytes(body), validators


def fetch_small(mirror: Mirror, rel: str, limit: int) -> bytes:
    """The body of ``rel`` on the mirror, refused (``CatalogError``) past ``limit`` bytes, and
    given up (``NetworkError``) past ``SMALL_DEADLINE`` timeouts in all: a mirror sending a byte
    now and then cannot hold a ``search`` forever."""
    return _fetch_small(mirror, mirror.url(rel), limit, {})[0]


def fetch_small_conditional(mirror: Mirror, rel: str, limit: int, known: Validators) -> tuple[bytes | None, Validators]:
    """``fetch_small`` asked only if ``rel`` changed since the version ``known`` names: (None,
    ``known``) when the mirror answers 304 Not Modified, else the body and the validators it came
    with. With no ``known`` validators the request is a plain one, and a 304 to it a
    ``CatalogError``. Same bounds, deadline, redirect policy and errors as ``fetch_small``."""
    try:
        return _fetch_small(mirror, mirror.url(rel), limit, known.headers())
    except _NotModified:
        return None, known


def file_digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, file: CatalogFile) -> tuple[bool, str]:
    """Whether ``path`` has ``file``'s digest, and the digest it has."""
    algorithm, expected = file.digest
    actual = file_digest(path, algorithm)
    return actual == expected, actual


def partial_path(dest: Path, file: CatalogFile) -> Path:
    """Where the download of ``file`` to ``dest`` collects: named for its digest, so a catalog
    that changed the file meanwhile never continues the old bytes."""
    return dest.with_name(f".{dest.name}.{file.digest[1]}.part")


def present_bytes(dest: Path, file: CatalogFile) -> int:
    """Bytes of ``file`` already on disk for ``dest`` (whole, or partial)."""
    if dest.is_file() and dest.stat().st_size == file.size:
        return file.size
    part = partial_path(dest, file)
    return min(part.stat().st_size, file.size) if part.is_file() else 0


def download(mirror: Mirror, file: CatalogFile, dest: Path, progress: Progress = lambda _: None) -> None:
    """Make ``dest`` the catalog's ``file``: a complete copy already there is checked and kept,
    else the download starts or goes on from the partial file beside it."""
    if dest.is_dir() and not dest.is_symlink():  # an older download's folder where a file goes now
        shutil.rmtree(dest)
    elif dest.is_symlink() or (os.path.lexists(dest) and not dest.is_file()):  # never followed
        dest.unlink()
    if dest.is_file():
        if dest.stat().st_size == file.size and _matches(dest, file)[0]:
            progress(file.size)
            return
        dest.unlink()
    part = partial_path(dest, file)
    stale = re.compile(rf"\.{re.escape(dest.name)}\.([0-9a-f]{{32}}|[0-9a-f]{{64}})\.part")
    for other in dest.parent.iterdir():  # another digest's bytes: that file changed in the catalog
        if other != part and stale.fullmatch(other.name):
            other.unlink()
    url = mirror.url(file.path)
    if file.size == 0:  # nothing to fetch: an empty file, which must still have the listed digest
        os.close(
            os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        )
    refusals = 0  # 416s to a Range: the mirror's file ended before the bytes kept
    for attempt in range(1, mirror.attempts + 1):
        done = part.stat().st_size if part.exists() else 0
        if done > file.size:
            part.unlink()
            done = 0
        if done < file.size:
            try:
                done = _fetch_into(mirror, url, file, part, done, progress)
            except _RangeRefused as refused:
                part.unlink(missing_ok=True)
                # the mirror has no byte ``done``: a short file (sent without a Content-Length, it
                # looked like a connection cut off, again and again), or a glitch (a CDN has answered
                # a good range 416 with its error page's length). Once: start over; twice: short
                refusals += 1
                if refusals < 2 or refused.length == file.size:
                    continue
                if refused.length is not None:
                    raise _mismatch(url, part, refused.length, file.size) from None
                raise ChecksumError(
                    f"{url}: the mirror's file ends before byte {done}, twice, the catalog says {file.size} "
                    "bytes; refused"
                ) from None
            if done < file.size:
                if attempt == mirror.attempts:
                    raise NetworkError(
                        f"{url}: the connection broke off {attempt} times ({done} of {file.size} bytes kept); "
                        "run the same command again to go on from there"
                    )
                time.sleep(mirror.backoff * attempt)
                continue
        ok, actual = _matches(part, file)
        if not ok:
            part.unlink()
            algorithm, expected = file.digest
            raise ChecksumError(
                f"{url}: {algorithm} {actual} differs from the catalog's {expected}; the download was thrown away"
            )
        os.replace(part, dest)
        return
    raise NetworkError(f"{url}: the mirror refused to continue the download {mirror.attempts} times")


def _content_range(value: str | None) -> tuple[int, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        raise CatalogError(f"partial answer with a malformed Content-Range {value!r}")
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _mismatch(url: str, part: Path, size: int, expected: int) -> ChecksumError:
    part.unlink(missing_ok=True)
    if size > expected:
        return ChecksumError(f"{url}: larger than the catalog's {expected} bytes (cut off at {size}); refused")
    return ChecksumError(f"{url}: {size} bytes, the catalog says {expected}; refused")


def _fetch_into(mirror: Mirror, url: str, file: CatalogFile, part: Path, done: int, progress: Progress) -> int:
    """One connection: append what the mirror sends after byte ``done`` to ``part``; returns the
    bytes on disk afterwards (fewer than ``file.size`` when the connection broke off)."""
    with _open(mirror, url, {"Range": f"bytes={done}-"} if done else {}) as response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != done:
                raise CatalogError(f"{url}: asked for bytes from {done}, the mirror sent from {start}")
            if total is not None and total != file.size:
                raise _mismatch(url, part, total, file.size)
        elif response.status == 200:
            done = 0  # the mirror ignored the range: start over
        else:
            raise CatalogError(f"{url}: unexpected HTTP {response.status}")
        length = response.headers.get("Content-Length")
        sent = int(length) if length is not None and length.isascii() and length.isdigit() else None
        if sent is not None and (done + sent > file.size or (response.status == 200 and sent < file.size)):
            raise _mismatch(url, part, done + sent, file.size)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(part, flags | (os.O_APPEND if done else os.O_TRUNC), 0o600)
        with os.fdopen(fd, "wb") as out:
            if not stat.S_ISREG(os.fstat(out.fileno()).st_mode):
                raise ConfigError(f"{part}: not a regular file")
            progress(done)
            while True:
                try:  # at most one byte past the catalog's size: enough to know it is too large
                    chunk = response.read(min(_CHUNK, file.size - done + 1))
                except (http.client.HTTPException, OSError):
                    break  # cut off or timed out: the caller connects again and goes on
                if not chunk:
                    break
                if done + len(chunk) > file.size:
                    out.close()
                    raise _mismatch(url, part, done + len(chunk), file.size)
                out.write(chunk)
                done += len(chunk)
                progress(done)
            out.flush()
            os.fsync(out.fileno())
    return done
