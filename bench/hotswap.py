"""Hot upgrades under load: latency during a swap, time to serve the new version, RSS over many swaps.

One run starts ``ttsd serve`` (built-in voice en_US-joe-medium, version 1) in a subprocess on temp
dirs and drives it with 4 client threads sending a short sentence in a loop (a new connection per
request), recording each request's start, latency, status and ``X-Ttsd-Version``:

* ``--steady`` seconds of steady load (after 1 s not counted), then version 2 is dropped in (built
  in a dot-folder of the models dir, published with ``os.rename``): drop -> ``/v1/voices`` reports
  it active, drop -> first response from it, and p50/p99 of the requests overlapping drop -> swap
  (swap: the earlier of "reported active" and the first version-2 request's start) against steady.
  Goal: p99 during / p99 steady <= 1.5. The load runs on until 5 s after the swap;
* RSS (VmRSS, ``/proc/PID/status``) once that swap settled, then after each of ``--swaps`` more
  (versions 3, 4, ..., each waited for until active and until ``/metrics`` counts the unload of the
  version it pushed out; load paused unless ``--load-during-swaps``); growth per swap over the last
  10 (least-squares slope); disk used by the private store (~61 MB per stored version) and models dir;
* exit code 0 on SIGTERM. Every folder is older than ``--settle`` (1 s) when renamed in, so drop ->
  active is detection + checks + store copy + load + warm-up.

Each of ``--layouts`` (default ``1x2,2x1``: one worker on both cores, the default, and two workers
of one thread) is measured ``--repeats`` times (default 3), alternating, a fresh daemon each; the
RSS swaps run in the first run only. From the repository root (machine may be shared: the 1-min
load average is printed)::

    .venv/bin/python bench/hotswap.py [--layouts 1x2,2x1] [--repeats 3] [--steady 10] [--swaps 20] [--plot [PNG]]

``--plot`` draws the first run's requests (latency against start time, by the version that answered)
with the drop, the states /v1/voices showed for version 2 (verifying, loading, warming: the first poll,
every 50 ms, that saw each), reported active and the first version-2 answer marked (matplotlib, in the
``bench`` extra; default path docs/bench-hotswap.png).

Cache: ``--cache``, ``$TTSD_CACHE`` or /tmp/ttsd-bench-cache. Disk: ~2.7 GB for 22 versions (models
dir + store copies), removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import cache_dir, command_line, finish

from ttsd.testing import Daemon, cpu_name, pct, request, rss_mb, wait_for

SHORT = "Turn on the kitchen lights."
CLIENTS = 4
WARMUP_S = 1.0  # first second of load not counted as steady
AFTER_S = 5.0  # load kept on after the first swap
SETTLE_S = 1.1  # > the daemon's default --settle
POLL_S = 0.05


@dataclass
class Sample:
    start: float  # time.monotonic()
    latency: float
    status: int  # 0: no HTTP answer
    version: str | None


class Load:
    """CLIENTS threads, each sending SHORT in a loop unless paused."""

    def __init__(self, sock: str) -> None:
        self.sock, self.lock, self.samples, self.in_flight = sock, threading.Lock(), list[Sample](), 0
        self.go, self.stopping = threading.Event(), threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        while not self.stopping.is_set():
            if not self.go.wait(0.1):
                continue
            with self.lock:
                self.in_flight += 1
            started = time.monotonic()
            try:
                status, headers, _ = request(self.sock, "POST", "/v1/synthesize", {"text": SHORT})
                version = headers.get("x-ttsd-version")
            except (OSError, http.client.HTTPException):
                status, version = 0, None
            with self.lock:
                self.samples.append(Sample(started, time.monotonic() - started, status, version))
                self.in_flight -= 1

    def pause(self, stop: bool = False) -> None:
        self.go.clear()
        wait_for(lambda: self.in_flight == 0, 300, "requests in flight", POLL_S)
        if stop:
            self.stopping.set()
            for thread in self.threads:
                thread.join()


def versions(sock: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The voice's active version and its versions by name, from /v1/voices."""
    v = json.loads(request(sock, "GET", "/v1/voices", timeout=30)[2])["voices"][0]
    return v["active"], {row["version"]: row for row in v["versions"]}


def is_active(sock: str, version: str, seen: dict[str, float] | None = None) -> bool:
    """Whether ``version`` is the active one; ``seen`` gets the first time each of its states was polled."""
    active, rows = versions(sock)
    if seen is not None and version in rows:
        seen.setdefault(rows[version]["state"], time.monotonic())
    if version in rows and rows[version]["state"] == "refused":
        raise RuntimeError(f"version {version} refused: {rows[version]['reason']}")
    return active == version


def build(daemon: Daemon, builtin: Path, number: int) -> tuple[Path, Path]:
    """Version ``number`` of the built-in voice in a dot-folder of the models dir: (staging, final path)."""
    from ttsd.manifest import pack, verify

    staging = daemon.models / f".stage-{number}"
    shutil.copytree(builtin, staging)
    m = verify(staging)
    pack(staging, name=m.name, version=str(number), engine=m.engine, sample_rate=m.sample_rate)
    return staging, daemon.models / f"{m.name}-{number}"


def stats(samples: list[Sample]) -> dict[str, float]:
    lat = [s.latency for s in samples if s.status == 200]
    return {"n": len(lat), "p50": pct(lat, 50) * 1e3, "p99": pct(lat, 99) * 1e3} if lat else {"n": 0}


def first_swap(daemon: Daemon, builtin: Path, load: Load, steady: float) -> dict[str, Any]:
    sock, folders = str(daemon.socket), build(daemon, builtin, 2)  # copy + checksums before the load starts
    began = time.monotonic()
    load.go.set()
    time.sleep(WARMUP_S + steady)
    rss_v1 = rss_mb(daemon.pid)
    dropped = time.monotonic()
    os.rename(*folders)  # the drop
    seen: dict[str, float] = {}  # version 2's states as the polls saw them: for the picture only
    wait_for(lambda: is_active(sock, "2", seen), 600, "version 2", POLL_S)
    active = time.monotonic()
    time.sleep(max(0.0, active + AFTER_S - time.monotonic()))
    ended = time.monotonic()
    with load.lock:
        samples = list(load.samples)
    v2 = [s for s in samples if s.version == "2"]
    swap = min([active] + [s.start for s in v2])
    first_v2 = min((s.start + s.latency for s in v2), default=math.nan)
    marks = {"began": began, "dropped": dropped, "active": active, "first_v2": first_v2, "end": ended,
             **{state: at for state, at in seen.items() if state in ("verifying", "loading", "warming")}}
    return {"steady": stats([s for s in samples if began + WARMUP_S <= s.start < dropped]),
            "during": stats([s for s in samples if s.start < swap and s.start + s.latency > dropped]),
            "after": stats([s for s in samples if s.start >= swap]), "window_s": swap - dropped,
            "to_active_s": active - dropped, "v2_load_s": versions(sock)[1]["2"]["load_seconds"],
            "to_v2_s": first_v2 - dropped, "rss_v1_mb": rss_v1, "marks": marks,
            "old_after_active": sum(1 for s in samples if s.start >= active and s.status == 200 and s.version != "2")}


def unloads(daemon: Daemon) -> int:
    """Versions unloaded so far (the event is counted after the memory is returned to the OS)."""
    return int(daemon.metric("ttsd_model_transitions_total", event="unloaded"))


def many_swaps(daemon: Daemon, builtin: Path, swaps: int) -> dict[str, Any]:
    sock = str(daemon.socket)
    rss, seconds, before = list[float](), list[float](), rss_mb(daemon.pid)
    for number in range(3, 3 + swaps):
        folders = build(daemon, builtin, number)
        time.sleep(SETTLE_S)  # like version 2: older than the daemon's --settle when renamed in
        dropped = time.monotonic()
        os.rename(*folders)
        wait_for(lambda n=str(number): is_active(sock, n), 600, f"version {number}", POLL_S)
        seconds.append(time.monotonic() - dropped)
        wait_for(lambda n=number: unloads(daemon) >= n - 2, 60, f"version {number - 2} to unload", POLL_S)
        rss.append(rss_mb(daemon.pid))
        print(f"  version {number}: active {seconds[-1]:.1f} s after the drop, RSS {rss[-1]:.0f} MB", flush=True)
    growth = statistics.linear_regression(range(10), rss[-10:]).slope if swaps >= 10 else math.nan
    store = daemon.state / "store"
    # The daemon prunes old store copies after a swap: wait until no version folder is half removed.
    wait_for(lambda: all((v / "ttsd.json").is_file() for v in store.glob("*/*")), 60, "store pruning", POLL_S)
    return {"before": before, "rss": rss, "seconds": sorted(seconds) or [math.nan], "growth": growth,
            "hwm": rss_mb(daemon.pid, "VmHWM"), "store_mb": dir_mb(store), "models_mb": dir_mb(daemon.models),
            "stored": len(list(store.glob("*/*")))}


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def markdown(r: dict[str, Any]) -> str:
    f, m, n = r["first"], r["many"], r["swaps"]
    lines = [f"`{r['command']}`", "",
             (f"{cpu_name()}; daemon {r['workers']} worker(s) x {r['threads']} torch thread(s), "
             f"--keep 1 --settle 1 (defaults); {CLIENTS} client threads sending {SHORT!r} in a loop, a new "
             f"connection each; 1-min load average {r['load_start']:.2f} at start, {r['load_end']:.2f} at end."),
             "", f"| Requests ({CLIENTS} clients) | count | p50 (ms) | p99 (ms) |", "|---|---:|---:|---:|"]
    for key, label in (("steady", f"steady ({r['steady']:g} s)"), ("during", ("during the swap (overlapping "
                       f"drop -> swap, {f['window_s']:.1f} s)")), ("after", f"after the swap ({AFTER_S:g} s)")):
        lines.append(f"| {label} | {f[key]['n']} | {f[key].get('p50', math.nan):.0f} | "
                     f"{f[key].get('p99', math.nan):.0f} |")
    rows = [("p99 during swap / p99 steady", f"{f['during'].get('p99', math.nan) / f['steady'].get('p99', math.nan):.2f}x",
             "<= 1.5x"),
            ("failed requests (non-200), whole run", f"{r['failed']} of {r['requests']}", "0"),
            ("drop -> version 2 active in /v1/voices (s)", f"{f['to_active_s']:.2f}", ""),
            ("drop -> first response from version 2 (s)", f"{f['to_v2_s']:.2f}", ""),
            ("version 2 verify + load + warm-up under load, daemon's load_seconds (s)", f"{f['v2_load_s']}", ""),
            ("version 1 answers to requests started after version 2 was reported active",
             f"{f['old_after_active']}", "0"),
            ("daemon RSS under load before the drop, version 1 only (MB)", f"{f['rss_v1_mb']:.0f}", ""),
            ("daemon RSS after the first swap settled (MB; nothing unloaded or trimmed yet)", f"{m['before']:.0f}", ""),
            (f"{n} more swaps (load {r['swap_load']}): drop -> active, median / max (s)",
             f"{m['seconds'][len(m['seconds']) // 2]:.1f} / {m['seconds'][-1]:.1f}", ""),
            (f"{n} more swaps: wall time (s)", f"{r['swaps_s']:.0f}", ""),
            (f"daemon RSS after the {n} more swaps (MB)", f"{(m['rss'] or [math.nan])[-1]:.0f}", ""),
            ("RSS growth per swap over the last 10 swaps, least-squares slope (MB)", f"{m['growth']:+.1f}", "~0"),
            ("daemon peak RSS, VmHWM (MB)", f"{m['hwm']:.0f}", ""),
            (f"disk: private store, {m['stored']} versions kept / models dir, {n + 2} versions (MB)",
             f"{m['store_mb']:.0f} / {m['models_mb']:.0f}", ""),
            ("daemon exit code after SIGTERM", f"{r['exit_code']}", "0")]
    lines += ["", "| Measure | value | goal |", "|---|---:|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in rows), "",
              "RSS after each swap to versions 3.. (MB): " + ", ".join(f"{x:.0f}" for x in m["rss"])]
    return "\n".join(lines)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        workers, _, threads = item.strip().partition("x")
        layouts.append((int(workers), int(threads)))
    if not layouts or min(min(pair) for pair in layouts) < 1:
        raise ValueError(text)
    return layouts


def one_run(cache: Path, builtin: Path, workers: int, threads: int, steady: float, swaps: int,
            load_during_swaps: bool) -> dict[str, Any]:
    """A fresh daemon: the first swap under load, then ``swaps`` more for RSS."""
    r: dict[str, Any] = {"workers": workers, "threads": threads, "steady": steady, "swaps": swaps,
                         "load_start": os.getloadavg()[0], "swap_load": "running" if load_during_swaps else "paused"}
    daemon = Daemon(cache=cache, workers=workers, threads=threads, prefix="ttsd-bench-hotswap-")
    daemon.start(timeout=180, interval=POLL_S)
    load = Load(str(daemon.socket))
    try:
        r["first"] = first_swap(daemon, builtin, load, steady)
        if not load_during_swaps:
            load.pause()
        started = time.monotonic()
        r["many"] = many_swaps(daemon, builtin, swaps) if swaps else None
        r["swaps_s"] = time.monotonic() - started
    finally:
        load.pause(stop=True)
        r["exit_code"], r["log"] = finish(daemon)
    r["requests"], r["failed"] = len(load.samples), sum(1 for s in load.samples if s.status != 200)
    r["samples"] = [(s.start, s.latency, s.status, s.version) for s in load.samples]
    r["load_end"] = os.getloadavg()[0]
    return r


def layout_table(runs: list[dict[str, Any]], command: str) -> str:
    lines = [f"`{command}`", "", "Each row a fresh daemon; layouts alternate. p99 of requests overlapping the swap "
             "(drop -> version 2 serving) over p99 of the steady load before it (goal <= 1.5x).", "",
             "| run | workers x threads | steady p50 / p99 (ms) | during swap p50 / p99 (ms) | requests in the swap "
             "window | p99 ratio | drop -> active (s) | failed | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs, 1):
        f = r["first"]
        ratio = f["during"].get("p99", math.nan) / f["steady"].get("p99", math.nan)
        lines.append(f"| {i} | {r['workers']} x {r['threads']} | "
                     f"{f['steady'].get('p50', math.nan):.0f} / {f['steady'].get('p99', math.nan):.0f} | "
                     f"{f['during'].get('p50', math.nan):.0f} / {f['during'].get('p99', math.nan):.0f} | "
                     f"{f['during']['n']} | {ratio:.2f}x | {f['to_active_s']:.1f} | {r['failed']} of "
                     f"{r['requests']} | {r['load_start']:.1f} |")
    lines.append("")
    for layout in sorted({(r["workers"], r["threads"]) for r in runs}):
        ratios = sorted(r["first"]["during"].get("p99", math.nan) / r["first"]["steady"].get("p99", math.nan)
                        for r in runs if (r["workers"], r["threads"]) == layout)
        lines.append(f"{layout[0]} x {layout[1]}: p99 ratio median {statistics.median(ratios):.2f}x, "
                     f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x over {len(ratios)} runs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="1x2,2x1",
                        help="daemon layouts as WORKERSxTHREADS, comma-separated (default 1x2,2x1: the default "
                             "layout on 2 cores and the throughput one)")
    parser.add_argument("--repeats", type=int, default=3, help="first-swap runs per layout, alternating (default 3)")
    parser.add_argument("--swaps", type=int, default=20, help="swaps after the first, for RSS, in the first run "
                        "(default 20)")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of steady load (default 10)")
    parser.add_argument("--load-during-swaps", action="store_true", help="keep the load on for the RSS swaps")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or /tmp/ttsd-bench-cache)")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("docs/bench-hotswap.png"), metavar="PNG",
                        help="draw the first run's latency over time to this PNG (default docs/bench-hotswap.png; "
                             "needs matplotlib)")
    args = parser.parse_args()
    if args.plot:
        import plot

        plot.require()  # before measuring, not after
    try:
        layouts = parse_layouts(args.layouts)
    except ValueError:
        parser.error("--layouts: expected WORKERSxTHREADS[,...], e.g. 1x2,2x1")
    if args.repeats < 1 or args.swaps < 0 or args.steady <= 0:
        parser.error("--repeats must be >= 1, --swaps >= 0, --steady > 0")
    cache = cache_dir(args.cache)
    from ttsd.voices import builtin_model

    builtin = builtin_model(cache)
    command = command_line()
    runs: list[dict[str, Any]] = []
    first_full: dict[str, Any] | None = None
    for _ in range(args.repeats):
        for workers, threads in layouts:
            swaps = args.swaps if first_full is None else 0
            print(f"run {len(runs) + 1}: {workers} worker(s) x {threads} thread(s), load average "
                  f"{os.getloadavg()[0]:.2f}{f', then {swaps} more swaps' if swaps else ''}…", flush=True)
            r = one_run(cache, builtin, workers, threads, args.steady, swaps, args.load_during_swaps)
            r["command"] = command
            runs.append(r)
            if first_full is None:
                first_full = r
            errors = [line for line in r["log"].splitlines() if line.startswith(("ERROR", "CRITICAL", "Traceback"))]
            if errors:
                print("daemon log errors:\n" + "\n".join(errors[:20]))
            if r["exit_code"]:
                sys.exit(f"daemon exited with {r['exit_code']} after SIGTERM (expected 0)")
    print("\n" + layout_table(runs, command))
    if first_full is not None and first_full["many"] is not None:
        print("\nFirst run in full:\n\n" + markdown(first_full))
    if args.plot and first_full is not None:
        import plot

        f = first_full["first"]
        ratio = f["during"].get("p99", math.nan) / f["steady"].get("p99", math.nan)
        plot.hotswap(args.plot, first_full["samples"], f["marks"],
                     f"hot swap under {CLIENTS} clients, {first_full['workers']} worker(s) x "
                     f"{first_full['threads']} thread(s): p99 during / steady {ratio:.2f}x, "
                     f"drop -> active {f['to_active_s']:.1f} s")
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
