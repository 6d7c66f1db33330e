"""The daemon's listening sockets (aiohttp sites), with a cap on open connections each.

aiohttp closes a connection that has not sent a whole request within ``keepalive_timeout``
seconds of connecting or of its last response (``--idle-timeout``, default ``IDLE_SECONDS``):
that is the header timeout and the idle timeout in one. What it does not bound is how many connections may be
open at once, so a client that opens hundreds and trickles bytes into each could hold the
daemon's file descriptors and memory. Each listener here takes at most ``limit`` connections;
one more is closed as soon as it is accepted (and logged, at most once a minute), so a flood on
the TCP listener never locks local clients out of the Unix socket. On TCP one client address
holds at most half of them (``PeerShare``), so one host that opens connections and trickles
bytes into each cannot keep every other client (a health probe, Home Assistant) out.

Nor does aiohttp bound how long a client may leave an answer unread. A connection whose client
stops reading fills its buffers, and then its writes wait: a whole WAV sits in memory and holds
the slot for as long as the client stays connected. So once a connection's writing is paused (its
buffer over the high-water mark), the client has ``write_timeout`` seconds to take some of it;
else the connection is aborted, its buffered answer dropped, its slot freed, and the request's
handler cancelled with it (the synthesis of a streamed answer stops).

A request aiohttp cannot parse (a bad request line, a header too long, a bad chunk size) never
reaches the app's handlers: aiohttp answers it itself, in plain text, and logs its traceback at
error level. Anyone who can connect can make that happen, so each listener's handlers answer it
as every other error, ttsd's JSON ``{"error": {"code": "bad_http", "message"}}`` with the same
status, and log one warning line for it (at most a few a minute; the rest at debug).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..errors import ConfigError, os_error
from ..logs import Throttle

log = logging.getLogger("ttsd.listeners")
BACKLOG = 128  # aiohttp's default: connections the kernel queues before accept

IDLE_SECONDS = 15.0  # a connection must send a whole request this soon after connecting or answering
WRITE_SECONDS = 60.0  # a client must take some of its answer this soon after its buffers filled up
DEFAULT_MAX_CONNECTIONS = 128
_log_malformed = Throttle(log)


class _JsonErrors(RequestHandler):
    """aiohttp's request handler, answering a request it could not parse in ttsd's JSON error
    shape with one throttled log line (aiohttp's own answer is plain text after a traceback).
    Only ``handle_error`` differs; it adds no state, so a handler the runner's server made becomes
    one by taking this class (``_Capped``)."""

    __slots__ = ()

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:  # a bug, or an answer under way: aiohttp's way
            return super().handle_error(request, status, exc, message)
        said = (message or (str(exc) if exc is not None else "") or "bad request").splitlines()
        first = " ".join(w for w in (line.strip() for line in said) if w.strip("^"))[:200] or "bad request"
        _log_malformed(logging.WARNING, "malformed HTTP request from %s: %s", request.remote or "the socket", first)
        response = web.json_response(
            {"error": {"code": "bad_http", "message": f"malformed HTTP request: {first}"}}, status=status
        )
        response.force_close()
        return response


def check_socket(path: Path, flag: str = "--socket") -> None:
    """Refuse a socket a live daemon answers on; remove a stale one left by a crash (``flag``: the
    option that named it, for the message)."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another {flag}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s (left by a daemon that did not shut down)", path)
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise ConfigError(f"cannot check socket {path}: {exc.strerror or exc}") from exc
    raise ConfigError(f"another ttsd is already serving on {path}")


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its terminating NUL)


def probe_socket(path: Path, flag: str = "--socket") -> None:
    """A socket can be made at ``path`` (nothing is there: ``check_socket`` first): bound and
    removed at once, at start-up, so a path too long or a dir where no socket can be made (``/proc``,
    a read-only mount) is one line before the voices load, not an internal error after."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise ConfigError(f"{flag} {path}: a socket's path may be at most {UNIX_PATH_MAX} bytes, this one is {size}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(os.fsencode(path))
        except OSError as exc:  # nothing was made: whatever is there now (another daemon's) stays
            cannot = f"{flag}: cannot make a socket at {path}"
            raise os_error(exc, f"making the socket {path} ({flag})", cannot) from exc
        with contextlib.suppress(OSError):
            path.unlink()


def socket_gid(group: str) -> int:
    """The group ``--socket-group`` names (a name, or a number), checked at start-up: one that does
    not exist, or that a daemon not run as root is outside of (it could not give the socket to it),
    is one line before the voices load, not an internal error once they had."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        if not group.isdigit():
            raise ConfigError(f"--socket-group {group}: no such group") from None
        gid = int(group)
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(f"--socket-group {group}: ttsd is neither root nor in that group")
    return gid


def share_socket(path: Path, gid: int | None) -> None:
    """A socket just made (mode 0600, or 0660 under the umask ``--socket-group`` sets) goes to
    group ``gid``, mode 0660; with no group it stays the owner's. A directory above it that the
    group's members cannot pass through is logged: they could not reach the socket."""
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        for folder in closed_to_group(path, gid):
            try:
                st = folder.stat()
            except OSError:  # gone since it was looked at: nothing to say of it
                continue
            log.warning(
                "the socket %s is for group %s, but its members may not reach it: %s is mode %o, group %s "
                "(make it searchable by that group: in the example unit, RuntimeDirectoryMode=0755)",
                path,
                _group_name(gid),
                folder,
                stat.S_IMODE(st.st_mode),
                _group_name(st.st_gid),
            )


def closed_to_group(path: Path, gid: int) -> list[Path]:
    """The directories above ``path`` that a member of group ``gid`` who owns none of them may
    not pass through: no search permission for that group where it is the directory's group, for
    others elsewhere. Modes only: an ACL, or another group of a member's, that lets one in is not
    seen."""
    closed = []
    for folder in (*path.parent.absolute().parents[::-1], path.parent.absolute()):
        try:
            st = folder.stat()
        except OSError:
            continue
        # the group's bits decide for its members when the directory is the group's, else the others'
        if not stat.S_IMODE(st.st_mode) & (stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH):
            closed.append(folder)
    return closed


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class PeerShare:
    """How many connections each client address holds on one TCP listener, and the most one may
    hold: half the listener's limit, so one host alone never fills it. A Unix socket's clients
    have no address and are not counted here (the listener's limit is theirs). Event loop only."""

    def __init__(self, limit: int, where: str) -> None:
        self.limit, self.most, self.where = limit, max(1, limit // 2), where
        self.held: dict[str, int] = {}
        self.refused = 0
        self._log = Throttle(log, burst=1)

    def take(self, peer: object) -> str | None:
        """The address of a connection just accepted, counted; "" for one that has no address;
        None (not counted) when that address already holds its share: the caller closes it."""
        host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else ""
        if not host:
            return ""
        if self.held.get(host, 0) >= self.most:
            self.refused += 1
            self._log(
                logging.WARNING,
                "%s: %s holds its share, half of the %d connections; closing its new ones",
                self.where,
                host,
                self.limit,
            )
            return None
        self.held[host] = self.held.get(host, 0) + 1
        return host

    def give(self, host: str) -> None:
        if host and (left := self.held.get(host, 0) - 1) > 0:
            self.held[host] = left
        else:
            self.held.pop(host, None)


class _Closer(asyncio.Protocol):
    """Takes a connection over the cap and closes it at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's request handler, counted from the moment it is made until its connection ends,
    and cut off when its client leaves its answer unread (see the module docstring)."""

    def __init__(self, inner: Any, owner: _Capped) -> None:
        self._inner, self._owner = inner, owner
        self._transport: asyncio.BaseTransport | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._host: str | None = None  # the client's address, counted in the owner's share

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._host = self._owner.peers.take(transport.get_extra_info("peername"))
        if self._host is None:  # its address holds its share of the listener already
            transport.close()  # nothing was written: closed at once, as over the cap (_Closer)
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.live -= 1
        if self._stalled is not None:
            self._stalled.cancel()
        if self._host is None:
            return  # never handed to aiohttp
        self._owner.peers.give(self._host)
        self._inner.connection_lost(exc)

    def _cut_off(self) -> None:
        self._owner.cut_off += 1
        log.info(
            "%s: a client left its answer unread for %.0f s; connection closed",
            self._owner.where,
            self._owner.write_timeout,
        )
        if isinstance(self._transport, asyncio.WriteTransport):
            self._transport.abort()  # drops the unsent answer; connection_lost follows

    def data_received(self, data: bytes) -> None:
        if self._host is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._host is not None else None

    def pause_writing(self) -> None:
        if self._stalled is None:
            self._stalled = asyncio.get_running_loop().call_later(self._owner.write_timeout, self._cut_off)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        self._inner.resume_writing()


class _Capped:
    """Protocol factory: aiohttp's request handler while this listener has fewer than ``limit``
    connections, else a ``_Closer``. Runs on the event loop only."""

    def __init__(self, server: Any, limit: int, where: str, write_timeout: float = WRITE_SECONDS) -> None:
        self.server, self.limit, self.where, self.write_timeout = server, limit, where, write_timeout
        self.live = 0  # handlers made and not yet disconnected
        self.refused = 0
        self.cut_off = 0  # connections aborted for leaving their answer unread
        self.peers = PeerShare(limit, where)
        self._logged = 0.0

    def __call__(self) -> asyncio.BaseProtocol:
        if self.live >= self.limit:
            self.refused += 1
            if time.monotonic() - self._logged > 60:
                self._logged = time.monotonic()
                log.warning(
                    "%s: %d connections open, the limit; closing new ones (%d so far)",
                    self.where,
                    self.limit,
                    self.refused,
                )
            return _Closer()
        self.live += 1
        handler = self.server()
        if type(handler) is RequestHandler:  # aiohttp's own: its parse errors answered as JSON
            handler.__class__ = _JsonErrors
        return _Counted(handler, self)


class _Listener(web.BaseSite):
    """An aiohttp site whose connections go through ``_Capped``. aiohttp's sites take no protocol
    factory, so this one makes its own asyncio server from the runner's (public) ``server``. The
    one private part of aiohttp it relies on: ``BaseSite.stop()`` (called by ``runner.cleanup()``)
    closes ``self._server``; tests/test_listeners.py fails if that changes, and setup.cfg bounds
    aiohttp to the versions tested."""

    def __init__(
        self, runner: web.BaseRunner, where: str, *, max_connections: int, write_timeout: float = WRITE_SECONDS
    ) -> None:
        super().__init__(runner)
        self.factory: _Capped | None = None
        self._where, self._limit, self._write_timeout = where, max_connections, write_timeout
        self._app_runner = runner  # our own reference: BaseSite keeps it private

    @property
    def name(self) -> str:
        return self._where

    async def start(self) -> None:
        await super().start()  # registers the site with its runner, which stops it on cleanup
        server = self._app_runner.server
        assert server is not None, "runner.setup() first"
        self.factory = _Capped(server, self._limit, self._where, self._write_timeout)
        self._server = await self._listen(self.factory)

    async def _listen(self, factory: _Capped) -> asyncio.AbstractServer:
        raise NotImplementedError


class UnixListener(_Listener):
    def __init__(
        self, runner: web.BaseRunner, path: str, *, max_connections: int, write_timeout: float = WRITE_SECONDS
    ) -> None:
        super().__init__(runner, f"unix:{path}", max_connections=max_connections, write_timeout=write_timeout)
        self.path = path

    async def _listen(self, factory: _Capped) -> asyncio.AbstractServer:
        return await asyncio.get_running_loop().create_unix_server(factory, self.path, backlog=BACKLOG)


class TCPListener(_Listener):
    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        write_timeout: float = WRITE_SECONDS,
    ) -> None:
        super().__init__(runner, f"{host}:{port}", max_connections=max_connections, write_timeout=write_timeout)
        self.host, self.port = host, port

    async def _listen(self, factory: _Capped) -> asyncio.AbstractServer:
        server = await asyncio.get_running_loop().create_server(
            factory, self.host, self.port, backlog=BACKLOG, reuse_address=True
        )
        if server.sockets:  # port 0: the one the kernel chose
            self.port = server.sockets[0].getsockname()[1]
        return server
