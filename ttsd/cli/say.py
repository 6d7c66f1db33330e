"""``ttsd say``: speak text into a file, through the running daemon when one answers (the model is
already loaded), else in this process."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from ..errors import DaemonError, RequestError
from ..options import SynthesisOptions
from .common import (
    PRECISION_CHOICES,
    PRECISION_HELP,
    SOCKET_HELP,
    FiniteRange,
    check_output,
    console,
    daemon_client,
    write_output,
)


@dataclass(frozen=True)
class Speech:
    """What to say and where to put it, whichever way it is spoken."""

    text: str
    output: str  # a path, or - for stdout
    fmt: str
    voice: str | None
    options: SynthesisOptions

    def body(self) -> dict[str, Any]:
        """The request body for the daemon's ``POST /v1/synthesize``."""
        names = {"noise_scale_duration": "noise_w"}
        body: dict[str, Any] = {"text": self.text, "format": self.fmt, "voice": self.voice}
        for key, value in asdict(self.options).items():
            if key not in ("sentence_pause", "normalize"):
                body[names.get(key, key)] = value
        return {k: v for k, v in body.items() if v is not None}

    @property
    def shown(self) -> str:
        """The output as the success line names it: a character that cannot be printed (a line
        break in a file's name) escaped, so the line stays one line and names the file."""
        if self.output == "-":
            return "stdout"
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in self.output)


MAX_STDIN = 1 << 20  # bytes of text read from stdin: the daemon's whole request body may be no more


def _read_text(text: str) -> str:
    if text == "-":
        data = sys.stdin.buffer.read(MAX_STDIN + 1)  # never all of an endless stream (`yes |`)
        if len(data) > MAX_STDIN:
            raise RequestError(f"standard input is over {MAX_STDIN} bytes: more text than one request may carry")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"standard input is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text


@click.command()
@click.argument("text")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Audio file to write (.wav, .flac, .ogg, .mp3, .opus or .aac), or - for standard output (WAV).",
)
@click.option("--voice", help="Voice name (newest version); default: the daemon's default voice.")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use this model folder directly (in-process).",
)
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_MODELS",
    help="Models directory to look up --voice in when running in-process [env TTSD_MODELS].",
)
@click.option(
    "--speed",
    type=FiniteRange(0.25, 4.0),
    default=1.0,
    show_default=True,
    help="Speaking speed; 2 is twice as fast.",
)
@click.option("--speaker", help="Speaker name or number, for voices with several.")
@click.option("--noise-scale", type=FiniteRange(0, 2), help="Voice variation (model default if unset).")
@click.option("--noise-w", type=FiniteRange(0, 2), help="Timing variation (model default if unset).")
@click.option("--seed", type=click.IntRange(0, (1 << 64) - 1), help="Fix the random variation, for repeatable output.")
@click.option(
    "--max-chars",
    type=click.IntRange(1),
    default=5000,
    show_default=True,
    envvar="TTSD_MAX_CHARS",
    help="Refuse longer text (the daemon has its own limit: through it, only a limit given here counts).",
)
@click.option("--threads", type=click.IntRange(1), help="Torch threads in-process (default: all cores).")
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="auto",
    show_default=True,
    envvar="TTSD_PRECISION",
    help=f"In-process: {PRECISION_HELP} The daemon uses its own.",
)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET", help=SOCKET_HELP)
@click.option(
    "--daemon/--no-daemon",
    "use_daemon",
    default=None,
    help="Require the running daemon, or never use it (default: daemon if it answers).",
)
@click.pass_context
def say(
    ctx: click.Context,
    text: str,
    output: str,
    voice: str | None,
    model_dir: Path | None,
    models_dir: Path | None,
    speed: float,
    speaker: str | None,
    noise_scale: float | None,
    noise_w: float | None,
    seed: int | None,
    max_chars: int,
    threads: int | None,
    precision: str,
    socket_path: Path | None,
    use_daemon: bool | None,
) -> None:
    """Speak TEXT (- reads standard input) into an audio file.

    Uses the running daemon when its socket answers (fast: the model is already loaded), else
    loads the voice in this process."""
    from ..formats import format_for_path

    if model_dir is not None and use_daemon:  # a command line's mistake (exit 2), before anything is read
        raise click.UsageError("--model loads a folder in-process; it cannot be combined with --daemon")
    fmt = format_for_path(output)  # an unknown suffix is refused before stdin is read
    check_output(output)  # and a place no file can be written, before any synthesis
    options = SynthesisOptions(
        speed=speed, speaker=speaker, noise_scale=noise_scale, noise_scale_duration=noise_w, seed=seed
    )
    speech = Speech(_read_text(text), output, fmt, voice, options)
    if model_dir is None and use_daemon is not False:
        client = daemon_client(socket_path, timeout=300, required=False)
        if client.available():
            if ctx.get_parameter_source("max_chars") is not click.core.ParameterSource.DEFAULT:
                from ..text import check_text

                check_text(speech.text, max_chars)  # a limit the user gave holds through the daemon too
            _via_daemon(client, speech)
            return
        if use_daemon:
            raise DaemonError(f"no daemon answers on {client.socket_path} (start one with 'ttsd serve')")
    _in_process(
        speech, model_dir=model_dir, models_dir=models_dir, max_chars=max_chars, threads=threads, precision=precision
    )
    ctx.obj["fast_exit"] = True  # the output is on disk: see ttsd.cli.run


def _via_daemon(client: Any, speech: Speech) -> None:
    started = time.perf_counter()
    headers, data = client.synthesize(speech.body())
    write_output(speech.output, data)
    console().print(
        f"{speech.shown}: {float(headers.get('x-ttsd-audio-seconds', 0)):.2f} s of {speech.fmt}, voice "
        f"{headers.get('x-ttsd-voice')} {headers.get('x-ttsd-version')}, via daemon in "
        f"{time.perf_counter() - started:.2f} s",
        markup=False,
    )


def _in_process(
    speech: Speech,
    *,
    model_dir: Path | None,
    models_dir: Path | None,
    max_chars: int,
    threads: int | None,
    precision: str,
) -> None:
    from ..audio import concat, encode
    from ..config import KERNEL_CACHE, Paths
    from ..encoding import check_available
    from ..engines.threads import BUSY, load_threads
    from ..speak import open_engine, resolve_model
    from ..text import check_text

    check_text(speech.text, max_chars)  # text that cannot be spoken is refused before a voice loads
    check_available(speech.fmt)  # so is a format this box has no encoder for (aac without PyAV)
    out = console()
    with out.status("preparing the voice…") as status:
        paths = Paths.resolve(models=models_dir)
        folder = resolve_model(
            paths,
            model_dir=model_dir,
            voice=speech.voice,
            progress=lambda msg: status.update(f"built-in voice: {msg}…"),
            note=lambda msg: out.print(f"note: {msg}", markup=False),
        )
        started = time.perf_counter()
        BUSY.cores()  # a first reading: the speech sees how busy the box was during the load
        engine = open_engine(
            folder, max_chars=max_chars, threads=threads, precision=precision, kernel_cache=paths.cache / KERNEL_CACHE
        )
        loaded = time.perf_counter()
        status.update("speaking…")
        # as the daemon's requests: each piece on the cores other programs leave free
        with load_threads(engine.synthesize_stream(speech.text, speech.options)) as steps:
            audio = concat(list(steps))
        done = time.perf_counter()
    write_output(speech.output, encode(audio, speech.fmt))
    m = engine.manifest
    computed_in = engine.info().get("precision")
    computes = f" in {computed_in}" if computed_in else ""
    out.print(
        f"{speech.shown}: {audio.duration:.2f} s of {speech.fmt} at {audio.sample_rate} Hz, voice {m.name} "
        f"{m.version}{computes}, load {loaded - started:.2f} s, synthesis {done - loaded:.2f} s",
        markup=False,
    )
