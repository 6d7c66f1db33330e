"""A busy box: start-up, an upgrade and rollbacks with other programs using every core, against the
same on a quiet box, in one run.

Each run starts ``ttsd serve`` in a subprocess (built-in voice en_US-joe-medium as version 1, in an
otherwise empty models dir, ``--no-seed``), alternating *quiet* and *busy*: busy runs first start one
CPU-bound program per core at nice 0 (``sh -c 'while :; do :; done'``, as an NVR's detector or a
compile would be), kept running until the run ends. Each run measures:

* **ready**: from starting the process to ``/readyz`` answering 200;
* **drop -> active**: version 2 renamed into the models dir (older than ``--settle``) until
  ``/v1/voices`` reports it active;
* **rollback, target loaded**: version 3 dropped in; once ``/v1/voices`` shows it being verified or
  loaded, ``POST /v1/voices/{voice}/rollback``: its answer's latency (version 1 is loaded, a standby);
* **rollback, target not loaded**: version 4 dropped in; while it comes up, a rollback to version 2
  (rolled back by the first rollback, so unloaded): a load the rollback must make itself;
* **/healthz worst**: a thread asks ``/healthz`` every 50 ms from ready to the end of the run;
  the slowest answer;
* **failed requests**: a thread sends a short sentence every 0.2 s from ready to the end; any
  answer other than 200 (none must fail: rollbacks and upgrades never take the voice down).

Then the ratios busy / quiet (medians over the runs) against the goals: ready and drop -> active
<= 4x, /healthz worst <= 1 s, rollback <= 0.2 s (loaded target) and <= 2 s (not loaded), 0 failed.
From the repository root (``--runs`` pairs; the machine may be shared: its load average is
printed)::

    .venv/bin/python bench/busy.py [--runs 3]

Cache: ``--cache``, ``$TTSD_CACHE`` or /tmp/ttsd-bench-cache (the built-in voice is converted there
once, before any timing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import BESIDE, cache_dir, command_line, finish

from ttsd.testing import Daemon, cpu_name, request, wait_for

SHORT = "Turn on the kitchen lights."
POLL_S = 0.02
SETTLE_S = 1.1  # folders are older than the daemon's --settle (1 s) when renamed in


class Hogs:
    """One CPU-bound program per core at nice 0, until ``stop``."""

    def __init__(self, count: int) -> None:
        self.procs = [subprocess.Popen(BESIDE["cpu"]) for _ in range(count)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


class Watch:
    """/healthz every 50 ms and a sentence every 0.2 s, from ``start`` until ``stop``."""

    def __init__(self, sock: str) -> None:
        self.sock, self.stopping = sock, threading.Event()
        self.health: list[float] = []
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._health, daemon=True),
                        threading.Thread(target=self._speak, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _health(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                ok = request(self.sock, "GET", "/healthz", timeout=30)[0] == 200
            except OSError:
                ok = False
            self.health.append(time.monotonic() - started if ok else float("inf"))
            self.stopping.wait(0.05)

    def _speak(self) -> None:
        while not self.stopping.is_set():
            try:
                status = request(self.sock, "POST", "/v1/synthesize", {"text": SHORT}, timeout=60)[0]
            except OSError:
                status = 0
            self.statuses.append(status)
            self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


def active(sock: str) -> tuple[str | None, dict[str, str]]:
    voice = json.loads(request(sock, "GET", "/v1/voices", timeout=30)[2])["voices"][0]
    return voice["active"], {v["version"]: v["state"] for v in voice["versions"]}


def stage(models: Path, builtin: Path, version: int) -> tuple[Path, Path]:
    from ttsd.manifest import pack, verify

    staging = models / f".stage-{version}"
    shutil.copytree(builtin, staging)
    m = verify(staging)
    pack(staging, name=m.name, version=str(version), engine=m.engine, sample_rate=m.sample_rate)
    return staging, models / f"{m.name}-{version}"


def rollback_during_upgrade(sock: str, voice: str, models: Path, staged: tuple[Path, Path], version: int,
                            to: str | None) -> float:
    """Drop ``version``; once it is being checked or loaded, roll back (to ``to``): the latency."""
    os.rename(*staged)
    wait_for(lambda: active(sock)[1].get(str(version)) in ("verifying", "loading", "warming"), 120,
             f"version {version} coming up", POLL_S)
    started = time.monotonic()
    status, _, body = request(sock, "POST", f"/v1/voices/{voice}/rollback", {"to": to} if to else {}, timeout=120)
    took = time.monotonic() - started
    if status != 200:
        raise RuntimeError(f"rollback answered {status}: {body[:200]!r}")
    return took


def one_run(cache: Path, builtin: Path, busy: bool) -> dict[str, Any]:
    daemon = Daemon(cache=cache, args=["--no-seed"], prefix="ttsd-bench-busy-")
    models, sock = daemon.models, str(daemon.socket)
    models.mkdir()
    shutil.copytree(builtin, models / "voice-1")
    staged = {v: stage(models, builtin, v) for v in (2, 3, 4)}  # copies + checksums before any timing
    time.sleep(SETTLE_S)
    hogs = Hogs(os.cpu_count() or 2) if busy else None
    r: dict[str, Any] = {"busy": busy, "load_start": os.getloadavg()[0]}
    watch = None
    try:
        # a busy box answers slowly: a probe may take 30 s without the daemon being "not ready"
        r["ready_s"] = daemon.start(timeout=900, interval=POLL_S, probe_timeout=30).ready_seconds
        watch = Watch(sock)
        voice = json.loads(request(sock, "GET", "/v1/voices")[2])["voices"][0]["name"]
        dropped = time.monotonic()
        os.rename(*staged[2])
        wait_for(lambda: active(sock)[0] == "2", 900, "version 2 active", POLL_S)
        r["to_active_s"] = time.monotonic() - dropped
        r["rollback_loaded_s"] = rollback_during_upgrade(sock, voice, models, staged[3], 3, None)
        r["rollback_unloaded_s"] = rollback_during_upgrade(sock, voice, models, staged[4], 4, "2")
        r["final"] = active(sock)
        time.sleep(1.0)  # the called-off upgrade ends; requests go on
    finally:
        if watch is not None:
            watch.stop()
        if hogs is not None:
            hogs.stop()
        r["exit_code"], r["log"] = finish(daemon)
    assert watch is not None
    r["healthz_worst_s"] = max(watch.health)
    r["requests"], r["failed"] = len(watch.statuses), sum(1 for s in watch.statuses if s != 200)
    return r


def table(runs: list[dict[str, Any]], command: str, cpu: str) -> str:
    lines = [f"`{command}`", "", f"{cpu}. Busy: one `sh -c 'while :; do :; done'` per core "
             "at nice 0 for the whole run. Each row a fresh daemon; quiet and busy alternate.", "",
             "| run | box | ready (s) | drop -> active (s) | rollback, target loaded (s) | rollback, target not "
             "loaded (s) | /healthz worst (s) | failed requests | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {'busy' if r['busy'] else 'quiet'} | {r['ready_s']:.2f} | {r['to_active_s']:.2f} | "
                     f"{r['rollback_loaded_s']:.3f} | {r['rollback_unloaded_s']:.2f} | {r['healthz_worst_s']:.3f} | "
                     f"{r['failed']} of {r['requests']} | {r['load_start']:.1f} |")

    def median(key: str, busy: bool) -> float:
        return statistics.median(r[key] for r in runs if r["busy"] is busy)

    busy = [r for r in runs if r["busy"]]
    rows = [("ready, busy / quiet (medians)", f"{median('ready_s', True) / median('ready_s', False):.2f}x", "<= 4x"),
            ("drop -> active, busy / quiet (medians)",
             f"{median('to_active_s', True) / median('to_active_s', False):.2f}x", "<= 4x"),
            ("/healthz worst, busy runs (s)", f"{max(r['healthz_worst_s'] for r in busy):.3f}", "<= 1"),
            ("rollback during an upgrade, target loaded, busy, worst (s)",
             f"{max(r['rollback_loaded_s'] for r in busy):.3f}", "<= 0.2"),
            ("rollback during an upgrade, target not loaded, busy, worst (s)",
             f"{max(r['rollback_unloaded_s'] for r in busy):.2f}", "<= 2"),
            ("failed requests, all runs", f"{sum(r['failed'] for r in runs)} of {sum(r['requests'] for r in runs)}",
             "0")]
    lines += ["", "| Measure | value | goal |", "|---|---:|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="quiet/busy pairs, alternating (default 3)")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or /tmp/ttsd-bench-cache)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    cache = cache_dir(args.cache)
    from ttsd.voices import builtin_model

    builtin = builtin_model(cache)
    command = command_line()
    runs = []
    for i in range(args.runs):
        for busy in (False, True):
            print(f"run {len(runs) + 1}: {'busy' if busy else 'quiet'}, load average {os.getloadavg()[0]:.2f}…",
                  flush=True)
            r = one_run(cache, builtin, busy)
            runs.append(r)
            errors = [line for line in r["log"].splitlines() if line.startswith(("CRITICAL", "Traceback"))]
            if errors or r["exit_code"]:
                print("\n".join(errors[:20]) + f"\nexit code {r['exit_code']}")
            print(f"  ready {r['ready_s']:.2f} s, drop -> active {r['to_active_s']:.2f} s, rollbacks "
                  f"{r['rollback_loaded_s']:.3f} / {r['rollback_unloaded_s']:.2f} s, /healthz worst "
                  f"{r['healthz_worst_s']:.3f} s, failed {r['failed']} of {r['requests']}", flush=True)
    print("\n" + table(runs, command, cpu_name()))


if __name__ == "__main__":
    main()
