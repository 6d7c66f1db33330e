"""What the commands share: the console on stderr, the daemon client, writing an output file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError, DaemonError


def console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def daemon_client(socket_path: Path | None, timeout: float = 600, *, required: bool = True) -> Any:
    """A client for the daemon's socket; ``DaemonError`` when none answers and ``required``."""
    from ..client import Client
    from ..config import default_socket

    client = Client(socket_path or default_socket(), timeout=timeout)
    if required and not client.available():
        raise DaemonError(f"no daemon answers on {client.socket_path} (start one with 'ttsd serve')")
    return client


def write_output(output: str, data: bytes) -> None:
    """``data`` to ``output`` (published whole, by rename), or to stdout for ``-``."""
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    from ..fsutil import SHARED, atomic_write_bytes

    try:
        atomic_write_bytes(Path(output), data, SHARED)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc


SOCKET_HELP = "Daemon socket [env TTSD_SOCKET]."
PRECISION_CHOICES = ("auto", "fp32", "bf16")  # ttsd.manifest.PRECISIONS, without importing it here
PRECISION_HELP = (
    "Number format voices compute in: auto (each voice's ttsd.json, which defaults to bf16 where the "
    "CPU does bf16 natively, AVX512-BF16/AMX/ARM BF16, else fp32), fp32 (exact), or bf16 (faster; "
    "emulated and slow on CPUs without it) [env TTSD_PRECISION]."
)


F = TypeVar("F", bound=Callable[..., Any])


def trusted_keys_option(help: str) -> Callable[[F], F]:
    """``--trusted-keys DIR`` [env TTSD_TRUSTED_KEYS]: a dir of public keys (*.pem); ``help`` says
    what the command does with them."""
    return click.option(
        "--trusted-keys",
        "trusted_keys",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="TTSD_TRUSTED_KEYS",
        help=help,
    )
