"""``ttsd serve``: flags and environment into a frozen ``ServeConfig``, then the daemon. The
listening policy lives here: TCP off loopback needs a bearer token, read from a file."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import default_cache_dir, default_models_dir, default_socket, default_state_dir
from .common import PRECISION_CHOICES, PRECISION_HELP, FiniteRange, box_id_value, trusted_keys_option
from .serve_args import parse_budget, parse_canary, parse_listen, parse_wyoming, read_token, zeroconf_name


@click.command()
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_MODELS",
    help=f"Models directory [env TTSD_MODELS; default here: {default_models_dir()}; /models as root].",
)
@click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_STATE",
    help=f"State directory [env TTSD_STATE; default here: {default_state_dir()}].",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_CACHE",
    help=f"Cache for the converted built-in voice [env TTSD_CACHE; default here: {default_cache_dir()}].",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    envvar="TTSD_SOCKET",
    help=f"Unix socket to serve HTTP on [env TTSD_SOCKET; default here: {default_socket()}].",
)
@click.option("--socket-group", envvar="TTSD_SOCKET_GROUP", help="Make the socket 0660 for this group.")
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_SPOOL",
    help="Spool directory for file requests (off unless given) [env TTSD_SPOOL].",
)
@click.option(
    "--spool-keep-days",
    type=FiniteRange(0, 36500),
    default=7.0,
    show_default=True,
    envvar="TTSD_SPOOL_KEEP_DAYS",
    metavar="DAYS",
    help="Remove the spool's answers (out/, done/, failed/) after this many days; 0 keeps them "
    "for ever [env TTSD_SPOOL_KEEP_DAYS].",
)
@click.option(
    "--listen",
    envvar="TTSD_LISTEN",
    metavar="HOST:PORT",
    help="Also serve HTTP on TCP (loopback unless a host is named; off it, --token-file is required).",
)
@click.option(
    "--metrics-listen",
    envvar="TTSD_METRICS_LISTEN",
    metavar="HOST:PORT",
    help="Also serve /metrics alone, without the token, on HOST:PORT (loopback unless named): for a "
    "Prometheus that cannot send the bearer token.",
)
@click.option(
    "--wyoming",
    "wyoming_uri",
    envvar="TTSD_WYOMING",
    metavar="URI",
    help="Also serve the Wyoming protocol (Home Assistant) on tcp://HOST:PORT or unix://PATH. "
    "Wyoming has no authentication: other hosts than loopback are allowed, with a warning.",
)
@click.option(
    "--wyoming-zeroconf",
    "wyoming_zeroconf",
    is_flag=False,
    flag_value="ttsd",
    default=None,
    metavar="[NAME]",
    help="Announce the Wyoming TCP service over mDNS for Home Assistant's discovery "
    "(name default 'ttsd'; needs the zeroconf extra).",
)
@click.option(
    "--box-id",
    envvar="TTSD_BOX_ID",
    metavar="ID",
    callback=box_id_value,
    help="This box's id in a fleet (1-64 letters, digits, '-', '_', '.'), exported as ttsd_box_info "
    "[env TTSD_BOX_ID; default: derived from /etc/machine-id, which is never shown, else a random id "
    "kept in the state dir].",
)
@trusted_keys_option(
    "Load only model folders signed (model.sig) by one of the public keys (*.pem) in this dir "
    "[env TTSD_TRUSTED_KEYS; needs the signing extra]."
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),  # a directory is read_token's one line, exit 3 (a bind mount not there yet)
    envvar="TTSD_TOKEN_FILE",
    help="Bearer token required on the TCP listener (mandatory off loopback).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    envvar="TTSD_WORKERS",
    help="Synthesis worker threads.",
)
@click.option(
    "--threads", type=click.IntRange(1, 256), envvar="TTSD_THREADS", help="Torch intra-op threads (default: all cores)."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="auto",
    show_default=True,
    envvar="TTSD_PRECISION",
    help=PRECISION_HELP,
)
@click.option(
    "--queue-size",
    type=click.IntRange(0, 10000),
    default=16,
    show_default=True,
    envvar="TTSD_QUEUE_SIZE",
    help="Requests that may wait; more get 503.",
)
@click.option(
    "--max-chars",
    type=click.IntRange(1),
    default=5000,
    show_default=True,
    envvar="TTSD_MAX_CHARS",
    help="Longest text accepted (413 above).",
)
@click.option(
    "--max-audio-seconds",
    type=FiniteRange(1),
    envvar="TTSD_MAX_AUDIO_SECONDS",
    help="Longest audio one request may make, pauses included (413 above) [default: 0.12 s per "
    "--max-chars character, at least 60 s; 600 s for 5000: about three times what that much text takes].",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 100_000),
    default=128,
    show_default=True,
    envvar="TTSD_MAX_CONNECTIONS",
    help="Open connections per listener; more are closed at once.",
)
@click.option(
    "--idle-timeout",
    type=FiniteRange(0.1),
    default=15.0,
    show_default=True,
    envvar="TTSD_IDLE_TIMEOUT",
    help="Close a connection that sends no whole request this many seconds after connecting or an answer.",
)
@click.option(
    "--write-timeout",
    type=FiniteRange(0.1),
    default=60.0,
    show_default=True,
    envvar="TTSD_WRITE_TIMEOUT",
    help="Close a connection whose client leaves its answer unread this many seconds (its slot and "
    "buffered audio freed, its synthesis stopped).",
)
@click.option(
    "--grace",
    type=FiniteRange(0),
    default=30.0,
    show_default=True,
    help="Seconds to finish in-flight requests on SIGTERM.",
)
@click.option("--default-voice", envvar="TTSD_DEFAULT_VOICE", help="Voice for requests that name none.")
@click.option("--no-seed", is_flag=True, help="Do not put the built-in voice into an empty models dir.")
@click.option(
    "--keep",
    type=click.IntRange(0, 10),
    default=1,
    show_default=True,
    help="Previous versions kept loaded for instant rollback.",
)
@click.option(
    "--swap-policy",
    type=click.Choice(["availability", "memory"]),
    default="availability",
    show_default=True,
    help="memory: unload the old version before loading the new (small boxes).",
)
@click.option(
    "--canary",
    "canary",
    multiple=True,
    metavar="[VOICE=]SHARE",
    envvar="TTSD_CANARY",
    help="Send SHARE (0-1) of requests to a new version before promoting it; repeatable per voice "
    "[env TTSD_CANARY: space-separated].",
)
@click.option(
    "--canary-requests",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Clean canary requests before full promotion.",
)
@click.option(
    "--auto-rollback-requests",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="Watch this many first requests of a new version (0 disables auto-rollback).",
)
@click.option(
    "--auto-rollback-share",
    type=FiniteRange(0, 1),
    default=0.25,
    show_default=True,
    help="Roll back when more than this share of them fail.",
)
@click.option(
    "--max-loaded",
    type=click.IntRange(1),
    envvar="TTSD_MAX_LOADED",
    metavar="N",
    help="Keep at most N versions loaded (rollback targets and canaries count): voices load on first "
    "use and the least recently used idle one is unloaded [default: no limit].",
)
@click.option(
    "--memory-budget",
    envvar="TTSD_MEMORY_BUDGET",
    metavar="SIZE",
    help="Keep the process's measured RSS within SIZE (e.g. 1.5G, 800M) the same way [default: no limit].",
)
@click.option(
    "--preload",
    multiple=True,
    envvar="TTSD_PRELOAD",
    metavar="VOICE",
    help="With a budget: keep VOICE loaded at all times; repeatable [default: the default voice].",
)
@click.option(
    "--load-wait",
    type=FiniteRange(0.1),
    default=30.0,
    show_default=True,
    envvar="TTSD_LOAD_WAIT",
    help="With a budget: seconds a request waits for its voice to load before 503.",
)
@click.option(
    "--settle",
    type=FiniteRange(0),
    default=1.0,
    show_default=True,
    help="Seconds a new folder must stay unchanged before it is checked.",
)
@click.option(
    "--incomplete-timeout",
    type=FiniteRange(0),
    default=60.0,
    show_default=True,
    help="Refuse a folder still incomplete after this many seconds unchanged.",
)
@click.option(
    "--rescan-interval",
    type=FiniteRange(0.1),
    default=5.0,
    show_default=True,
    help="Look at the models dir this often even without file events.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="TTSD_LOG_LEVEL",
    help="Least severe records logged (debug adds which version each user key got in a canary).",
)
@click.option(
    "--access-log",
    is_flag=True,
    envvar="TTSD_ACCESS_LOG",
    help="Log each HTTP request (peer, request line, status, bytes, seconds) as ttsd.access.",
)
def serve(
    models_dir: Path | None,
    state_dir: Path | None,
    cache_dir: Path | None,
    socket_path: Path | None,
    socket_group: str | None,
    spool_dir: Path | None,
    spool_keep_days: float,
    listen: str | None,
    metrics_listen: str | None,
    wyoming_uri: str | None,
    wyoming_zeroconf: str | None,
    box_id: str | None,
    trusted_keys: Path | None,
    token_file: Path | None,
    workers: int,
    threads: int | None,
    precision: str,
    queue_size: int,
    max_chars: int,
    max_audio_seconds: float | None,
    max_connections: int,
    idle_timeout: float,
    write_timeout: float,
    grace: float,
    default_voice: str | None,
    no_seed: bool,
    keep: int,
    swap_policy: str,
    canary: tuple[str, ...],
    canary_requests: int,
    auto_rollback_requests: int,
    auto_rollback_share: float,
    settle: float,
    incomplete_timeout: float,
    rescan_interval: float,
    max_loaded: int | None,
    memory_budget: str | None,
    preload: tuple[str, ...],
    load_wait: float,
    log_level: str,
    access_log: bool,
) -> None:
    """Run the daemon: HTTP on a Unix socket (and optionally TCP), plus an optional spool dir."""
    from .. import logs
    from ..config import (
        AUDIO_SECONDS_PER_CHAR,
        ServeConfig,
        default_cache_dir,
        default_models_dir,
        default_socket,
        default_state_dir,
        is_loopback,
    )

    logs.configure(log_level, access_log=access_log)
    bind = parse_listen(listen) if listen else None
    token = read_token(token_file) if token_file is not None else None
    if bind is not None and not is_loopback(bind[0]) and token is None:
        raise click.UsageError(f"--listen {bind[0]} is reachable from other machines: give --token-file too")
    config = ServeConfig(
        models=models_dir or default_models_dir(),
        state=state_dir or default_state_dir(),
        cache=cache_dir or default_cache_dir(),
        socket=socket_path or default_socket(),
        spool=spool_dir,
        spool_keep_days=spool_keep_days,
        listen=bind,
        metrics_listen=parse_listen(metrics_listen, "--metrics-listen") if metrics_listen else None,
        token=token,
        socket_group=socket_group,
        workers=workers,
        threads=threads,
        precision=precision,
        queue_size=queue_size,
        max_chars=max_chars,
        grace=grace,
        max_audio_seconds=max_audio_seconds or round(max(60.0, AUDIO_SECONDS_PER_CHAR * max_chars)),
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        write_timeout=write_timeout,
        default_voice=default_voice,
        seed_builtin=not no_seed,
        keep=keep,
        swap_policy=swap_policy,
        canary=tuple(parse_canary(c) for c in canary),
        canary_requests=canary_requests,
        auto_rollback_requests=auto_rollback_requests,
        auto_rollback_share=auto_rollback_share,
        settle=settle,
        incomplete_timeout=incomplete_timeout,
        rescan_interval=rescan_interval,
        wyoming=parse_wyoming(wyoming_uri) if wyoming_uri else None,
        wyoming_zeroconf=zeroconf_name(wyoming_zeroconf, wyoming_uri),
        trusted_keys=trusted_keys,
        max_loaded=max_loaded,
        memory_budget=parse_budget(memory_budget),
        preload=tuple(preload),
        load_wait=load_wait,
        box_id=box_id,
    )
    from ..daemon import Daemon

    code = Daemon(config).run()
    if code:
        sys.exit(code)
