"""The status page at ``GET /``: one HTML file, one stylesheet and one script, shipped in the
package (``ttsd/front/page/``) and served as they are: no build step, nothing from the network.

The page holds no data and no secret: it polls ``/v1/status`` and calls the API with the bearer
token the operator types into it. So a TCP listener with ``--token-file`` serves ``/`` and
``/static/...`` without the token (``ttsd.front.guard.is_public``). Files are served from a fixed list read
once at start-up, so no request path ever reaches the file system (``/static/../x`` is a 404).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# Everything the page may load comes from the daemon itself; Speak plays the streamed PCM through
# Web Audio (which no directive governs: the samples never leave the script) and then holds it as
# a WAV in a blob: URL, for the <audio> element and the save link; no framing (a rollback button
# must not be clickjacked) and no forms that navigate anywhere.
CSP = (
    "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
FILES = {"index.html": "text/html", "page.css": "text/css", "page.js": "text/javascript"}


def _load() -> dict[str, bytes]:
    folder = resources.files(__package__) / "page"
    return {name: (folder / name).read_bytes() for name in FILES}


def add_routes(app: web.Application) -> None:
    """``GET /`` and ``GET /static/{name}`` for the names in ``FILES``; a missing file in the
    package is an error at start-up, not a 404 later."""
    files = _load()

    def answer(name: str) -> web.Response:
        return web.Response(body=files[name], content_type=FILES[name], charset="utf-8", headers=SECURITY_HEADERS)

    async def index(request: web.Request) -> web.Response:
        return answer("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound()
        return answer(name)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
