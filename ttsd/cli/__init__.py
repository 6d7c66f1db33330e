"""The ``ttsd`` command. Thin: parse, build plain config, call the module that does the work.

Every ``TtsdError`` becomes one line on stderr and its own exit code (``error.exit_code``, see
``ttsd.errors``); a traceback appears only with ``--debug``. Nothing here imports torch: engines
are loaded only by the commands that synthesize, and the daemon only inside ``serve``.

Commands live beside this file: ``say.py``, ``serve.py``, ``control.py`` (status, rollback,
activate) and ``models.py`` (the ``models`` group).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any

import click

from .. import __version__
from ..errors import TtsdError
from . import control, fetching, models, say, serve
from .common import console

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """An error as one line: line breaks, control and format characters (from a daemon's or a
    mirror's answer, or a file name) become spaces, so no message spans lines or moves the cursor."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _say(markup: str) -> None:
    """One error line on stderr: rich markup on a terminal; under systemd, plain, with the error
    priority journald reads (``<3>``), so ``journalctl -p err`` shows why a daemon did not start
    (the line was filed as info)."""
    from ..logs import is_journal

    if is_journal(sys.stderr):
        from rich.text import Text

        sys.stderr.write("<3>" + Text.from_markup(markup).plain + "\n")
        sys.stderr.flush()
        return
    console().print(markup, markup=True, emoji=False)


def _usage_line(exc: click.UsageError, where: str) -> None:
    """A usage error as ttsd's one line, with click's words and where to look (not click's usage
    block: every other error is one line, and scripts read the first line of stderr). ``ttsd`` or
    ``ttsd models`` alone is no mistake to put on one line: its help, as click prints it."""
    from rich.markup import escape

    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()
        return

    _say(f"[bold red]error:[/] {escape(one_line(exc.format_message()))} (see '{escape(where)} --help')")


class TtsdGroup(click.Group):
    """Maps ttsd's errors to one clear line and a distinct exit code."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # ttsd's own options (``ttsd --bogus``), before any command
            if parent is not None or "--debug" in args:
                raise
            _usage_line(exc, info_name or "ttsd")
            raise click.exceptions.Exit(exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TtsdError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from rich.markup import escape

            _say(f"[bold red]error:[/] {escape(one_line(str(exc)))}")
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            console().print("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except click.UsageError as exc:  # a command's arguments: ttsd's one line, not click's usage block
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _usage_line(exc, exc.ctx.command_path if exc.ctx is not None else ctx.command_path)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from rich.markup import escape

            if isinstance(exc, OSError) and exc.errno is not None:  # the system's: a full disk, a bad path
                error = _system_error(exc)
                _say(f"[bold red]error:[/] {escape(one_line(str(error)))}")
                ctx.exit(error.exit_code)
            _say(  # a bug: say so in one line unless --debug
                f"[bold red]internal error:[/] {escape(one_line(f'{type(exc).__name__}: {exc}'))} "
                "(run 'ttsd --debug ...' for the traceback)"
            )
            ctx.exit(EXIT_INTERNAL)


def _system_error(exc: OSError) -> TtsdError:
    """An ``OSError`` no command handled, as one line: the box ran out of something (a full disk,
    an I/O error) is exit 12, a path that cannot be used (permission, missing, /proc) exit 3, a
    reader that left (``ttsd ... | head``) exit 12 as for ``-o -``."""
    from ..errors import ConfigError, ResourceError, is_system_oserror

    if exc.errno == errno.EPIPE:
        return ResourceError("writing stdout failed: its reader went away")
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    said = (exc.strerror or type(exc).__name__) + (f": {paths}" if paths else "")
    return ResourceError(said) if is_system_oserror(exc) else ConfigError(said)


@click.group(cls=TtsdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="ttsd")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """ttsd: a text-to-speech daemon for small offline boxes."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# the modules keep their names in this package (``ttsd.cli.say`` is the module, its command is
# ``ttsd.cli.say.say``), so patching or reading a module's helpers reaches the module
assert fetching  # imported for its commands, which join models.models
for command in (say.say, serve.serve, control.status, control.rollback, control.activate, models.models):
    main.add_command(command)


def run() -> None:
    """The ``ttsd`` program: ``main`` with click's exit handling, plus a fast exit for a process
    that spoke in-process. Tearing down an interpreter that has torch loaded took ~0.5 s on a
    2-core box (a fifth of the cold start), so once ``say`` has written its output (it sets
    ``fast_exit`` in the context object) the process ends with ``os._exit`` after flushing stdio."""
    from ..malloc import tune

    tune()  # before any thread starts: see ttsd.malloc
    state: dict[str, Any] = {}
    try:
        main(obj=state)
    except SystemExit as exc:
        if not state.get("fast_exit"):
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream
                stream.flush()
        os._exit(code)


__all__ = ["main", "run"]
