"""A busy box: with one CPU-bound program per core beside it (``sh -c 'while :; do :; done'`` at
nice 0, started here), ``ttsd serve`` comes up, upgrades and rolls back on time, measured against
a quiet run of the same steps in the same test. The voices are fake ones whose load computes
(``load_spin``) in Python calls, as a real load's build and warm-up do.

The goals are the issue's (``bench/busy.py`` measures them on the real voice): ready and drop ->
active at most 4x the quiet times, ``/healthz`` never slower than 1 s, a rollback issued while a
long upgrade is loading answers at once (the test allows 0.5 s against the bench's 0.2 on a noisy
shared box), and no request fails. Before background work stopped running in ``SCHED_IDLE``, the
busy start-up alone took minutes."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_util import Daemon, fake_daemon_model, fake_site, start_daemon, wait_for

SPIN = 0.3  # CPU seconds each fake load computes


class Probe:
    """/healthz every 50 ms and a short request every 0.2 s, until ``stop``."""

    def __init__(self, d: Daemon) -> None:
        self.d, self.stopping = d, threading.Event()
        self.health: list[float] = []
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last_request = 0.0
        while not self.stopping.is_set():
            started = time.monotonic()
            ok = self.d.request("GET", "/healthz", timeout=30).status == 200
            self.health.append(time.monotonic() - started if ok else float("inf"))
            if started - last_request > 0.2:
                last_request = started
                self.statuses.append(self.d.post("/v1/synthesize", {"text": "hello there"}, timeout=30).status)
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)


def active(d: Daemon) -> tuple[str | None, dict[str, str]]:
    voice = d.request("GET", "/v1/voices").json()["voices"][0]
    return voice["active"], {v["version"]: v["state"] for v in voice["versions"]}


def steps(root: Path, cache: Path, busy: bool) -> dict[str, Any]:
    """1. Start on v1 (its load computes): time to ready. 2. v2 renamed in: drop -> active.
    3. v3, whose load computes for a minute, renamed in; while it loads, a rollback: its latency.
    /healthz and requests are probed from ready to the end."""
    models = root / "models"
    fake_daemon_model(models / "fake-1", "1", load_spin=SPIN)
    fake_daemon_model(root / "stage2", "2", load_spin=SPIN)
    fake_daemon_model(root / "stage3", "3", load_spin=60)
    time.sleep(0.3)  # older than --settle when renamed in
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(os.cpu_count() or 2)] if busy else []
    probe = None
    try:
        started = time.monotonic()
        d = start_daemon(root, cache, "--no-seed", "--settle", "0.2", timeout=90)
        r = {"ready": time.monotonic() - started}
        probe = Probe(d)
        dropped = time.monotonic()
        os.rename(root / "stage2", models / "fake-2")
        wait_for(lambda: active(d)[0] == "2", timeout=60, interval=0.02, what="v2 active")
        r["to_active"] = time.monotonic() - dropped
        os.rename(root / "stage3", models / "fake-3")
        wait_for(lambda: active(d)[1].get("3") == "loading", timeout=60, interval=0.02, what="v3 loading")
        asked = time.monotonic()
        reply = d.post("/v1/voices/fake/rollback", {}, timeout=120)
        r["rollback"] = time.monotonic() - asked
        assert reply.status == 200 and reply.json()["to"] == "1", reply.body
        wait_for(lambda: active(d)[1].get("3") == "available", timeout=30, what="v3's upgrade called off")
        time.sleep(0.5)
        probe.stop()
        assert d.stop() == 0, d.logs()
    finally:
        if probe is not None:
            probe.stop()
        for hog in hogs:
            hog.kill()
            hog.wait()
    r["healthz_worst"] = max(probe.health)
    r["failed"] = [s for s in probe.statuses if s != 200]
    r["requests"] = len(probe.statuses)
    return r


@pytest.mark.daemon
def test_start_up_upgrade_and_rollback_beside_cpu_bound_programs(tmp_path: Path, cache_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    quiet = steps(tmp_path / "quiet", cache_dir, busy=False)
    busy = steps(tmp_path / "busy", cache_dir, busy=True)
    shown = f"quiet {quiet}, busy {busy}"
    assert busy["ready"] <= 4 * max(quiet["ready"], 0.5), shown
    assert busy["to_active"] <= 4 * max(quiet["to_active"], 0.5), shown
    for r in (quiet, busy):
        assert r["healthz_worst"] <= 1.0 and r["rollback"] <= 0.5, shown
        assert r["requests"] > 3 and not r["failed"], shown
