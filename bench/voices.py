"""Many voices within a budget: hit rate, latency of hits and misses, peak RSS, failures.

One run starts ``ttsd serve`` in a subprocess on temp dirs with 8 voices, each a copy of the
built-in voice (en_US-joe-medium, converted once into the cache) repacked under its own name
(``voice0`` ... ``voice7``: the same weights, so every voice costs the same and loads separately),
and a budget that holds 3 of them: ``--max-loaded 3`` by default, or ``--memory-budget SIZE`` given
to this script (then the daemon is measured against that). ``voice0`` is the default voice, so it
is preloaded. Four client threads send a short sentence in a loop (a new connection per request),
each picking a voice from a Zipf-like mix (weight 1/(k+1)^s, ``--zipf`` s=1.1 by default). Before
each request the client reads the voice's ``residency`` from ``/v1/voices``: "loaded" makes it a
hit, "unloaded" or "loading" a miss (a voice unloaded between that look and the request would be
counted as a hit: rare, and it only flatters the misses).

Printed (and with ``--json``, the raw numbers): requests, failed (not 200), hit rate, p50/p99
latency for hits and for misses, the daemon's loads and evictions from ``/metrics``, peak RSS
(VmHWM of the daemon process) and the RSS at the end against the budget, and the 1-min load
average (the machine may be shared). From the repository root::

    .venv/bin/python bench/voices.py [--requests 400] [--memory-budget 1.2G] [--zipf 1.1] [--seed 1]

Cache: ``--cache``, ``$TTSD_CACHE`` or /tmp/ttsd-bench-cache. Disk: ~1 GB (8 voices in the models
dir and their store copies), removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import cache_dir, finish

from ttsd.testing import Daemon, cpu_name, pct, wait_for

SHORT = "Turn on the kitchen lights."
VOICES = 8
CLIENTS = 4
POLL_S = 0.1


def make_voices(models: Path, builtin: Path) -> list[str]:
    """``VOICES`` copies of the built-in voice, each repacked under its own name, published by rename."""
    from ttsd.manifest import pack, verify

    names = []
    for k in range(VOICES):
        name = f"voice{k}"
        staging = models / f".stage-{name}"
        shutil.copytree(builtin, staging)
        m = verify(staging)
        pack(staging, name=name, version="1", engine=m.engine, sample_rate=m.sample_rate)
        os.rename(staging, models / f"{name}-1")
        names.append(name)
    return names


def start(cache: Path, budget: list[str]) -> tuple[Daemon, list[str], float]:
    """The daemon on ``VOICES`` voices, once every one is verified and warmed (then parked):
    (daemon, voice names, seconds from its start)."""
    from ttsd.voices import builtin_model

    daemon = Daemon(cache=cache, args=["--no-seed", "--default-voice", "voice0", "--queue-size", "32", *budget],
                    prefix="ttsd-bench-voices-")
    try:
        daemon.models.mkdir()
        names = make_voices(daemon.models, builtin_model(cache))
        daemon.start(timeout=600, interval=POLL_S)
        wait_for(lambda: len([v for v in voices(daemon).values() if v["active"]]) == VOICES, 600, "8 voices", POLL_S)
    except BaseException:
        daemon.cleanup()
        raise
    return daemon, names, time.monotonic() - daemon.started


def voices(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in daemon.get("/v1/voices", timeout=30).json()["voices"]}


@dataclass
class Sample:
    voice: str
    hit: bool
    latency: float
    status: int  # 0: no HTTP answer
    error: str = ""  # the error code of a failed request


def drive(daemon: Daemon, names: list[str], requests: int, zipf: float, seed: int) -> list[Sample]:
    weights = [1 / (k + 1) ** zipf for k in range(VOICES)]
    samples: list[Sample] = []
    lock = threading.Lock()
    left = [requests]

    def client(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            voice = rng.choices(names, weights)[0]
            hit = voices(daemon)[voice]["residency"] == "loaded"
            started = time.monotonic()
            error = ""
            try:
                status, _, body = daemon.post("/v1/synthesize", {"text": SHORT, "voice": voice})
                if status != 200:
                    error = json.loads(body)["error"]["code"]
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                status, error = 0, "no answer"
            with lock:
                samples.append(Sample(voice, hit, time.monotonic() - started, status, error))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--memory-budget", help="use --memory-budget SIZE instead of --max-loaded 3")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=cache_dir())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else ["--max-loaded", "3"]
    daemon, names, start_seconds = start(args.cache, budget)
    try:
        settled_mb = daemon.rss_mb()
        started = time.monotonic()
        samples = drive(daemon, names, args.requests, args.zipf, args.seed)
        wall = time.monotonic() - started
        status = daemon.get("/v1/status").json()
        loads, evictions = daemon.metric("ttsd_voice_loads_total"), daemon.metric("ttsd_voice_evictions_total")
        peak_mb, end_mb = daemon.rss_mb("VmHWM"), daemon.rss_mb()
    finally:
        code, log = finish(daemon)
    load_seconds = [float(x) for x in re.findall(r"loaded and warmed in ([0-9.]+) s \(a request needs it\)", log)]
    hits = [s.latency for s in samples if s.hit and s.status == 200]
    misses = [s.latency for s in samples if not s.hit and s.status == 200]
    result = {
        "budget": " ".join(budget), "requests": len(samples), "failed": sum(s.status != 200 for s in samples),
        "hit_rate": len(hits) / max(1, len(hits) + len(misses)), "wall_seconds": round(wall, 1),
        "hit_p50": pct(hits, 50), "hit_p99": pct(hits, 99), "miss_p50": pct(misses, 50), "miss_p99": pct(misses, 99),
        "loads": loads, "evictions": evictions, "peak_rss_mb": round(peak_mb), "end_rss_mb": round(end_mb),
        "start_rss_mb": round(settled_mb), "budget_mb": round(status["memory"]["budget_bytes"] / 2**20)
        if status["memory"]["budget_bytes"] else None, "loaded_at_end": status["memory"]["loaded_versions"],
        "start_seconds": round(start_seconds, 1), "per_voice": {n: sum(s.voice == n for s in samples)
                                                                for n in names},
        "errors": {f"{s.status} {s.error}": sum(1 for t in samples if (t.status, t.error) == (s.status, s.error))
                   for s in samples if s.status != 200},
        "load_p50": pct(load_seconds, 50), "load_p90": pct(load_seconds, 90),
        "exit_code": code, "load_average": os.getloadavg()[0], "cpus": os.cpu_count(), "cpu": cpu_name(),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"8 copies of en_US-joe-medium, {result['budget']}, 4 clients, Zipf s={args.zipf}, "
          f"{result['requests']} requests in {result['wall_seconds']} s (start-up {result['start_seconds']} s); "
          f"{result['cpu']}, load average {result['load_average']:.2f}")
    print("| requests | failed | hit rate | hit p50 | hit p99 | miss p50 | miss p99 | loads | evictions | "
          "peak RSS | budget |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    budget_text = f"{result['budget_mb']} MB" if result["budget_mb"] else "3 voices"
    print(f"| {result['requests']} | {result['failed']} | {result['hit_rate']:.0%} | {result['hit_p50']:.2f} s | "
          f"{result['hit_p99']:.2f} s | {result['miss_p50']:.2f} s | {result['miss_p99']:.2f} s | "
          f"{result['loads']:.0f} | {result['evictions']:.0f} | {result['peak_rss_mb']} MB | {budget_text} |")
    print(f"failed: {result['errors'] or 'none'}; a load for a request took {result['load_p50']:.2f} s "
          f"(p50), {result['load_p90']:.2f} s (p90)")
    print(f"requests per voice: {result['per_voice']}; RSS after start-up {result['start_rss_mb']} MB, at the end "
          f"{result['end_rss_mb']} MB with {result['loaded_at_end']} versions loaded; daemon exit code {code}")


if __name__ == "__main__":
    main()
