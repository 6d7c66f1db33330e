"""``ttsd serve``'s values that need more than click's types: a TCP address, a canary share, a
memory budget, a token file, a Wyoming URI and its zeroconf name. A value that can never be
right is a usage error naming the flag (exit 2: systemd does not restart it, as it would fail the
same way at every start); a token file that cannot be read or holds no usable token is a
``ConfigError`` (exit 3: the file may be mended)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.UsageError(f"{flag} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def parse_canary(value: str) -> tuple[str, float]:
    voice, _, share = value.rpartition("=")
    try:
        number = float(share)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise click.UsageError(f"--canary {value!r}: expected a share between 0 and 1, e.g. 0.1 or myvoice=0.2")
    return voice or "*", number


def parse_budget(value: str | None) -> int | None:
    if value is None:
        return None
    from ..serving.residency import parse_size

    try:
        return parse_size(value)
    except ValueError:
        raise click.UsageError(f"--memory-budget {value!r}: expected a size such as 1.5G or 800M") from None


def read_token(path: Path) -> str:
    """The bearer token: printable ASCII, at least 16 characters. A file others can read is
    accepted with a warning (anyone who reads it can call the control routes)."""
    import logging
    import stat

    from ..safe_read import read_small

    try:
        mode = path.stat().st_mode
        token = read_small(path, 4096).decode("ascii").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: the token must be printable ASCII text") from None
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise ConfigError(f"--token-file {path}: the token must be at least 16 printable characters, no spaces")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger("ttsd.cli").warning(
            "--token-file %s can be read by other users (mode %03o); run: chmod 600 %s", path, stat.S_IMODE(mode), path
        )
    return token


def zeroconf_name(name: str | None, uri: str | None) -> str | None:
    if name is None:
        return None
    if not uri or not uri.startswith("tcp://"):
        raise click.UsageError("--wyoming-zeroconf announces a TCP service: give --wyoming tcp://HOST:PORT too")
    if not (0 < len(name) <= 63 and all(c.isalnum() or c in "-_ " for c in name)):
        raise click.UsageError(f"--wyoming-zeroconf {name!r}: a name of 1 to 63 letters, digits, '-', '_' or spaces")
    return name


def parse_wyoming(value: str) -> str:
    """``tcp://HOST:PORT`` or ``unix://PATH``, checked before anything starts."""
    from urllib.parse import urlparse

    try:
        uri = urlparse(value)
        port = uri.port
    except ValueError:
        uri, port = None, None
    if uri is not None and uri.scheme == "tcp" and uri.hostname and port:
        return value
    if uri is not None and uri.scheme == "unix" and uri.path:
        return value
    raise click.UsageError(f"--wyoming {value!r}: expected tcp://HOST:PORT or unix://PATH, e.g. tcp://127.0.0.1:10200")
