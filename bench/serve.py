"""Throughput and latency of ``ttsd serve`` for short requests, and its overhead over in-process use.

One run starts a daemon (built-in voice en_US-joe-medium) in a subprocess on temp dirs and measures:

* ``POST /v1/synthesize`` of a short sentence (WAV, seed 0) at client concurrency 1, 2 and 4
  (threads, a new connection per request), ``--requests`` per level after a few warm-up requests:
  requests/s and p50/p99 of the client-side wall time per request;
* overhead over in-process synthesis: ``--requests`` daemon requests (concurrency 1) alternating
  with in-process ``engine.synthesize`` calls (same text, seed, thread count) in this process;
  overhead = p50(client latency) - p50(in-process). Second view: p50(client latency -
  X-Ttsd-Synthesis-Seconds), everything but the worker's synthesis. Goal: <= 5 ms;
* ``ttsd say "Hello there." -o x.wav`` through the daemon (``TTSD_SOCKET`` set): median wall time
  of 5 fresh processes after a warm-up one. Goal: <= 0.3 s;
* the daemon must exit 0 on SIGTERM.

``--matrix`` runs only the load levels, for the (workers, threads) layouts (1,2), (2,1), (2,2) and
(1,1), one daemon each, to choose the default layout by measurement. The machine may be shared:
the 1-minute load average is printed at start and end. Run from the repository root::

    .venv/bin/python bench/serve.py [--workers 1] [--threads 2] [--requests 40] [--json out.json]
    .venv/bin/python bench/serve.py --matrix [--requests 20]

The cache (the converted built-in voice, ~5 s to make once) is ``$TTSD_CACHE`` or
/tmp/ttsd-bench-cache unless ``--cache`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import cache_dir, command_line, finish

from ttsd.testing import Daemon, cpu_name, pct, request

SHORT = "Turn on the kitchen lights."
SAY_TEXT = "Hello there."
LEVELS = (1, 2, 4)
LAYOUTS = ((1, 2), (2, 1), (2, 2), (1, 1))
WARMUP = 4  # requests before each level (at that level's concurrency)
SAY_RUNS = 5
SETTLE_S = 0.05  # pause between alternating daemon / in-process calls so idle OpenMP threads stop spinning


def synth(sock: str, text: str = SHORT) -> tuple[float, float]:
    """One request on a fresh connection: (client wall seconds, X-Ttsd-Synthesis-Seconds)."""
    started = time.perf_counter()
    status, headers, data = request(sock, "POST", "/v1/synthesize", {"text": text, "format": "wav", "seed": 0})
    elapsed = time.perf_counter() - started
    if status != 200 or len(data) < 1000:
        raise RuntimeError(f"synthesize answered {status}: {data[:200]!r}")
    return elapsed, float(headers["x-ttsd-synthesis-seconds"])


def levels(sock: str, requests: int) -> dict[str, dict[str, float]]:
    """Each client concurrency level: WARMUP requests, then ``requests`` timed ones."""
    result = {}
    for concurrency in LEVELS:
        print(f"  concurrency {concurrency}: {WARMUP} warm-up + {requests} requests…", flush=True)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(lambda _: synth(sock), range(WARMUP)))
            started = time.perf_counter()
            samples = list(pool.map(lambda _: synth(sock), range(requests)))
            wall = time.perf_counter() - started
        latencies = [s[0] for s in samples]
        result[str(concurrency)] = {"rps": requests / wall, "p50_ms": pct(latencies, 50) * 1e3,
                                    "p99_ms": pct(latencies, 99) * 1e3,
                                    "synth_p50_ms": pct([s[1] for s in samples], 50) * 1e3}
    return result


def overhead(sock: str, cache: Path, threads: int, requests: int) -> dict[str, float]:
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    engine = open_engine(builtin_model(cache), threads=threads)
    options = SynthesisOptions(seed=0)
    for _ in range(WARMUP):
        engine.synthesize(SHORT, options)
        synth(sock)
    client: list[float] = []
    server_side: list[float] = []  # client latency - X-Ttsd-Synthesis-Seconds
    local: list[float] = []
    for index in range(requests):
        for daemon_turn in (True, False) if index % 2 == 0 else (False, True):  # alternate who goes first
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            if daemon_turn:
                wall, synth_s = synth(sock)
                client.append(wall)
                server_side.append(wall - synth_s)
            else:
                engine.synthesize(SHORT, options)
                local.append(time.perf_counter() - started)
    return {"client_p50_ms": pct(client, 50) * 1e3, "in_process_p50_ms": pct(local, 50) * 1e3,
            "overhead_ms": (pct(client, 50) - pct(local, 50)) * 1e3,
            "latency_minus_synth_p50_ms": pct(server_side, 50) * 1e3}


def say_time(sock: str) -> dict[str, float]:
    ttsd_bin = str(Path(sys.executable).with_name("ttsd"))
    env = {**os.environ, "TTSD_SOCKET": sock}
    times: dict[str, list[float]] = {"say": [], "python": []}
    with tempfile.TemporaryDirectory(prefix="ttsd-bench-say-") as tmp:
        for index in range(SAY_RUNS + 1):  # the first round only warms the page cache
            started = time.perf_counter()
            done = subprocess.run([ttsd_bin, "say", SAY_TEXT, "-o", f"{tmp}/x.wav"], env=env,
                                  capture_output=True, text=True, check=True)
            elapsed = time.perf_counter() - started
            if "via daemon" not in done.stderr:
                raise RuntimeError(f"ttsd say did not use the daemon: {done.stderr}")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            if index:
                times["say"].append(elapsed)
                times["python"].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown(result: dict[str, Any]) -> str:
    la = f"1-min load average {result['load_start']:.2f} at start, {result['load_end']:.2f} at end"
    head = [f"`{result['command']}`", "",
            f"{cpu_name()}, Python {sys.version.split()[0]}; text {SHORT!r}, WAV, seed 0, a new "
            f"connection per request; {result['requests']} requests per level after {WARMUP} warm-up; {la}.", ""]
    if "matrix" in result:
        head += ["| workers | threads | c=1 req/s | c=1 p50 ms | c=1 p99 ms | c=4 req/s | c=4 p50 ms | c=4 p99 ms "
                 "| exit |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["matrix"]:
            one, four = row["levels"]["1"], row["levels"]["4"]
            head.append(f"| {row['workers']} | {row['threads']} | {one['rps']:.2f} | {one['p50_ms']:.0f} | "
                        f"{one['p99_ms']:.0f} | {four['rps']:.2f} | {four['p50_ms']:.0f} | {four['p99_ms']:.0f} | {row['exit_code']} |")
        return "\n".join(head)
    head[2] = f"Daemon: {result['workers']} worker(s), {result['threads']} torch thread(s). " + head[2]
    head += ["| Client concurrency | req/s | p50 latency (ms) | p99 latency (ms) | p50 synthesis (ms) |",
             "|---:|---:|---:|---:|---:|"]
    for level, row in result["levels"].items():
        head.append(f"| {level} | {row['rps']:.2f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                    f"{row['synth_p50_ms']:.1f} |")
    o, s = result["overhead"], result["say"]
    head += ["", "| Measure | value | goal |", "|---|---:|---:|",
             f"| p50 client latency, concurrency 1, alternating (ms) | {o['client_p50_ms']:.1f} | |",
             f"| p50 in-process `engine.synthesize`, same text/threads (ms) | {o['in_process_p50_ms']:.1f} | |",
             f"| Overhead: difference of the two p50s (ms) | {o['overhead_ms']:.1f} | <= 5 |",
             f"| Overhead: p50 of (latency - X-Ttsd-Synthesis-Seconds) (ms) | "
             f"{o['latency_minus_synth_p50_ms']:.1f} | <= 5 |",
             f'| `ttsd say "{SAY_TEXT}" -o x.wav` via daemon, median of {SAY_RUNS} (s) | {s["say"]:.3f} | <= 0.3 |',
             f"| for scale: `python -c pass`, median of {SAY_RUNS} (s) | {s['python']:.3f} | |",
             f"| Daemon exit code after SIGTERM | {result['exit_code']} | 0 |", "",
             "The first overhead compares two processes (the daemon's and the benchmark's), whose synthesis "
             "speeds can differ by more than the overhead; the second is measured within each request."]
    return "\n".join(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default, what in (("--workers", 1, "daemon synthesis workers"), ("--threads", 2, "daemon torch "
                                "threads"), ("--requests", 40, "timed requests per level and for the overhead")):
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
    parser.add_argument("--matrix", action="store_true", help="run the load levels for each worker/thread layout")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or /tmp/ttsd-bench-cache)")
    args = parser.parse_args()
    if min(args.workers, args.threads, args.requests) < 1:
        parser.error("--workers, --threads and --requests must be at least 1")
    cache = cache_dir(args.cache)
    command = command_line()
    result: dict[str, Any] = {"command": command, "requests": args.requests, "load_start": os.getloadavg()[0]}
    runs: list[dict[str, Any]] = []
    for workers, threads in LAYOUTS if args.matrix else ((args.workers, args.threads),):
        print(f"daemon: {workers} worker(s), {threads} thread(s)…", flush=True)
        daemon = Daemon(cache=cache, workers=workers, threads=threads, prefix="ttsd-bench-serve-")
        daemon.start(timeout=180, interval=0.1)
        sock = str(daemon.socket)
        run: dict[str, Any] = {"workers": workers, "threads": threads}
        runs.append(run)
        try:
            run["levels"] = levels(sock, args.requests)
            if not args.matrix:
                print(f"overhead: {args.requests} daemon requests alternating with in-process calls…", flush=True)
                run["overhead"] = overhead(sock, cache, threads, args.requests)
                print(f"ttsd say: 1 warm-up + {SAY_RUNS} processes…", flush=True)
                run["say"] = say_time(sock)
        finally:
            run["exit_code"], log = finish(daemon)
            if run["exit_code"] != 0:
                print(log, file=sys.stderr)
    codes = [run["exit_code"] for run in runs]
    result.update({"matrix": runs} if args.matrix else runs[0])
    result["load_end"] = os.getloadavg()[0]
    print()
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if any(codes):
        sys.exit(f"daemon exited with {codes} after SIGTERM (expected 0)")


if __name__ == "__main__":
    main()
