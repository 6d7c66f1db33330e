"""Opening the daemon's endpoints from its config: the HTTP app on the Unix socket (its mode and
group) and on TCP, and the Wyoming server. A bind that fails is a ``ConfigError`` naming the
address."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

from ..config import ServeConfig, is_loopback
from ..errors import ConfigError
from .backend import Backend
from .http_api import build_app
from .listeners import TCPListener, UnixListener
from .wyoming import Advertisement, WyomingServer

log = logging.getLogger("ttsd.daemon")


async def open_http(cfg: ServeConfig, backend: Backend) -> web.AppRunner:
    """The HTTP API on ``cfg.socket`` (owner only, or group ``cfg.socket_group``) and on
    ``cfg.listen`` when given."""
    runner = web.AppRunner(
        build_app(backend),
        handler_cancellation=True,
        shutdown_timeout=cfg.grace,
        access_log=None,
        keepalive_timeout=cfg.idle_timeout,
    )
    await runner.setup()
    old_umask = os.umask(0o177 if cfg.socket_group is None else 0o117)
    try:
        await UnixListener(runner, str(cfg.socket), max_connections=cfg.max_connections).start()
    finally:
        os.umask(old_umask)
    if cfg.socket_group is not None:
        shutil.chown(cfg.socket, group=cfg.socket_group)
        os.chmod(cfg.socket, 0o660)
    if cfg.listen is not None:
        host, port = cfg.listen
        try:
            await TCPListener(runner, host, port, max_connections=cfg.max_connections).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runner


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
    server = WyomingServer(cfg.wyoming, backend, max_connections=cfg.max_connections)
    if cfg.wyoming_zeroconf and uri.hostname and uri.port:
        server.advertisement = Advertisement(cfg.wyoming_zeroconf, uri.hostname, uri.port)
    old_umask = os.umask(0o177 if cfg.socket_group is None else 0o117)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(f"cannot serve Wyoming on {cfg.wyoming}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    return server
