"""The ``ttsd`` command. Thin: parse, build plain config, call the module that does the work.

Every ``TtsdError`` becomes one line on stderr and its own exit code (see ``ttsd.errors``);
a traceback appears only with ``--debug``. Nothing here imports torch: engines are loaded only
by the commands that synthesize.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import ConfigError, TtsdError

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

# Set once `ttsd say` has spoken in-process and written its output. Tearing down an interpreter that
# has torch loaded took ~0.5 s on a 2-core box (a fifth of the cold start), so run() ends such a
# process with os._exit once the output is on disk and stdio is flushed.
_fast_exit = False


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


class TtsdGroup(click.Group):
    """Maps ttsd's errors to one clear line and a distinct exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TtsdError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from rich.markup import escape

            _console().print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, emoji=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            _console().print("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # a bug: say so in one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from rich.markup import escape

            _console().print(
                f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')} "
                "(run 'ttsd --debug ...' for the traceback)",
                markup=True, emoji=False,
            )
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=TtsdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="ttsd")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """ttsd: a text-to-speech daemon for small offline boxes."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _read_text(text: str) -> str:
    if text == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            from .errors import RequestError

            raise RequestError(f"standard input is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text


@main.command()
@click.argument("text")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Audio file to write (.wav, .flac, .ogg or .mp3), or - for standard output (WAV).")
@click.option("--voice", help="Voice name (newest version); default: the daemon's default voice.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Use this model folder directly (in-process).")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_MODELS",
              help="Models directory to look up --voice in when running in-process [env TTSD_MODELS].")
@click.option("--speed", type=click.FloatRange(0.25, 4.0), default=1.0, show_default=True,
              help="Speaking speed; 2 is twice as fast.")
@click.option("--speaker", help="Speaker name or number, for voices with several.")
@click.option("--noise-scale", type=click.FloatRange(0, 2), help="Voice variation (model default if unset).")
@click.option("--noise-w", type=click.FloatRange(0, 2), help="Timing variation (model default if unset).")
@click.option("--seed", type=int, help="Fix the random variation, for repeatable output.")
@click.option("--max-chars", type=click.IntRange(1), default=5000, show_default=True, envvar="TTSD_MAX_CHARS",
              help="Refuse longer text (in-process; the daemon has its own limit).")
@click.option("--threads", type=click.IntRange(1), help="Torch threads in-process (default: all cores).")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET",
              help="Daemon socket [env TTSD_SOCKET].")
@click.option("--daemon/--no-daemon", "use_daemon", default=None,
              help="Require the running daemon, or never use it (default: daemon if it answers).")
@click.pass_context
def say(ctx: click.Context, text: str, output: str, voice: str | None, model_dir: Path | None,
        models_dir: Path | None, speed: float, speaker: str | None, noise_scale: float | None,
        noise_w: float | None, seed: int | None, max_chars: int, threads: int | None,
        socket_path: Path | None, use_daemon: bool | None) -> None:
    """Speak TEXT (- reads standard input) into an audio file.

    Uses the running daemon when its socket answers (fast: the model is already loaded), else
    loads the voice in this process."""
    from .config import default_socket
    from .formats import format_for_path

    fmt = format_for_path(output)
    text = _read_text(text)
    if model_dir is not None and use_daemon:
        raise ConfigError("--model loads a folder in-process; it cannot be combined with --daemon")
    if model_dir is None and use_daemon is not False:
        from .client import Client

        client = Client(socket_path or default_socket())
        if client.available():
            body: dict[str, Any] = {"text": text, "format": fmt, "speed": speed}
            for key, value in (("voice", voice), ("speaker", speaker), ("noise_scale", noise_scale),
                               ("noise_w", noise_w), ("seed", seed)):
                if value is not None:
                    body[key] = value
            started = time.perf_counter()
            headers, data = client.synthesize(body)
            _write_output(output, data)
            _console().print(
                f"{'stdout' if output == '-' else output}: {float(headers.get('x-ttsd-audio-seconds', 0)):.2f} s "
                f"of {fmt}, voice {headers.get('x-ttsd-voice')} {headers.get('x-ttsd-version')}, "
                f"via daemon in {time.perf_counter() - started:.2f} s", markup=False)
            return
        if use_daemon:
            from .errors import DaemonError

            raise DaemonError(f"no daemon answers on {client.socket_path} (start one with 'ttsd serve')")
    _say_in_process(text, output, fmt, voice, model_dir, models_dir, speed, speaker, noise_scale, noise_w,
                    seed, max_chars, threads)


def _write_output(output: str, data: bytes) -> None:
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    from .fsutil import SHARED, atomic_write_bytes

    try:
        atomic_write_bytes(Path(output), data, SHARED)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc


def _say_in_process(text: str, output: str, fmt: str, voice: str | None, model_dir: Path | None,
                    models_dir: Path | None, speed: float, speaker: str | None, noise_scale: float | None,
                    noise_w: float | None, seed: int | None, max_chars: int, threads: int | None) -> None:
    from .audio import encode
    from .config import Paths
    from .options import SynthesisOptions
    from .speak import open_engine, resolve_model

    console = _console()
    paths = Paths.resolve(models=models_dir)
    with console.status("preparing the voice…") as status:
        folder = resolve_model(paths, model_dir=model_dir, voice=voice,
                               progress=lambda msg: status.update(f"built-in voice: {msg}…"))
        started = time.perf_counter()
        engine = open_engine(folder, max_chars=max_chars, threads=threads)
        loaded = time.perf_counter()
        status.update("speaking…")
        options = SynthesisOptions(speed=speed, speaker=speaker, noise_scale=noise_scale,
                                   noise_scale_duration=noise_w, seed=seed)
        audio = engine.synthesize(text, options)
        done = time.perf_counter()
    _write_output(output, encode(audio, fmt))
    m = engine.manifest
    console.print(
        f"{'stdout' if output == '-' else output}: {audio.duration:.2f} s of {fmt} at {audio.sample_rate} Hz, "
        f"voice {m.name} {m.version}, load {loaded - started:.2f} s, synthesis {done - loaded:.2f} s",
        markup=False,
    )
    global _fast_exit
    _fast_exit = True


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def _parse_canary(value: str) -> tuple[str, float]:
    voice, _, share = value.rpartition("=")
    try:
        number = float(share)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise ConfigError(f"--canary {value!r}: expected a share between 0 and 1, e.g. 0.1 or myvoice=0.2")
    return voice or "*", number


def _read_token(path: Path) -> str:
    """The bearer token: printable ASCII, at least 16 characters. A file others can read is
    accepted with a warning (anyone who reads it can call the control routes)."""
    import logging
    import stat

    try:
        mode = path.stat().st_mode
        token = path.read_bytes().decode("ascii").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: the token must be printable ASCII text") from None
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise ConfigError(f"--token-file {path}: the token must be at least 16 printable characters, no spaces")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger("ttsd.cli").warning("--token-file %s can be read by other users (mode %03o); "
                                              "run: chmod 600 %s", path, stat.S_IMODE(mode), path)
    return token


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@main.command()
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_MODELS",
              help="Models directory [env TTSD_MODELS; default /models as root or if it exists].")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_STATE",
              help="State directory [env TTSD_STATE].")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_CACHE",
              help="Cache for the converted built-in voice [env TTSD_CACHE].")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET",
              help="Unix socket to serve HTTP on [env TTSD_SOCKET].")
@click.option("--socket-group", envvar="TTSD_SOCKET_GROUP", help="Make the socket 0660 for this group.")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_SPOOL",
              help="Spool directory for file requests (off unless given) [env TTSD_SPOOL].")
@click.option("--listen", envvar="TTSD_LISTEN", help="Also serve HTTP on HOST:PORT (loopback unless named).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), envvar="TTSD_TOKEN_FILE",
              help="Bearer token required on the TCP listener (mandatory off loopback).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, envvar="TTSD_WORKERS",
              help="Synthesis worker threads.")
@click.option("--threads", type=click.IntRange(1, 256), envvar="TTSD_THREADS",
              help="Torch intra-op threads (default: all cores).")
@click.option("--queue-size", type=click.IntRange(0, 10000), default=16, show_default=True,
              envvar="TTSD_QUEUE_SIZE", help="Requests that may wait; more get 503.")
@click.option("--max-chars", type=click.IntRange(1), default=5000, show_default=True, envvar="TTSD_MAX_CHARS",
              help="Longest text accepted (413 above).")
@click.option("--max-audio-seconds", type=click.FloatRange(1), envvar="TTSD_MAX_AUDIO_SECONDS",
              help="Longest audio one request may make, pauses included (413 above) [default: 0.12 s per "
                   "--max-chars character, 600 s for 5000: about three times what that much text takes].")
@click.option("--max-connections", type=click.IntRange(1, 100_000), default=128, show_default=True,
              envvar="TTSD_MAX_CONNECTIONS", help="Open connections per listener; more are closed at once.")
@click.option("--idle-timeout", type=click.FloatRange(0.1), default=15.0, show_default=True,
              envvar="TTSD_IDLE_TIMEOUT",
              help="Close a connection that sends no whole request this many seconds after connecting or an answer.")
@click.option("--grace", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds to finish in-flight requests on SIGTERM.")
@click.option("--default-voice", envvar="TTSD_DEFAULT_VOICE", help="Voice for requests that name none.")
@click.option("--no-seed", is_flag=True, help="Do not put the built-in voice into an empty models dir.")
@click.option("--keep", type=click.IntRange(0, 10), default=1, show_default=True,
              help="Previous versions kept loaded for instant rollback.")
@click.option("--swap-policy", type=click.Choice(["availability", "memory"]), default="availability",
              show_default=True, help="memory: unload the old version before loading the new (small boxes).")
@click.option("--canary", "canary", multiple=True, metavar="[VOICE=]SHARE",
              help="Send SHARE (0-1) of requests to a new version before promoting it; repeatable per voice.")
@click.option("--canary-requests", type=click.IntRange(1), default=20, show_default=True,
              help="Clean canary requests before full promotion.")
@click.option("--auto-rollback-requests", type=click.IntRange(0), default=20, show_default=True,
              help="Watch this many first requests of a new version (0 disables auto-rollback).")
@click.option("--auto-rollback-share", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Roll back when more than this share of them fail.")
@click.option("--settle", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds a new folder must stay unchanged before it is checked.")
@click.option("--incomplete-timeout", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Refuse a folder still incomplete after this many seconds unchanged.")
@click.option("--rescan-interval", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Look at the models dir this often even without file events.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, envvar="TTSD_LOG_LEVEL")
def serve(models_dir: Path | None, state_dir: Path | None, cache_dir: Path | None, socket_path: Path | None,
          socket_group: str | None, spool_dir: Path | None, listen: str | None, token_file: Path | None,
          workers: int, threads: int | None, queue_size: int, max_chars: int, max_audio_seconds: float | None,
          max_connections: int, idle_timeout: float, grace: float,
          default_voice: str | None, no_seed: bool, keep: int, swap_policy: str, canary: tuple[str, ...],
          canary_requests: int, auto_rollback_requests: int, auto_rollback_share: float, settle: float,
          incomplete_timeout: float, rescan_interval: float, log_level: str) -> None:
    """Run the daemon: HTTP on a Unix socket (and optionally TCP), plus an optional spool dir."""
    from . import logs
    from .config import (
        AUDIO_SECONDS_PER_CHAR,
        ServeConfig,
        default_cache_dir,
        default_models_dir,
        default_socket,
        default_state_dir,
    )

    logs.configure(log_level)
    bind = _parse_listen(listen) if listen else None
    token = _read_token(token_file) if token_file is not None else None
    if bind is not None and not _is_loopback(bind[0]) and token is None:
        raise ConfigError(f"--listen {bind[0]} is reachable from other machines: give --token-file too")
    config = ServeConfig(
        models=models_dir or default_models_dir(), state=state_dir or default_state_dir(),
        cache=cache_dir or default_cache_dir(), socket=socket_path or default_socket(),
        spool=spool_dir, listen=bind, token=token, socket_group=socket_group, workers=workers,
        threads=threads, queue_size=queue_size, max_chars=max_chars, grace=grace,
        max_audio_seconds=max_audio_seconds or round(max(60.0, AUDIO_SECONDS_PER_CHAR * max_chars)),
        max_connections=max_connections, idle_timeout=idle_timeout,
        default_voice=default_voice, seed_builtin=not no_seed, keep=keep, swap_policy=swap_policy,
        canary=tuple(_parse_canary(c) for c in canary), canary_requests=canary_requests,
        auto_rollback_requests=auto_rollback_requests, auto_rollback_share=auto_rollback_share,
        settle=settle, incomplete_timeout=incomplete_timeout, rescan_interval=rescan_interval,
    )
    from .daemon import Daemon

    code = Daemon(config).run()
    if code:
        sys.exit(code)


@main.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET",
              help="Daemon socket [env TTSD_SOCKET].")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(socket_path: Path | None, as_json: bool) -> None:
    """Show the running daemon: voices, versions, queue, requests, uptime."""
    from .client import Client
    from .config import default_socket
    from .errors import DaemonError

    client = Client(socket_path or default_socket(), timeout=10)
    if not client.available():
        raise DaemonError(f"no daemon answers on {client.socket_path}")
    info = client.status()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    queue = info["queue"]
    table = Table("voice", "active", "versions", title=(
        f"ttsd {info['version']} pid {info['pid']}, up {info['uptime']:.0f} s, queue {queue['waiting']} waiting / "
        f"{queue['running']} running, {info['requests']['completed']} done, {info['requests']['failed']} failed"))
    for voice in info["voices"]:
        versions = ", ".join(f"{v['version']} {v['state']}" + (f" ({v['reason']})" if v["reason"] else "")
                             for v in voice["versions"])
        table.add_row(voice["name"] + (" (default)" if voice["default"] else ""), voice["active"] or "-", versions)
    Console().print(table)


def _daemon_client(socket_path: Path | None) -> Any:
    from .client import Client
    from .config import default_socket
    from .errors import DaemonError

    client = Client(socket_path or default_socket(), timeout=600)
    if not client.available():
        raise DaemonError(f"no daemon answers on {client.socket_path} (start one with 'ttsd serve')")
    return client


def _only_voice(client: Any, voice: str | None) -> str:
    if voice is not None:
        return voice
    voices = [v["name"] for v in client.status()["voices"] if v["active"]]
    if len(voices) != 1:
        raise ConfigError(f"several voices are active ({', '.join(voices)}): say which with --voice")
    return voices[0]


@main.command()
@click.option("--voice", help="Voice to roll back (needed when several are active).")
@click.option("--to", "to", help="Version to go back to (default: the previous active one).")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET",
              help="Daemon socket [env TTSD_SOCKET].")
def rollback(voice: str | None, to: str | None, socket_path: Path | None) -> None:
    """Go back to the previous version of a voice, at once. The version rolled back from is
    never promoted again by itself (a newer one is)."""
    client = _daemon_client(socket_path)
    name = _only_voice(client, voice)
    _, data = client.call("POST", f"/v1/voices/{name}/rollback", {"to": to} if to else {})
    result = json.loads(data)
    _console().print(f"{result['voice']}: {result['from']} -> {result['to']} in {result['seconds']:.2f} s",
                     markup=False)


@main.command()
@click.argument("voice")
@click.argument("version")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET",
              help="Daemon socket [env TTSD_SOCKET].")
def activate(voice: str, version: str, socket_path: Path | None) -> None:
    """Serve VERSION of VOICE (any known version, re-verified; clears a rolled-back mark)."""
    client = _daemon_client(socket_path)
    _, data = client.call("POST", f"/v1/voices/{voice}/activate", {"version": version})
    result = json.loads(data)
    _console().print(f"{result['voice']}: {result['from']} -> {result['to']} in {result['seconds']:.2f} s",
                     markup=False)


@main.group()
def models() -> None:
    """Make, check and list model folders."""


@models.command("import-piper")
@click.argument("onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Voice name (default: the .onnx file name).")
@click.option("--version", "version", default="1", show_default=True, help="PEP 440 version of this folder.")
@click.option("--license", "license_", default="", help="Licence text to record in the manifest.")
def import_piper_cmd(onnx: Path, out_dir: Path, name: str | None, version: str, license_: str) -> None:
    """Convert a Piper voice (VOICE.onnx + VOICE.onnx.json) into a ttsd model folder."""
    from .voices import import_piper

    console = _console()
    with console.status("importing…") as status:
        manifest = import_piper(onnx, out_dir, name=name, version=version, license=license_,
                                progress=lambda msg: status.update(f"{msg}…"))
    console.print(f"{out_dir}: voice {manifest.name} {manifest.version}, {len(manifest.files)} files", markup=False)


@models.command("pack")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Voice name.")
@click.option("--version", "version", required=True, help="PEP 440 version, e.g. 1 or 2.1.")
@click.option("--engine", default="vits", show_default=True, help="Engine that loads this folder.")
@click.option("--sample-rate", type=click.IntRange(1), help="Default: sampling_rate from config.json.")
@click.option("--warmup", multiple=True, help="Warm-up sentence (repeatable).")
@click.option("--description", default="")
@click.option("--license", "license_", default="")
def pack_cmd(folder: Path, name: str, version: str, engine: str, sample_rate: int | None,
             warmup: tuple[str, ...], description: str, license_: str) -> None:
    """Write the checksummed manifest (ttsd.json) for FOLDER, e.g. a downloaded MMS-TTS checkpoint."""
    from .engines import engine_class
    from .manifest import pack

    engine_class(engine)  # refuse an engine that is not installed before hashing gigabytes
    if sample_rate is None:
        try:
            sample_rate = int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["sampling_rate"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{folder}: give --sample-rate (no sampling_rate in config.json)") from None
    manifest = pack(folder, name=name, version=version, engine=engine, sample_rate=sample_rate,
                    warmup=warmup, description=description, license=license_)
    _console().print(f"{folder}/ttsd.json: {manifest.name} {manifest.version}, {len(manifest.files)} files",
                     markup=False)


@models.command("verify")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def verify_cmd(folder: Path) -> None:
    """Check FOLDER against its manifest; say exactly which file is missing, extra or wrong."""
    from .engines import engine_class
    from .errors import VerifyError
    from .manifest import verify

    try:
        manifest = verify(folder)
    except VerifyError as exc:
        console = _console()
        for problem in exc.problems[1:]:
            console.print(f"  {problem}", markup=False)
        raise
    engine_class(manifest.engine)
    _console().print(f"{folder}: ok ({manifest.name} {manifest.version}, {len(manifest.files)} files verified)",
                     markup=False)


@models.command("list")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_MODELS",
              help="Models directory [env TTSD_MODELS].")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET",
              help="Daemon socket [env TTSD_SOCKET].")
@click.option("--verify/--no-verify", "check", default=False, help="Without a daemon: check every checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(models_dir: Path | None, socket_path: Path | None, check: bool, as_json: bool) -> None:
    """Every version of every voice and its state (from the running daemon, else from disk)."""
    from rich.console import Console
    from rich.table import Table

    from .client import Client
    from .config import Paths, default_socket

    client = Client(socket_path or default_socket(), timeout=30)
    rows: list[tuple[str, str, str, str]] = []
    if client.available():
        info = client.status()
        title = f"daemon pid {info['pid']}: {info['models']}"
        for voice in info["voices"]:
            for v in voice["versions"]:
                rows.append((voice["name"], v["version"], v["state"], v["reason"] or ""))
        for folder in info["folders"]:
            rows.append((Path(folder["folder"]).name, "-", folder["state"], folder["reason"]))
    else:
        from .catalog import scan
        from .manifest import verify

        paths = Paths.resolve(models=models_dir)
        title = f"{paths.models} (no daemon running)"
        for cand in scan(paths.models):
            m = cand.manifest
            state, reason = ("on disk", "") if m is not None else ("unreadable", cand.problem)
            if m is not None and check:
                try:
                    verify(cand.folder)
                    state = "verified"
                except TtsdError as exc:
                    state, reason = "refused", str(exc)
            rows.append((m.name if m else cand.folder.name, m.version if m else "-", state, reason))
    if as_json:
        fields = ("voice", "version", "state", "reason")
        click.echo(json.dumps([dict(zip(fields, r, strict=True)) for r in rows], indent=2))
        return
    table = Table("voice", "version", "state", "reason", title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@models.command("builtin")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), envvar="TTSD_CACHE",
              help="Where converted voices are cached [env TTSD_CACHE].")
def builtin_cmd(cache: Path | None) -> None:
    """Print the folder of the built-in voice, converting it first if needed."""
    from .config import Paths
    from .voices import builtin_model

    console = _console()
    with console.status("built-in voice…") as status:
        folder = builtin_model(Paths.resolve(cache=cache).cache, progress=lambda msg: status.update(f"{msg}…"))
    click.echo(str(folder))


def run() -> None:
    """The ``ttsd`` program: ``main`` with click's exit handling, plus the fast exit (``_fast_exit``)."""
    from .malloc import tune

    tune()  # before any thread starts: see ttsd.malloc
    try:
        main()
    except SystemExit as exc:
        if not _fast_exit:
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that went away, a closed stream: nothing to keep
                pass
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
