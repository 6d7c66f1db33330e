"""What a web page can make a browser do to a listener with no token (the Unix socket behind socat or
an SSH tunnel, a loopback TCP port): DNS rebinding and cross-site POSTs, checked on every request,
not only those that carry browser headers; and the bearer token's scheme read as RFC 7235 says.
In-process (the page's own calls in chromium: tests/test_status_page.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inproc import FakeVoices, FrontEnds

VOICES = {"joe": {"1": {"tone": 330}}}
TOKEN = "a-token-of-twenty-chars"


@pytest.fixture
def open_front(tmp_path: Path) -> Iterator[tuple[FakeVoices, FrontEnds]]:
    voices = FakeVoices(tmp_path, VOICES)
    front = FrontEnds(voices.backend, tmp_path)
    yield voices, front
    front.close()
    voices.close()


@pytest.mark.parametrize("tcp", [False, True], ids=["socket", "tcp-no-token"])
@pytest.mark.parametrize("host", ["rebind.evil.test", "rebind.evil.test:8080", "box.lan:8080", "evil.",
                                  "REBIND.Evil.Test"])
def test_a_domain_name_as_host_is_refused_on_every_request(open_front: tuple[FakeVoices, FrontEnds],
                                                            host: str, tcp: bool) -> None:
    """A page on a domain rebound to this box: a same-origin GET over plain http carries neither
    Origin nor Sec-Fetch-Site, only the Host naming that domain."""
    voices, front = open_front
    for method, path in (("GET", "/v1/status"), ("GET", "/metrics"), ("GET", "/"), ("POST", "/v1/synthesize")):
        reply = front.request(method, path, {"text": "Hello."} if method == "POST" else None, tcp=tcp,
                              headers={"Host": host})
        assert (reply.status, reply.error["code"]) == (403, "forbidden_host"), (method, path)
    assert voices.jobs == []


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "app.localhost",
                                  "ttsd", "%2Frun%2Fttsd%2Fttsd.sock"])
def test_hosts_no_rebinding_page_can_send_are_served(open_front: tuple[FakeVoices, FrontEnds], host: str) -> None:
    """localhost, IP literals, a single label (curl --unix-socket ... http://ttsd/) and a
    Unix-socket client's made-up Host."""
    _, front = open_front
    assert front.get("/v1/status", headers={"Host": host}).status == 200


def test_a_post_from_another_web_page_is_refused_but_curl_is_served(open_front: tuple[FakeVoices, FrontEnds]) -> None:
    """Any page can make a browser POST text/plain (a "simple" request, no preflight) here: it
    carries the page's Origin, and is refused. curl's -d (a form type, no Origin) still speaks."""
    voices, front = open_front
    for origin in ("http://evil.example", "null", "http://localhost:9999"):
        reply = front.post("/v1/synthesize", raw=b'{"text": "Spend your CPU."}',
                           headers={"Origin": origin, "Content-Type": "text/plain", "Host": "localhost:8080"})
        assert (reply.status, reply.error["code"]) == (403, "cross_origin"), origin
    assert voices.jobs == []
    curl = front.post("/v1/synthesize", raw=b'{"text": "From curl."}',
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert curl.status == 200
    same = front.post("/v1/synthesize", {"text": "From the page."},
                      headers={"Origin": "http://localhost:8080", "Host": "localhost:8080"})
    assert same.status == 200


def test_the_bearer_scheme_is_matched_in_any_case(tmp_path: Path) -> None:
    """RFC 7235: the scheme is case-insensitive (``bearer``, ``BEARER``); the token is not. With a
    token the listener is guarded, so a domain name as Host is fine there."""
    voices = FakeVoices(tmp_path, VOICES, token=TOKEN)
    front = FrontEnds(voices.backend, tmp_path)
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            reply = front.get("/v1/status", tcp=True, headers={"Authorization": f"{scheme} {TOKEN}"})
            assert reply.status == 200, scheme
        for wrong in (f"Basic {TOKEN}", f"Bearer {TOKEN.upper()}", f"Bearer{TOKEN}", TOKEN, "Bearer "):
            assert front.get("/v1/status", tcp=True, headers={"Authorization": wrong}).status == 401, wrong
        named = front.get("/v1/status", tcp=True, headers={"Authorization": f"Bearer {TOKEN}", "Host": "box.lan:8080"})
        assert named.status == 200
    finally:
        front.close()
        voices.close()
