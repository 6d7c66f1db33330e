"""Who may ask what of the HTTP API from a web browser: cross-site request forgery and DNS
rebinding refused before a route runs, and what a token-guarded TCP listener serves without the
token. Plain checks on a request's headers; ``http_api`` renders the refusal."""

from __future__ import annotations

import ipaddress

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


def loopback_host(request: web.BaseRequest) -> bool:
    """The Host header names this machine without DNS: ``localhost`` or an IP literal. A page
    served from a DNS name that an attacker rebinds to 127.0.0.1 sends its own name instead."""
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def browser_refusal(request: web.BaseRequest, *, control: bool, unguarded: bool) -> tuple[int, str, str] | None:
    """Why a request from a web browser must not be served (HTTP status, error code, message), or
    None.

    Browsers add ``Origin`` and ``Sec-Fetch-Site`` to what they send; curl and ttsd's own clients
    do not, and are unaffected. Cross-site request forgery: any web page can make a browser POST a
    form or a no-cors ``fetch`` to ``http://localhost:8080`` (a Unix socket behind socat or an SSH
    tunnel, where control needs no token). So a control route refuses a request from another origin,
    and the body types a form can send (``FORM_TYPES``, e.g. curl's default for ``-d``). DNS
    rebinding: where no token guards the listener (``unguarded``), a browser request must name the
    host as ``localhost`` or an IP address, not a DNS name that resolves here."""
    headers = request.headers
    browser = "Origin" in headers or "Sec-Fetch-Site" in headers
    if browser and unguarded and not loopback_host(request):
        return 403, "forbidden_host", "from a browser, open this listener as localhost or by IP address"
    if not control:
        return None
    origin = headers.get("Origin")
    # host and port only: behind a TLS proxy the page is https:// while this side sees http
    if origin is not None and origin.partition("://")[2] != request.host:
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
