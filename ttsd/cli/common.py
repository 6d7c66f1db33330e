"""What the commands share: the console on stderr, the daemon client, writing an output file."""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError, DaemonError, TtsdError


def shown(value: object) -> str:
    """``value`` as a terminal may show it: what cannot be printed (terminal escapes, line breaks,
    bidi overrides and other format characters) escaped as ``\\x1b``, ``\\u202e``. A folder named
    with ``ESC[2J`` cleared the screen of whoever ran ``ttsd models list``."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _listening(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` (a socket file left by a
    daemon killed with -9 refuses them: no daemon is there)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def daemon_client(socket_path: Path | None, timeout: float = 600, *, required: bool = True) -> Any:
    """A client for the daemon's socket; ``DaemonError`` when none answers and ``required``."""
    from ..client import Client
    from ..config import default_socket

    client = Client(socket_path or default_socket(), timeout=timeout)
    if required and not client.available():
        where = client.socket_path
        if _listening(Path(where)):  # a daemon is there but does not answer: stopped (SIGSTOP), or wedged
            raise DaemonError(f"the daemon on {where} does not answer (stopped, or too busy to?)")
        raise DaemonError(
            f"no daemon answers on {where} (start one with 'ttsd serve'; one that is starting makes "
            "its socket once its voices are loaded)"
        )
    return client


_FD_PATH = re.compile(r"/(?:dev/fd|proc/self/fd)/(\d+)")
_STD_PATHS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def named_descriptor(output: str) -> int | None:
    """The descriptor ``-o /dev/stdout`` (``/dev/fd/N``, ``/proc/self/fd/N``) names: written
    into as it is open, as a shell's ``>`` to it would (resolving the link and replacing the file
    it names lost what was there, and what was written to the descriptor after)."""
    found = _FD_PATH.fullmatch(output)
    return int(found.group(1)) if found else _STD_PATHS.get(output)


def output_target(output: str) -> tuple[str, Any]:
    """Where ``-o output`` goes: ``("stdout", None)`` for ``-``; ``("fd", N)`` for an open
    descriptor; ``("into", path)`` for a FIFO or a character device already there (``/dev/null``,
    a pipe a player reads), written into as a shell's ``>`` would, never replaced by a file;
    ``("file", path)`` for the regular file published whole by rename (through a link the user
    named, the file it names). ``ConfigError`` for a directory or a block device; ``OSError`` when
    the path cannot be looked at."""
    if output == "-":
        return "stdout", None
    if (named := named_descriptor(output)) is not None:
        return "fd", named
    path = Path(output)
    try:
        found: os.stat_result | None = path.stat()  # follows a link the user named
    except FileNotFoundError:  # new, or a link to a file not made yet
        found = None
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"cannot write {output}: it is a directory")
    if found is not None and stat.S_ISBLK(found.st_mode):
        raise ConfigError(f"cannot write {output}: it is a block device (a disk), not a file")
    if found is not None and not stat.S_ISREG(found.st_mode):
        return "into", path
    return "file", Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output(output: str) -> None:
    """``-o`` can be written, checked before the voice loads and speaks, so a typo costs nothing:
    stdout is open, a descriptor is open, a FIFO or a device is writable, and a file can be made
    (and is gone at once) in the dir the file will be published in. ``write_output`` still reports
    what only writing shows."""
    if not output:
        raise click.BadParameter("needs a file name (or - for standard output)", param_hint="'-o'")
    try:
        kind, target = output_target(output)
        if kind == "stdout" and sys.stdout is None:
            raise ConfigError("cannot write to stdout: it is closed")
        if kind == "fd":
            os.fstat(target)
        if kind == "into" and not os.access(target, os.W_OK):
            raise ConfigError(f"cannot write {output}: permission denied")
        if kind == "file":
            if not target.parent.is_dir():
                raise ConfigError(f"cannot write {output}: no directory {target.parent}")
            with tempfile.TemporaryFile(dir=target.parent):  # root passes every permission check,
                pass  # yet makes nothing in /proc
    except OSError as exc:
        raise _cannot_write(output, exc) from exc


def write_output(output: str, data: bytes) -> None:
    """``data`` to ``output`` (``output_target`` says how). Every byte is written or the command
    fails: a reader that went away (``| head``) is an error, never a success line. A full disk or
    an I/O error is a ``ResourceError`` (exit 12), any other failure a ``ConfigError``."""
    try:
        kind, target = output_target(output)
        if kind == "stdout":
            if sys.stdout is None:
                raise ConfigError("cannot write to stdout: it is closed")
            sys.stdout.flush()
            try:
                fd = sys.stdout.fileno()
            except (OSError, ValueError):  # a stdout with no descriptor (captured, as in a test)
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                return
            _write_all(fd, data)
            return
        if kind == "fd":
            _write_all(target, data)
            return
        if kind == "into":
            fd = os.open(target, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # a FIFO waits for its reader
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # (a file put there since: published whole below)
                    _write_all(fd, data)
                    return
            finally:
                os.close(fd)
        from ..fsutil import SHARED, atomic_write_bytes

        atomic_write_bytes(target, data, SHARED)
    except OSError as exc:
        raise _cannot_write(output, exc) from exc


def _cannot_write(output: str, exc: OSError) -> TtsdError:
    from ..errors import ResourceError, os_error

    where = "stdout" if output == "-" else output
    if isinstance(exc, BrokenPipeError):  # an I/O error (exit 12), as a cut-off disk write would be
        return ResourceError(f"writing {where} failed: its reader went away")
    return os_error(exc, f"writing {where}", f"cannot write {where}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FiniteRange(click.FloatRange):
    """click's ``FloatRange`` without NaN and infinity, which pass its range checks (every
    comparison with NaN is false; no upper bound lets infinity through) and then failed deep in
    a command as an internal error, or were accepted (``--grace nan``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


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


def box_id_value(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--box-id``'s callback: a value that is no box id is a bad flag (exit 2, which the example
    unit does not restart: it would fail the same way at every start)."""
    from ..fetch.box import check_box_id

    return _checked(check_box_id, value)


def version_value(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A ``--version`` option's callback: one that is no PEP 440 version ttsd takes is a bad flag."""
    from ..manifest import check_version

    return _checked(check_version, value)


def _checked(check: Callable[[str], str], value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check(value)
    except TtsdError as exc:
        raise click.BadParameter(str(exc)) from None
