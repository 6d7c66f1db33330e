"""The daemon's own aiohttp sites (``ttsd.front.listeners``): a connection cap on the Unix socket
and on TCP, and a clean stop through ``runner.cleanup()``. The stop is the one place they rely on
aiohttp's internals (``BaseSite.stop`` closes ``_server``), so a new aiohttp that changes it fails
here, not on a box that can no longer shut down."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import types
from pathlib import Path

import pytest
from aiohttp import web

from ttsd.errors import ConfigError
from ttsd.front.listeners import TCPListener, UnixListener


async def _ping(_request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def _runner() -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/ping", _ping)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"pong"), 5)


async def _closed_at_once(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 2) == b""
    except ConnectionError:
        return True


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_listener_caps_connections_and_stops_with_its_runner(kind: str, tmp_path: Path) -> None:
    """1. One connection (the cap) is served. 2. A second one is closed at once. 3. Once the first
    ends, a new one is served. 4. After ``runner.cleanup()`` nothing accepts connections."""

    async def scenario() -> None:
        runner = await _runner()
        listener: UnixListener | TCPListener
        if kind == "unix":
            path = str(tmp_path / "t.sock")
            listener = UnixListener(runner, path, max_connections=1)

            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await asyncio.open_unix_connection(path)
        else:
            listener = TCPListener(runner, "127.0.0.1", 0, max_connections=1)

            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await asyncio.open_connection("127.0.0.1", listener.port)  # type: ignore[union-attr]

        await listener.start()
        assert kind == "unix" or listener.port != 0  # type: ignore[union-attr]
        first = await connect()
        assert (await _ask(*first)).endswith(b"pong")
        second = await connect()
        assert await _closed_at_once(second[0]), "a connection over the cap is closed"
        first[1].close()
        await first[1].wait_closed()
        await asyncio.sleep(0.05)  # the server sees the close
        third = await connect()
        assert (await _ask(*third)).endswith(b"pong")
        third[1].close()
        await runner.cleanup()
        with pytest.raises(OSError):  # refused (or, for a Unix socket, the file is gone)
            await connect()

    asyncio.run(scenario())


@pytest.mark.parametrize("refused, fails", [((), False), ((socket.AF_INET6,), False),
                                            ((socket.AF_INET, socket.AF_INET6), True)])
def test_the_port_check_skips_a_family_the_box_does_not_allow(monkeypatch: pytest.MonkeyPatch, refused: tuple[int, ...],
                                                               fails: bool) -> None:
    """``localhost`` on a box with IPv6 off, or under a unit whose RestrictAddressFamilies leaves a
    family out: the listener skips the family it cannot open, so the start-up check does too (it
    raised "internal error", exit 1). With no family left, one clear line that says where to look."""
    from ttsd.front import endpoints

    real = socket.socket

    def made(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family in refused:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(endpoints, "socket", types.SimpleNamespace(**{**vars(socket), "socket": made}))
    with real() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cfg = types.SimpleNamespace(listen=None, metrics_listen=("localhost", port), wyoming=None)
    if fails:
        with pytest.raises(ConfigError, match="--metrics-listen: cannot listen on localhost.*RestrictAddressFamilies"):
            endpoints.check_ports(cfg)  # type: ignore[arg-type]
    else:
        endpoints.check_ports(cfg)  # type: ignore[arg-type]


def test_the_socket_probe_leaves_a_socket_it_did_not_make(tmp_path: Path) -> None:
    """A second daemon (another state dir) binds the same --socket between the stale check and
    the probe: the probe's bind fails, and the other daemon's socket stays (it was unlinked)."""
    from ttsd.front.listeners import probe_socket

    path = tmp_path / "ttsd.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ConfigError, match="cannot make a socket"):
            probe_socket(path)
        assert path.is_socket()
    free = tmp_path / "free.sock"
    probe_socket(free)
    assert not free.exists()


def test_one_tcp_address_holds_at_most_half_the_slots() -> None:
    """A host that opens connections and trickles bytes into each took every slot, so a health
    probe from another host waited out the idle timeout. One address now holds at most half of
    them: its next one is closed at once while another address is served; a slot it frees is its
    own again."""

    async def scenario() -> None:
        runner = await _runner()
        listener = TCPListener(runner, "127.0.0.1", 0, max_connections=4)
        await listener.start()

        async def connect(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", listener.port, local_addr=(source, 0))

        held = [await connect("127.0.0.1") for _ in range(2)]
        for _reader, writer in held:
            writer.write(b"GET /ping HTTP/1.1\r\n")  # a request begun, never ended
        over = await connect("127.0.0.1")
        assert await _closed_at_once(over[0]), "a third connection from one address is closed"
        other = await connect("127.0.0.2")
        assert (await _ask(*other)).endswith(b"pong"), "another address is served"
        held[0][1].close()
        await held[0][1].wait_closed()
        await asyncio.sleep(0.05)  # the server sees the close
        again = await connect("127.0.0.1")
        assert (await _ask(*again)).endswith(b"pong")
        assert listener.factory is not None and listener.factory.peers.refused == 1
        for _reader, writer in (held[1], other, again):
            writer.close()
        await runner.cleanup()

    asyncio.run(scenario())


def test_a_socket_its_group_cannot_reach_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``--socket-group G`` with the socket in a directory G's members cannot pass through (the
    example unit's /run/ttsd is 0750 for group ttsd, so any other group is shut out): the daemon
    says so at start-up, naming the directory; a directory open to the group, or to all, is not
    logged. The gids are the test's own group and one it is not in (nothing is chowned to it);
    only run/ is judged (pytest's own temp dirs above it are 0700)."""
    import logging

    from ttsd.front.listeners import closed_to_group, share_socket

    run = tmp_path / "run"
    run.mkdir()
    mine, other = os.getgid(), os.getgid() + 4242
    os.chown(run, -1, mine)
    run.chmod(0o750)
    assert run in closed_to_group(run / "ttsd.sock", other)
    assert run not in closed_to_group(run / "ttsd.sock", mine)  # the directory's own group passes
    assert closed_to_group(run / "ttsd.sock", other)[-1] == run  # outermost first: run/ is the last
    run.chmod(0o755)
    assert run not in closed_to_group(run / "ttsd.sock", other)
    run.chmod(0o705)  # open to others, yet not to the directory's own group: its bits decide
    assert run in closed_to_group(run / "ttsd.sock", mine) and run not in closed_to_group(run / "ttsd.sock", other)
    run.chmod(0o750)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as made:
        made.bind(str(run / "ttsd.sock"))
        with caplog.at_level(logging.WARNING, logger="ttsd.listeners"):
            share_socket(run / "ttsd.sock", mine)
            assert f"{run} is mode" not in caplog.text
            if os.geteuid() == 0:  # only root may give the socket to a group it is not in
                share_socket(run / "ttsd.sock", other)
                assert f"{run} is mode 750" in caplog.text and "may not reach" in caplog.text, caplog.text
