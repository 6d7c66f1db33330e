"""Commands that talk to the running daemon: ``status``, ``rollback``, ``activate``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from .common import SOCKET_HELP, FiniteRange, console, daemon_client, shown


def status_view(info: dict[str, Any], caption: str | None = None) -> Any:
    """``info`` (the daemon's ``/v1/status``) as a rich table: what ``ttsd status`` prints and
    ``--watch`` redraws. Every value from the daemon is shown as text, never as rich markup."""
    from rich.table import Table
    from rich.text import Text

    queue = info["queue"]
    table = Table(
        "voice",
        "active",
        "memory",
        "last used",
        "versions",
        caption=" · ".join(c for c in (_memory_line(info.get("memory")), caption) if c) or None,
        title=Text(
            f"ttsd {info['version']} pid {info['pid']}, up {info['uptime']:.0f} s, queue {queue['waiting']} waiting / "
            f"{queue['running']} running, {info['requests']['completed']} done, {info['requests']['failed']} failed"
        ),
    )
    now = time.time()
    for voice in info["voices"]:
        versions = ", ".join(
            f"{v['version']} {v['state']}"
            + (f" ({v['reason']})" if v["reason"] else "")
            + (f" [{v['in_flight']} in flight]" if v.get("in_flight") else "")
            for v in voice["versions"]
        )
        used = voice.get("last_used")
        table.add_row(  # (names and reasons may hold a folder's name: never a terminal escape)
            Text(shown(voice["name"]) + (" (default)" if voice["default"] else "")),
            Text(shown(voice["active"] or "-")),
            Text(shown(voice.get("residency") or "-")),
            Text(_ago(now - used) if used else "never"),
            Text(shown(versions)),
        )
    return table


class _ReaderLeft(Exception):
    """The watch's stdout is a pipe whose reader went away (``ttsd status -w | head``)."""


def _reader_left() -> None:
    """rich's broken-pipe handler (it exits 1 by default): stdout goes to /dev/null, so nothing
    fails again at exit, and the watch ends as Ctrl-C ends it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    raise _ReaderLeft


def watch(client: Any, interval: float) -> None:
    """Redraw the status every ``interval`` seconds until Ctrl-C, or until the reader of a pipe it
    prints into goes away (both return normally). On a terminal one table is redrawn in place
    (rich ``Live``); into a pipe or a file each frame is printed after the last, so the output is
    a log. A daemon that stops answering raises ``DaemonError``, after the last frame it gave."""
    from rich.console import Console
    from rich.live import Live

    out = Console(highlight=False)
    out.on_broken_pipe = _reader_left  # type: ignore[method-assign]

    def frame() -> Any:
        info = client.status()
        return status_view(info, caption=f"{time.strftime('%H:%M:%S')}, every {interval:g} s, Ctrl-C to stop")

    try:
        if out.is_terminal:
            with Live(frame(), console=out, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(frame(), refresh=True)
        else:
            while True:
                out.print(frame())
                out.print()
                try:
                    out.file.flush()
                except BrokenPipeError:
                    _reader_left()
                time.sleep(interval)
    except (KeyboardInterrupt, _ReaderLeft):
        return


@click.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option(
    "--watch", "-w", "watching", is_flag=True, help="Keep showing the status, redrawn every --interval, until Ctrl-C."
)
@click.option(
    "--interval",
    type=FiniteRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between redraws with --watch.",
)
def status(socket_path: Path | None, as_json: bool, watching: bool, interval: float) -> None:
    """Show the running daemon: voices (loaded, unloaded or loading within a memory budget, and
    when last used), versions, queue, requests, memory, uptime."""
    if as_json and watching:
        raise click.UsageError("--json and --watch do not go together")
    client = daemon_client(socket_path, timeout=10)
    if watching:
        watch(client, interval)
        return
    info = client.status()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console

    Console().print(status_view(info))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _memory_line(memory: dict[str, Any] | None) -> str | None:
    """``RSS 812 MB of 1536 MB, 3 of 3 versions loaded`` (the budget's parts that are set)."""
    if not memory:
        return None
    rss, budget, most = memory.get("rss_bytes") or 0, memory.get("budget_bytes"), memory.get("max_loaded")
    loaded = memory.get("loaded_versions", 0)
    parts = [
        f"RSS {rss / 2**20:.0f} MB" + (f" of {budget / 2**20:.0f} MB" if budget else ""),
        f"{loaded}"
        + (f" of {most}" if most else "")
        + (" version" if (most or loaded) == 1 else " versions")
        + " loaded",
    ]
    if memory.get("preload"):
        parts.append("preloaded: " + ", ".join(memory["preload"]))
    return ", ".join(parts)


def _only_voice(client: Any, voice: str | None) -> str:
    if voice is not None:
        return voice
    known = client.status()["voices"]
    # none active: a voice whose upgrade under --swap-policy memory has it serving nothing for now
    voices = [v["name"] for v in known if v["active"]] or [v["name"] for v in known]
    if not voices:
        raise ConfigError("the daemon has no voice yet: say which with --voice")
    if len(voices) != 1:
        raise click.UsageError(f"several voices are active ({', '.join(voices)}): say which with --voice")
    return voices[0]


@click.command()
@click.option("--voice", help="Voice to roll back (needed when several are active).")
@click.option("--to", "to", help="Version to go back to (default: the previous active one).")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET", help=SOCKET_HELP)
def rollback(voice: str | None, to: str | None, socket_path: Path | None) -> None:
    """Go back to the previous version of a voice, at once. The version rolled back from is
    never promoted again by itself (a newer one is)."""
    if to is not None and not to.strip():
        raise click.BadParameter("an empty version; leave --to out to go back to the previous one", param_hint="--to")
    if voice is not None and not voice.strip():
        raise click.BadParameter("an empty voice name", param_hint="--voice")
    client = daemon_client(socket_path)
    name = _only_voice(client, voice)
    result = client.control(name, "rollback", {"to": to} if to else {})
    console().print(f"{result['voice']}: {result['from']} -> {result['to']} in {result['seconds']:.2f} s", markup=False)


@click.command()
@click.argument("voice")
@click.argument("version")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET", help=SOCKET_HELP)
def activate(voice: str, version: str, socket_path: Path | None) -> None:
    """Serve VERSION of VOICE (any known version, re-verified; clears a rolled-back mark)."""
    client = daemon_client(socket_path)
    result = client.control(voice, "activate", {"version": version})
    console().print(f"{result['voice']}: {result['from']} -> {result['to']} in {result['seconds']:.2f} s", markup=False)
