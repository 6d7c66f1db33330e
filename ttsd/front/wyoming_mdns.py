"""The Wyoming service announced over mDNS (``--wyoming-zeroconf``), as wyoming-piper does."""

from __future__ import annotations

import logging
import socket
from typing import Any

from ..errors import ConfigError

log = logging.getLogger("ttsd.wyoming")
ZEROCONF_MISSING = "--wyoming-zeroconf needs the zeroconf package: ttsd's zeroconf extra, or pip install zeroconf"


class Advertisement:
    """The Wyoming service announced over mDNS (``_wyoming._tcp.local.``), as wyoming-piper does,
    so Home Assistant discovers the box by itself. Needs the ``zeroconf`` package (the
    ``zeroconf`` extra); a box where multicast does not work gets a warning, not a failure."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self._zeroconf: Any = None
        self._info: Any = None

    @staticmethod
    def check() -> None:
        """At start-up, before the voices load: the package is there (else ``ConfigError``)."""
        try:
            import zeroconf.asyncio  # noqa: F401
        except ImportError:
            raise ConfigError(ZEROCONF_MISSING) from None

    async def start(self) -> None:
        self.check()
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        if self.host.startswith("127.") or self.host == "localhost":
            log.warning(
                "not announcing Wyoming over mDNS: it listens on %s, which no other box can reach; "
                "bind it to the LAN (--wyoming tcp://0.0.0.0:PORT) to be discovered",
                self.host,
            )
            return
        try:
            # (a box with no route to the mDNS group, only loopback up: a warning, as any failure
            # to announce; it stopped the daemon with exit 3, and systemd started it again)
            address = self.host if self.host not in ("0.0.0.0", "") else _outgoing_address()
            self._info = AsyncServiceInfo(
                "_wyoming._tcp.local.",
                f"{self.name}._wyoming._tcp.local.",
                addresses=[socket.inet_aton(address)],
                port=self.port,
            )
            self._zeroconf = AsyncZeroconf()
            await self._zeroconf.async_register_service(self._info)
        except (OSError, ValueError) as exc:
            log.warning("cannot announce Wyoming over mDNS (%s); add the integration by host and port", exc)
            await self.stop()
            return
        log.info("announced Wyoming as %s on %s:%d over mDNS", self.name, address, self.port)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            zeroconf, self._zeroconf = self._zeroconf, None
            try:
                if self._info is not None:
                    await zeroconf.async_unregister_service(self._info)
            finally:
                await zeroconf.async_close()


def _outgoing_address() -> str:
    """The address this box would use towards the mDNS group (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("224.0.0.251", 5353))
        return str(probe.getsockname()[0])
