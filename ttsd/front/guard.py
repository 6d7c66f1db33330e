"""Who may ask what of the HTTP API from a web browser: cross-site request forgery and DNS
rebinding refused before a route runs, and what a token-guarded TCP listener serves without the
token. Plain checks on a request's headers; ``http_api`` renders the refusal."""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

# The body types another web page can send here without asking first (the Fetch standard's
# CORS-safelisted Content-Type values: what a <form> or a no-cors fetch() may use). Any other
# type makes the browser ask with a preflight OPTIONS, which ttsd never grants.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def is_tcp(request: web.BaseRequest) -> bool:
    """Whether the request came over a TCP listener (else the Unix socket)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport else None
    return isinstance(sockname, tuple)


# A domain name a browser could have looked up in DNS: what a page on a rebound domain sends as
# its Host (a dot inside, or a trailing one). A single label ("ttsd", as a Unix-socket client may
# name the daemon) is no domain an attacker can point at this box.
_DNS_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+\.?|[a-z0-9_-]+\.")


def loopback_host(request: web.BaseRequest) -> bool:
    """The Host header names this machine without DNS: ``localhost`` (or a ``.localhost`` name,
    which browsers never look up) or an IP literal. A page served from a DNS name that an attacker
    rebinds to 127.0.0.1 sends its own name instead. A Host no such page could send (none at all,
    a single label such as ``ttsd``, a Unix-socket client's made-up ``%2Frun%2Fttsd.sock``) passes:
    only domain names are what DNS rebinding has to offer."""
    given = request.headers.get("Host")
    if given is None:
        return True
    host = given.rsplit(":", 1)[0] if not given.endswith("]") else given
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return not _DNS_NAME.fullmatch(host)
    return True


def browser_refusal(request: web.BaseRequest, *, control: bool, unguarded: bool) -> tuple[int, str, str] | None:
    """Why a request from a web browser must not be served (HTTP status, error code, message), or
    None.

    Browsers add ``Origin`` and ``Sec-Fetch-Site`` to what they send; curl and ttsd's own clients
    do not, and are unaffected. Cross-site request forgery: any web page can make a browser POST a
    form or a no-cors ``fetch`` to ``http://localhost:8080`` (a Unix socket behind socat or an SSH
    tunnel, where control needs no token). So a control route refuses a request from another origin,
    and the body types a form can send (``FORM_TYPES``, e.g. curl's default for ``-d``). Where no
    token guards the listener (``unguarded``), every POST from another origin is refused too (a
    page could make a browser spend this box's CPU on speech), and so is every request whose Host is
    a DNS name other than ``localhost``: DNS rebinding. A browser sends neither ``Origin`` nor
    ``Sec-Fetch-Site`` on a same-origin GET over plain http, so the Host is all there is to check."""
    headers = request.headers
    if unguarded and not loopback_host(request):
        return (
            403,
            "forbidden_host",
            (
                f"Host {request.headers.get('Host', '')!r} is refused here: open this listener as localhost or by "
                "IP address (a DNS name could be rebound by a web page), or guard it with --token-file"
            ),
        )
    origin = headers.get("Origin")
    # host and port only: behind a TLS proxy the page is https:// while this side sees http
    other_origin = origin is not None and origin.partition("://")[2] != request.host
    if unguarded and other_origin and request.method == "POST":
        return 403, "cross_origin", "this listener takes no requests from other web pages"
    if not control:
        return None
    if other_origin:
        return 403, "cross_origin", "control routes take no requests from other web pages"
    if headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return 403, "cross_origin", "control routes take no requests from other web pages"
    if "Content-Type" in headers and request.content_type in FORM_TYPES:
        return 415, "unsupported_media_type", "control routes take Content-Type: application/json"
    return None


PROBES = ("/healthz", "/readyz")  # "up" and "ready or not": what container and load-balancer probes ask


def is_public(method: str, path: str) -> bool:
    """True for what a TCP listener with a token serves without it: the page's own files, which
    carry no data (``ttsd.front.page``), and the health probes, which say only "ok" or
    "not ready" (probes from Kubernetes, Docker or a load balancer send no bearer token)."""
    return method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/") or path in PROBES)
