"""Opening the daemon's endpoints from its config: the HTTP app on the Unix socket (its mode and
group) and on TCP, and the Wyoming server. A bind that fails is a ``ConfigError`` naming the
address."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

from ..config import ServeConfig, is_loopback
from ..errors import ConfigError
from ..logs import ACCESS, ACCESS_FORMAT
from ..metrics import CONTENT_TYPE
from .backend import Backend
from .http_api import build_app
from .listeners import TCPListener, UnixListener, share_socket, socket_gid
from .wyoming import Advertisement, WyomingServer

log = logging.getLogger("ttsd.daemon")


async def open_http(cfg: ServeConfig, backend: Backend) -> web.AppRunner:
    """The HTTP API on ``cfg.socket`` (owner only, or group ``cfg.socket_group``) and on
    ``cfg.listen`` when given."""
    runner = web.AppRunner(
        build_app(backend),
        handler_cancellation=True,
        shutdown_timeout=cfg.grace,
        access_log=logging.getLogger(ACCESS),  # silent unless --access-log (ttsd.logs)
        access_log_format=ACCESS_FORMAT,
        keepalive_timeout=cfg.idle_timeout,
    )
    await runner.setup()
    old_umask = os.umask(0o177 if cfg.socket_group is None else 0o117)
    try:
        await UnixListener(
            runner, str(cfg.socket), max_connections=cfg.max_connections, write_timeout=cfg.write_timeout
        ).start()
    finally:
        os.umask(old_umask)
    share_socket(cfg.socket, _gid(cfg))
    if cfg.listen is not None:
        host, port = cfg.listen
        try:
            await TCPListener(
                runner, host, port, max_connections=cfg.max_connections, write_timeout=cfg.write_timeout
            ).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runner


async def open_metrics(cfg: ServeConfig, backend: Backend) -> web.AppRunner:
    """``GET /metrics`` alone on ``cfg.metrics_listen``, with no token: for a Prometheus that
    cannot send one, on a port a firewall can keep to the monitoring network. The same
    connection cap and idle timeout as the API's listeners, so a scraper cannot pile up
    connections either."""
    assert cfg.metrics_listen is not None
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=backend.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=cfg.idle_timeout, shutdown_timeout=1.0)
    await runner.setup()
    host, port = cfg.metrics_listen
    try:
        await TCPListener(
            runner, host, port, max_connections=cfg.max_connections, write_timeout=cfg.write_timeout
        ).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    if not is_loopback(host):
        log.info("metrics on %s:%d without a token: keep that port to the monitoring network", host, port)
    return runner


def check_ports(cfg: ServeConfig) -> None:
    """Each TCP address the daemon will listen on can be bound now: a port in use is a start-up
    error before the voices load (a minute on a small box), not after. Bound and released at
    once, as the listener will bind it (SO_REUSEADDR); another program may still take it in
    between, which the listener then reports."""
    wanted = [("--listen", cfg.listen), ("--metrics-listen", cfg.metrics_listen)]
    if cfg.wyoming:
        uri = urlparse(cfg.wyoming)
        if uri.scheme == "tcp" and uri.hostname and uri.port:
            wanted.append(("--wyoming", (uri.hostname, uri.port)))
    for flag, address in wanted:
        if address is None:
            continue
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"{flag} {host}:{port}: {exc.strerror or exc}") from exc
        opened = 0
        refused: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            try:
                probe = socket.socket(family, kind, proto)
            except OSError as exc:  # a family the box or the unit does not allow (IPv6 off, the
                refused = exc  # unit's RestrictAddressFamilies): skipped, as the listener skips it
                continue
            opened += 1
            with probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(sockaddr)
                except OSError as exc:
                    raise ConfigError(f"{flag}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        if not opened and refused is not None:
            raise ConfigError(
                f"{flag}: cannot listen on {host}:{port}: {refused.strerror or refused}"
                " (under systemd: does the unit's RestrictAddressFamilies allow AF_INET and AF_INET6?)"
            )


async def open_wyoming(cfg: ServeConfig, backend: Backend) -> WyomingServer:
    """Wyoming on ``cfg.wyoming`` (tcp:// or unix://), advertised over zeroconf when asked."""
    assert cfg.wyoming is not None
    uri = urlparse(cfg.wyoming)
    if uri.scheme == "tcp" and not is_loopback(uri.hostname or ""):
        log.warning(
            "Wyoming on %s is reachable from other machines and has no authentication; anyone who "
            "reaches it can make this box speak (bind to 127.0.0.1 unless the network is trusted)",
            cfg.wyoming,
        )
    if uri.scheme == "unix":
        path = Path(uri.path)
        if path.resolve() == cfg.socket.resolve():
            raise ConfigError(f"--wyoming {cfg.wyoming}: that is the HTTP socket; choose another path")
    server = WyomingServer(cfg.wyoming, backend, max_connections=cfg.max_connections, write_timeout=cfg.write_timeout)
    if cfg.wyoming_zeroconf and uri.hostname and uri.port:
        server.advertisement = Advertisement(cfg.wyoming_zeroconf, uri.hostname, uri.port)
    old_umask = os.umask(0o177 if cfg.socket_group is None else 0o117)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(f"cannot serve Wyoming on {cfg.wyoming}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    if uri.scheme == "unix":  # the same group as the HTTP socket (it was 0660 for the daemon's own)
        share_socket(Path(uri.path), _gid(cfg))
    return server


def _gid(cfg: ServeConfig) -> int | None:
    return socket_gid(cfg.socket_group) if cfg.socket_group is not None else None
