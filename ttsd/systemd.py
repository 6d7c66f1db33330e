"""sd_notify(3) for ``Type=notify`` units: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

The protocol is one datagram to the socket named by ``$NOTIFY_SOCKET`` (``@`` = abstract
namespace); with no such variable (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and mine else None

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # never block the event loop: a manager that does not read its socket loses a message
            # (libsystemd's sd_notify sends with MSG_DONTWAIT too)
            sock.setblocking(False)
            try:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
            except OSError:
                pass  # systemd gone or not listening: nothing useful to do

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")
