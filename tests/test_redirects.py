"""A mirror's redirects (ttsd.fetch.download): cross-host ones are followed (Hugging Face sends
downloads to its CDN), but a mirror on the internet may not send the box to its own or its LAN's
addresses (an attacker probe saw ``models get`` request a loopback service a catalog pointed it
at). The policy is a function of addresses, tested on them. The rest runs against real local
servers; a test has no internet, so where a mirror must count as one on the internet, the test
replaces ``download.mirror_addresses`` (the module's one, documented test seam: what the mirror's
own name resolves to) and nothing else of the download."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from catalog_server import Mirror, serve
from test_catalog import KEY, SMALL, catalog, fast, get, nothing_in_models, one_line_error, the_file

from ttsd.errors import CatalogError
from ttsd.fetch import download
from ttsd.fetch.download import is_internal, redirect_allowed

PUBLIC = ["93.184.215.14"]  # an internet address (documentation ranges count as internal)
REFUSED = "an address of this box's own network"


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.1", "::1", "10.0.0.5", "172.16.3.4", "192.168.1.10", "169.254.169.254", "fe80::1%eth0",
    "fd12::1", "0.0.0.0", "::", "100.64.0.1", "224.0.0.251", "ff02::1", "240.0.0.1", "255.255.255.255",
    "192.0.2.1", "2001:db8::1", "192.0.0.8", "fec0::1",
    "::ffff:127.0.0.1", "::ffff:192.168.0.1",  # IPv4-mapped
    "::7f00:1",  # IPv4-compatible (reserved)
    "2002:7f00:1::", "2002:c0a8:101::1",  # 6to4 of loopback, of a LAN address
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of loopback, of the metadata service
    "::ffff:0:a00:1",  # SIIT of 10.0.0.1
    "64:ff9b:1::1",  # NAT64's local-use prefix
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
])
def test_internal_addresses(address: str) -> None:
    assert is_internal(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_internet_addresses(address: str) -> None:
    """An IPv6 address carrying a public IPv4 one is public: a DNS64 network names the CDN so."""
    assert not is_internal(address)


def test_the_policy() -> None:
    assert redirect_allowed(["8.8.8.8"], PUBLIC)  # internet to internet: a CDN
    assert not redirect_allowed(["127.0.0.1"], PUBLIC)  # internet to this box
    assert not redirect_allowed(["8.8.8.8", "10.0.0.1"], PUBLIC)  # any internal address is enough
    assert not redirect_allowed(["169.254.169.254"], PUBLIC)  # a cloud's metadata service
    assert not redirect_allowed(["::1"], ["2606:4700::1111"])
    assert redirect_allowed(["127.0.0.1"], ["127.0.0.1"])  # a mirror on the box may send it elsewhere on it
    assert redirect_allowed(["192.168.1.9"], ["192.168.1.5"])  # a LAN mirror, within the LAN
    assert redirect_allowed(["10.1.1.1"], ["8.8.8.8", "10.0.0.2"])  # a mirror with a LAN address is on the LAN
    assert redirect_allowed([], PUBLIC)  # unresolvable: the connect fails on its own


@pytest.fixture
def mirrors() -> Iterator[tuple[Mirror, Mirror]]:
    """Two local servers: the mirror, and "an internal service" on another port of 127.0.0.1."""
    with serve() as mirror, serve() as inner:
        yield mirror, inner


@pytest.fixture
def public(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirror on 127.0.0.1 counts as one on the internet."""
    monkeypatch.setattr(download, "mirror_addresses", lambda host: PUBLIC)


@pytest.mark.slow
def test_get_from_a_public_mirror_never_requests_an_internal_address(
    mirrors: tuple[Mirror, Mirror], tmp_path: Path, public: None
) -> None:
    """The probe: the catalog is fine, the voice's .onnx redirects to a service on 127.0.0.1."""
    mirror, inner = mirrors
    file = the_file(mirror, catalog(mirror))
    inner.files[file.path] = SMALL.onnx
    mirror.redirects[file.path] = inner.url + file.path
    one_line_error(get(mirror.url, tmp_path, KEY), 15, REFUSED, f"127.0.0.1:{inner.port}")
    assert mirror.fetched(file.path) == [None] and inner.requests == []  # never asked
    nothing_in_models(tmp_path)


def test_a_mirror_on_the_box_may_redirect_within_it(mirrors: tuple[Mirror, Mirror], tmp_path: Path) -> None:
    """What models get does for a local mirror (its own address looked up): the redirect is
    followed, through the checked connection, and the file is whole."""
    mirror, inner = mirrors
    file = the_file(mirror, catalog(mirror))
    inner.files[file.path] = SMALL.onnx
    mirror.redirects[file.path] = inner.url + file.path
    download.download(fast(mirror), file, tmp_path / "v.onnx")
    assert (tmp_path / "v.onnx").read_bytes() == SMALL.onnx and inner.fetched(file.path) == [None]


def test_a_public_mirror_may_redirect_to_itself(mirrors: tuple[Mirror, Mirror], tmp_path: Path,
                                                public: None) -> None:
    """The mirror's own host and port are never refused, wherever its name resolves."""
    mirror, _ = mirrors
    file = the_file(mirror, catalog(mirror))
    mirror.files["elsewhere.onnx"] = SMALL.onnx
    mirror.redirects[file.path] = mirror.url + "elsewhere.onnx"
    download.download(fast(mirror), file, tmp_path / "v.onnx")
    assert (tmp_path / "v.onnx").read_bytes() == SMALL.onnx


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port on 127.0.0.1 that counts the connections made to it (none are accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(0.3)
        yield sock


def no_connection(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_name_that_resolves_elsewhere_the_second_time_gains_nothing(
    mirrors: tuple[Mirror, Mirror], listener: socket.socket, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """DNS rebinding: the redirect's name looked public when the redirect was checked, and is
    127.0.0.1 when the connection is made. Simulated by having every look-up of names
    (``download.addresses``, the mirror's included) answer an internet address; the connection
    resolves for real, is checked again on the addresses it goes to, and is never made."""
    mirror, _ = mirrors
    monkeypatch.setattr(download, "addresses", lambda host: PUBLIC)
    mirror.files["voices.json"] = b"{}"
    port = listener.getsockname()[1]
    mirror.redirects["voices.json"] = f"{scheme}://127.0.0.1:{port}/voices.json"
    with pytest.raises(CatalogError, match=REFUSED):
        download.fetch_small(fast(mirror), "voices.json", 1000)
    assert no_connection(listener)


class _Counting(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:  # noqa: N802  (the stdlib's name)
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "15")
        self.end_headers()
        self.wfile.write(b"internal secret")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """An HTTP proxy for every host but 127.0.0.1 (the mirror), as ``http_proxy`` and ``no_proxy``
    set it up; the URLs it was asked for (it answers every one itself)."""
    hits: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Proxy", (_Counting,), {"hits": hits}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield hits
    server.shutdown()
    server.server_close()


def test_through_a_proxy_the_redirect_s_name_is_checked(mirrors: tuple[Mirror, Mirror], proxy: list[str],
                                                       public: None) -> None:
    """A proxy resolves the name and connects, so the connection cannot be checked on its
    addresses: the redirect's name is checked before it is followed, and the proxy never asked."""
    mirror, _ = mirrors
    mirror.redirects["voices.json"] = "http://localhost:9/voices.json"
    with pytest.raises(CatalogError, match=f"localhost .*{REFUSED}"):
        download.fetch_small(fast(mirror), "voices.json", 1000)
    assert proxy == [] and mirror.fetched("voices.json") == [None]
