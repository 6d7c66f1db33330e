"""A mirror's redirects (ttsd.fetch.download): cross-host ones are followed (Hugging Face sends
downloads to its CDN), but a mirror on the internet may not send the box to its own or its LAN's
addresses (an attacker probe saw ``models get`` request a loopback service a catalog pointed it
at). The policy is a function of addresses, tested on them; the handler is tested end to end with
two real local servers, the mirror's addresses given to it as a public mirror's would be."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ttsd.errors import CatalogError
from ttsd.fetch import download
from ttsd.fetch.download import is_internal, redirect_allowed

PUBLIC = ["93.184.215.14"]  # an internet address (documentation ranges count as internal)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.1", "::1", "10.0.0.5", "172.16.3.4", "192.168.1.10",
                                     "169.254.169.254", "fe80::1%eth0", "fd12::1", "0.0.0.0", "::", "100.64.0.1",
                                     "224.0.0.251", "::ffff:127.0.0.1", "::ffff:192.168.0.1", "240.0.0.1"])
def test_internal_addresses(address: str) -> None:
    assert is_internal(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_internet_addresses(address: str) -> None:
    assert not is_internal(address)


def test_the_policy() -> None:
    assert redirect_allowed(["8.8.8.8"], PUBLIC)  # internet to internet: a CDN
    assert not redirect_allowed(["127.0.0.1"], PUBLIC)  # internet to this box
    assert not redirect_allowed(["8.8.8.8", "10.0.0.1"], PUBLIC)  # any internal address is enough
    assert not redirect_allowed(["169.254.169.254"], PUBLIC)  # a cloud's metadata service
    assert redirect_allowed(["127.0.0.1"], ["127.0.0.1"])  # a mirror on the box may send it elsewhere on it
    assert redirect_allowed(["192.168.1.9"], ["192.168.1.5"])  # a LAN mirror, within the LAN
    assert redirect_allowed([], PUBLIC)  # unresolvable: the connect fails on its own


class _Counting(BaseHTTPRequestHandler):
    hits: list[str]
    target: str = ""

    def do_GET(self) -> None:  # noqa: N802  (the stdlib's name)
        self.hits.append(self.path)
        if self.target:
            self.send_response(302)
            self.send_header("Location", self.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"internal secret"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def servers() -> Iterator[tuple[str, list[str], list[str]]]:
    """A "mirror" that redirects every path to an "internal service"; the paths each was asked."""
    inner_hits: list[str] = []
    mirror_hits: list[str] = []
    inner, inner_url = _serve(type("Inner", (_Counting,), {"hits": inner_hits}))
    mirror, mirror_url = _serve(type("Mirror", (_Counting,), {"hits": mirror_hits, "target": inner_url}))
    yield mirror_url, mirror_hits, inner_hits
    for server in (mirror, inner):
        server.shutdown()
        server.server_close()


def test_a_public_mirror_cannot_redirect_the_box_into_its_network(servers: tuple[str, list[str], list[str]]) -> None:
    mirror_url, mirror_hits, inner_hits = servers
    opener = urllib.request.build_opener(download._Redirects(PUBLIC))  # the mirror as a public one
    with pytest.raises(CatalogError, match="an address of this box's own network"):
        opener.open(mirror_url + "/voices.json", timeout=10)
    assert mirror_hits == ["/voices.json"] and inner_hits == []  # the request was never made


def test_a_mirror_on_the_box_may_redirect_within_it(servers: tuple[str, list[str], list[str]]) -> None:
    """What models get does for a local mirror: the mirror's own addresses are looked up."""
    mirror_url, _, inner_hits = servers
    mirror = download.Mirror(mirror_url + "/")
    assert download.fetch_small(mirror, "voices.json", 1000) == b"internal secret"
    assert inner_hits == ["/voices.json"]
