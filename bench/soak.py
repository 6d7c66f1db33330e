"""Soak: a box left alone, compressed into minutes. Nothing accepted may be lost, no request may
get a 5xx, no good version may be rolled back by itself, and memory must stay flat.

One run starts ``ttsd serve`` (built-in voice en_US-joe-medium, default layout, ``--spool``) in a
subprocess on temp dirs, then for ``--minutes`` (default 20):

* 4 clients send good requests in a loop: varied sentences and paragraphs, whole or streamed,
  wav/flac/ogg/mp3/pcm, some at other speeds or seeded; each must be a 200 with audio;
* 1 client sends a stream of bad and oversized requests: broken and deeply nested JSON, unknown
  fields, out-of-range numbers (seed 2**70, speed 10**400, NaN), unknown voices and speakers,
  text over --max-chars, pauses over --max-audio-seconds, and a valid 4,990-character text with
  no sentence end; each must be its 4xx, or a 200 for the valid one;
* a spool writer drops a request every 2 s (text and JSON, good and bad; published by rename);
  at the end every one must be in done/ (with its out/ID.json) or failed/ (with its reason);
* every 2 minutes a new version of the voice is dropped into the models dir (copied into a
  dot-folder, then renamed); every 7 minutes the active version is rolled back over HTTP;
* every 5 minutes the daemon is killed with SIGKILL and started again on the same dirs.

An HTTP request cut by a kill, or refused while the daemon restarts, is not an answer the daemon
gave, so it is counted apart; any other request that got no answer is lost. Printed: requests
accepted and lost, 5xx, auto-rollbacks of good versions (from the persisted audit trail), spool
requests lost, and the daemon's RSS after its first minute and at the end (plus each
incarnation's peak). Not run in CI. From the repository root::

    .venv/bin/python bench/soak.py [--minutes 20] [--cache DIR]

The cache (the converted built-in voice) is ``--cache``, ``$TTSD_CACHE`` or /tmp/ttsd-bench-cache.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import cache_dir, command_line

from ttsd.testing import Daemon, cpu_name, request

GOOD = [
    "Turn on the kitchen lights.",
    "The weather today is mild, with a light breeze from the west and a chance of rain in the evening.",
    "Reminder: the meeting starts at nine. Please bring the quarterly figures. Coffee is in the usual place.",
    "Timer done.",
    "Your package was delivered to the front door at ten past three this afternoon.",
]
FORMATS = ["wav", "flac", "ogg", "mp3", "pcm"]
MAX_CHARS = 5000
JSON = {"Content-Type": "application/json"}  # sent with every body, the malformed ones too


def bad_requests() -> list[tuple[bytes, set[int]]]:
    """(body, acceptable statuses)."""
    def j(body: Any) -> bytes:
        return json.dumps(body).encode()

    return [
        (b"{not json", {400}),
        (b"[" * 50_000, {400}),
        (b'{"text": "hi", "speed": NaN}', {400}),
        (j({"text": "hi", "colour": "blue"}), {400}),
        (j({"text": "hi", "seed": 2 ** 70}), {400}),
        (j({"text": "hi", "speed": 10 ** 400}), {400}),
        (j({"text": "hi", "speaker": "²"}), {400}),
        (j({"text": "hi", "voice": "nobody"}), {404}),
        (j({"text": "x" * (MAX_CHARS + 10)}), {413}),
        (j({"text": "A. " * 1500, "sentence_pause": 5}), {413}),
        (j({"text": ("hello world " * 420)[:4990]}), {200}),  # valid, long, unpunctuated
        (j({"text": "   "}), {400}),
        (j({"text": "hi", "format": "exe"}), {400}),
    ]


class Box:
    """The soaked daemon (``ttsd.testing.Daemon``), started again on the same dirs after each kill."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.spool = root / "spool"
        self.daemon = Daemon(root, ["--spool", str(self.spool), "--max-chars", str(MAX_CHARS)], cache=cache)
        self.models, self.state, self.socket = self.daemon.models, self.daemon.state, str(self.daemon.socket)
        self.down = threading.Event()  # set while killed / restarting: failures then are not "lost"
        self.peaks: list[float] = []  # each incarnation's VmHWM

    def start(self) -> None:
        self.daemon.start(timeout=300)
        self.down.clear()

    def rss(self, field: str = "VmRSS") -> float:
        return self.daemon.rss_mb(field)

    def kill(self) -> None:
        self.down.set()
        self.peaks.append(self.rss("VmHWM"))
        self.daemon.kill()

    def stop(self) -> int:
        self.down.set()
        self.peaks.append(self.rss("VmHWM"))
        return self.daemon.stop(grace=120)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def add(self, key: str, note: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if note and len(self.unexpected) < 30:
                self.unexpected.append(note)


def good_client(d: Box, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        text = rng.choice(GOOD) if rng.random() < 0.7 else " ".join(rng.sample(GOOD, 3))
        body: dict[str, Any] = {"text": text, "format": rng.choice(FORMATS)}
        if rng.random() < 0.3:
            body.update(stream=True, format=rng.choice(["wav", "pcm"]))
        if rng.random() < 0.3:
            body.update(speed=rng.choice([0.8, 1.2, 1.5]), seed=rng.randrange(1000))
        send(d, json.dumps(body).encode(), {200}, tally, "good")


def bad_client(d: Box, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng, cases = random.Random(seed), bad_requests()
    while not stop.is_set():
        body, ok = rng.choice(cases)
        send(d, body, ok, tally, "bad")
        time.sleep(rng.uniform(0.1, 1.0))


def send(d: Box, body: bytes, ok: set[int], tally: Tally, kind: str) -> None:
    was_down = d.down.is_set()
    try:
        status, _, data = request(d.socket, "POST", "/v1/synthesize", raw=body, headers=JSON, timeout=600)
    except (OSError, http.client.HTTPException) as exc:
        if was_down or d.down.is_set():
            tally.add(f"{kind}: cut by a kill or restart")
            time.sleep(0.5)
        else:
            tally.add(f"{kind}: lost", f"{kind} no answer: {type(exc).__name__}: {exc}")
        return
    tally.add(f"{kind}: accepted")
    if status >= 500:
        tally.add("5xx", f"{kind} {status}: {data[:200]!r}")
    elif status not in ok:
        tally.add(f"{kind}: unexpected status", f"{kind} {status} (wanted {sorted(ok)}): {data[:200]!r}")
    elif status == 200 and len(data) < 100:
        tally.add(f"{kind}: empty audio", f"{kind}: 200 with {len(data)} bytes")


def spool_writer(d: Box, stop: threading.Event, ids: list[str]) -> None:
    rng, n = random.Random(7), 0
    incoming = d.spool / "incoming"
    while not stop.is_set():
        n += 1
        rid = f"soak-{n:05d}"
        kind = rng.random()
        if kind < 0.5:
            name, data = f"{rid}.txt", rng.choice(GOOD).encode()
        elif kind < 0.8:
            name, data = f"{rid}.json", json.dumps({"text": rng.choice(GOOD), "format": "flac"}).encode()
        else:
            name, data = f"{rid}.json", rng.choice([b"{broken", json.dumps({"text": "hi", "seed": -1}).encode()])
        tmp = incoming / f".{name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, incoming / name)
        ids.append(rid)
        stop.wait(2.0)


def drop_version(d: Box, builtin: Path, number: int) -> None:
    from ttsd.manifest import pack, verify

    staging = d.models / f".stage-{number}"
    shutil.copytree(builtin, staging)
    m = verify(staging)
    pack(staging, name=m.name, version=str(number), engine=m.engine, sample_rate=m.sample_rate)
    os.rename(staging, d.models / f"{m.name}-{number}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    cache = cache_dir(args.cache)
    from ttsd.voices import builtin_model

    builtin = builtin_model(cache)
    command = command_line()
    load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="ttsd-soak-")
    d = Box(Path(tmp.name), cache)
    d.start()
    stop, tally, ids = threading.Event(), Tally(), list[str]()
    threads = [threading.Thread(target=good_client, args=(d, stop, tally, i), daemon=True) for i in range(4)]
    threads += [threading.Thread(target=bad_client, args=(d, stop, tally, 99), daemon=True),
                threading.Thread(target=spool_writer, args=(d, stop, ids), daemon=True)]
    started = time.monotonic()
    for t in threads:
        t.start()
    end = started + args.minutes * 60
    next_drop, next_rollback, next_kill, version = started + 120, started + 420, started + 300, 1
    rss_start: float | None = None
    events: Counter[str] = Counter()
    while time.monotonic() < end:
        now = time.monotonic()
        if rss_start is None and now - started >= 60:
            rss_start = d.rss()
        if now >= next_drop:
            version += 1
            drop_version(d, builtin, version)
            events["versions dropped"] += 1
            next_drop += 120
        if now >= next_rollback:
            try:
                status = request(d.socket, "POST", "/v1/voices/en_US-joe-medium/rollback", {}, timeout=120)[0]
                events[f"rollbacks over HTTP ({status})"] += 1
            except OSError:
                events["rollbacks over HTTP (daemon down)"] += 1
            next_rollback += 420
        if now >= next_kill:
            d.kill()
            events["kill -9 and restart"] += 1
            time.sleep(0.5)
            d.start()
            next_kill += 300
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(600)
    rss_end = d.rss()
    deadline = time.monotonic() + 300  # let the spool drain
    spool = d.spool

    def unfinished() -> list[str]:
        return [i for i in ids if not ((spool / "out" / f"{i}.json").exists()
                                       or any((spool / "failed").glob(f"{i}.error.json")))]

    while unfinished() and time.monotonic() < deadline:
        time.sleep(1)
    left = unfinished()
    history = [json.loads(line) for line in (d.state / "history.jsonl").read_text().splitlines() if line.strip()]
    auto = [h for h in history if str(h.get("why", "")).startswith("auto-rollback") or h.get("why") == "canary failed"]
    status_json = request(d.socket, "GET", "/v1/status", timeout=30).json()
    code = d.stop()
    c = tally.counts
    lost = c["good: lost"] + c["bad: lost"]
    rows = [
        ("HTTP requests answered (good / bad)", f"{c['good: accepted']} / {c['bad: accepted']}", ""),
        ("HTTP requests lost (no answer while the daemon was up)", f"{lost}", "0"),
        ("HTTP requests cut by a kill -9 or refused while restarting",
         str(c["good: cut by a kill or restart"] + c["bad: cut by a kill or restart"]), ""),
        ("5xx answers", f"{c['5xx']}", "0"),
        ("answers other than expected (4xx for good, wrong 4xx for bad)",
         f"{c['good: unexpected status'] + c['bad: unexpected status'] + c['good: empty audio']}", "0"),
        ("spool requests dropped / lost", f"{len(ids)} / {len(left)}", "0 lost"),
        ("auto-rollbacks and failed canaries of good versions", f"{len(auto)}", "0"),
        ("versions dropped / kill -9 restarts / HTTP rollbacks",
         f"{events['versions dropped']} / {events['kill -9 and restart']} / "
         f"{sum(v for k, v in events.items() if k.startswith('rollbacks'))}", ""),
        ("daemon RSS after its first minute / at the end (MB)", f"{rss_start or float('nan'):.0f} / {rss_end:.0f}", ""),
        ("peak RSS of each daemon incarnation (MB)", ", ".join(f"{p:.0f}" for p in d.peaks), ""),
        ("exit code after SIGTERM", f"{code}", "0"),
    ]
    print(f"\n`{command}`\n\n{cpu_name()}, {args.minutes:g} minutes, 1-min load average {load_start:.2f} at "
          f"start, {os.getloadavg()[0]:.2f} at end; active at the end: "
          f"{[(v['name'], v['active']) for v in status_json['voices']]}\n")
    print("| measure | value | goal |\n|---|---:|---:|")
    for a, b, g in rows:
        print(f"| {a} | {b} | {g} |")
    if tally.unexpected or left or auto:
        print("\nproblems:")
        for note in tally.unexpected:
            print(" ", note)
        for i in left[:20]:
            print("  spool request never finished:", i)
        for h in auto:
            print("  rolled back by itself:", h)
    tmp.cleanup()
    if lost or c["5xx"] or left or auto or code:
        sys.exit(1)


if __name__ == "__main__":
    main()
