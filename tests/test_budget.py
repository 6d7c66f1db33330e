"""Voices within a budget (``--max-loaded``, ``--memory-budget``, ``--preload``), on a daemon's real
wiring in-process: ``Daemon`` built from a ``ServeConfig`` (manager, pool, metrics, backend), its
front ends served by ``inproc.FrontEnds``. Fake engines where a test must control loads (a slow
load, one that fails); tiny VITS voices where it need not."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_model, plausible, save_tiny_vits
from daemon_util import wait_for
from fake_engine import FakeEngine
from inproc import FrontEnds, Reply

from ttsd.config import ServeConfig
from ttsd.daemon import Daemon
from ttsd.errors import LoadError


class Rig:
    """A daemon's manager, pool and HTTP front end in-process, with a budget."""

    def __init__(self, root: Path, **config: Any) -> None:
        config.setdefault("seed_builtin", False)
        config.setdefault("settle", 0.0)
        self.root = root
        self.daemon = Daemon(ServeConfig(models=root / "models", state=root / "state", cache=root / "cache",
                                         socket=root / "s.sock", **config))
        self.manager = self.daemon.manager
        self.manager.start()
        self.front = FrontEnds(self.daemon.backend(), root)

    def say(self, voice: str, text: str = "hello there") -> Reply:
        return self.front.post("/v1/synthesize", {"text": text, "voice": voice})

    def voices(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.front.get("/v1/voices").json()["voices"]}

    def residency(self) -> dict[str, str]:
        return {name: v["residency"] for name, v in self.voices().items()}

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.front.get("/metrics").body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def close(self) -> None:
        self.front.close()
        self.daemon.pool.shutdown()
        self.manager.close()


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def fakes(root: Path, *names: str, **settings: Any) -> None:
    for name in names:
        fake_model(root / "models", name, "1", **settings.get(name, {}))


@pytest.mark.slow
def test_three_tiny_voices_in_two_slots_the_least_recently_used_idle_one_goes(tmp_path: Path,
                                                                              rigs: list[Rig]) -> None:
    """1. Three tiny VITS voices, --max-loaded 2: at start-up each is verified and warmed, and only
    the default voice (a) stays loaded. 2. b's first request loads it (a miss). 3. c's first
    request unloads b, the least recently used idle voice, and loads c. 4. /v1/voices, /v1/status
    and /metrics say so; each version's measured RSS cost is shown."""
    for seed, name in enumerate("abc"):
        save_tiny_vits(tmp_path / "models" / f"{name}-1", seed=seed, name=name, edit=plausible,
                       noise_scale_duration=0.0)
    rig = Rig(tmp_path, max_loaded=2)
    rigs.append(rig)
    assert rig.residency() == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
    assert all(v["active"] == "1" for v in rig.voices().values())

    reply = rig.say("b")
    assert reply.status == 200 and reply.headers["X-Ttsd-Voice"] == "b"
    assert rig.residency() == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    assert rig.say("a").status == 200  # a is used after b: b is now the least recently used

    reply = rig.say("c")
    assert reply.status == 200 and reply.headers["X-Ttsd-Voice"] == "c"
    assert rig.residency() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    voices = rig.voices()
    assert voices["b"]["last_used"] is not None and voices["b"]["last_used"] <= time.time()
    assert voices["b"]["versions"][0]["rss_bytes"] is None or voices["b"]["versions"][0]["rss_bytes"] > 0
    memory = rig.front.get("/v1/status").json()["memory"]
    assert memory["max_loaded"] == 2 and memory["loaded_versions"] == 2 and memory["rss_bytes"] > 0
    assert rig.metric("ttsd_voice_loads_total", voice="b") == 1
    assert rig.metric("ttsd_voice_loads_total", voice="c") == 1
    assert rig.metric("ttsd_voice_evictions_total", voice="b") == 1
    assert rig.metric("ttsd_voice_evictions_total", voice="a") == 0
    assert rig.metric("process_resident_memory_bytes") > 0


@pytest.mark.slow
def test_lru_order_over_four_voices(tmp_path: Path, fake_engines: None, rigs: list[Rig]) -> None:
    """1. Four voices, three slots, a preloaded (the default). 2. b then c load; b is used again.
    3. d's load unloads c (least recently used), not b."""
    fakes(tmp_path, "a", "b", "c", "d")
    rig = Rig(tmp_path, max_loaded=3)
    rigs.append(rig)
    for voice in ("b", "c", "b"):
        assert rig.say(voice).status == 200
    assert rig.say("d").status == 200
    assert rig.residency() == {"a": "loaded", "b": "loaded", "c": "unloaded", "d": "loaded"}
    assert FakeEngine.live == 3


@pytest.mark.slow
def test_a_voice_with_a_request_in_flight_is_never_unloaded(tmp_path: Path, fake_engines: None,
                                                            rigs: list[Rig]) -> None:
    """1. --max-loaded 2: a (preloaded) and b loaded, a request holds b. 2. A request for c cannot
    get room: 503 with Retry-After after the bounded wait, and b was not unloaded. 3. The same
    request again, with b's request ending while it waits: it gets room and c serves."""
    fakes(tmp_path, "a", "b", "c")
    # the wait must outlast the release at 0.3 s plus the loader's look for room (every 0.5 s) and a
    # load, on a busy CI box too
    rig = Rig(tmp_path, max_loaded=2, load_wait=2.5)
    rigs.append(rig)
    assert rig.say("b").status == 200
    held = rig.manager.map.acquire("b")

    started = time.monotonic()
    reply = rig.say("c")
    assert reply.status == 503 and reply.headers["Retry-After"] == "2", reply.body
    assert reply.error["code"] == "busy" and time.monotonic() - started < 5
    assert rig.residency() == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    assert rig.metric("ttsd_request_failures_total", fault="system") == 1  # the box's, never a model's

    threading.Timer(0.3, held.release).start()
    reply = rig.say("c")
    assert reply.status == 200 and reply.headers["X-Ttsd-Voice"] == "c"
    assert rig.residency() == {"a": "loaded", "b": "unloaded", "c": "loaded"}


@pytest.mark.slow
def test_concurrent_requests_for_a_cold_voice_share_one_load(tmp_path: Path, fake_engines: None,
                                                             rigs: list[Rig]) -> None:
    """1. b loads slowly (0.5 s) and is cold. 2. Six requests for it at once: all 200. 3. b was
    loaded once for them (one miss counted), and the event loop kept answering meanwhile."""
    fakes(tmp_path, "a", "b", b={"load_delay": 0.5})
    rig = Rig(tmp_path, max_loaded=2, workers=2, queue_size=8)
    rigs.append(rig)
    loads = FakeEngine.loads

    async def burst() -> tuple[list[Reply], float]:
        requests = [asyncio.ensure_future(rig.front.fetch("POST", "/v1/synthesize", {"text": "hi", "voice": "b"}))
                    for _ in range(6)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        health = await rig.front.fetch("GET", "/healthz")
        assert health.status == 200
        return list(await asyncio.gather(*requests)), time.monotonic() - started

    replies, _ = rig.front.run(burst())
    assert [r.status for r in replies] == [200] * 6
    assert FakeEngine.loads == loads + 1
    assert rig.metric("ttsd_voice_loads_total", voice="b") == 1


@pytest.mark.slow
def test_hot_upgrade_of_a_cold_voice_is_verified_warmed_then_unloaded(tmp_path: Path, fake_engines: None,
                                                                      rigs: list[Rig]) -> None:
    """1. b is cold. 2. b 2 is dropped in: it is loaded and warmed (a bad folder would be refused
    now), becomes active, and is unloaded again. 3. b 3 fails its warm-up: refused at drop time,
    b 2 stays active and unloaded. 4. A request for b gets b 2."""
    fakes(tmp_path, "a", "b")
    rig = Rig(tmp_path, max_loaded=2)
    rigs.append(rig)
    assert rig.residency() == {"a": "loaded", "b": "unloaded"}
    loads, live = FakeEngine.loads, FakeEngine.live
    fake_model(tmp_path / "models", "b", "2")
    rig.manager.reconcile()
    assert FakeEngine.loads == loads + 1 and FakeEngine.live == live
    b = rig.voices()["b"]
    assert b["active"] == "2" and b["residency"] == "unloaded"
    assert {v["version"]: v["state"] for v in b["versions"]} == {"1": "available", "2": "active"}

    fake_model(tmp_path / "models", "b", "3", fail_on="warmup")
    rig.manager.reconcile()
    b = rig.voices()["b"]
    states = {v["version"]: (v["state"], v["reason"]) for v in b["versions"]}
    assert states["3"][0] == "refused" and "warm-up" in states["3"][1]
    assert b["active"] == "2" and b["residency"] == "unloaded" and FakeEngine.live == live
    reply = rig.say("b")
    assert reply.status == 200 and reply.headers["X-Ttsd-Version"] == "2"


@pytest.mark.slow
def test_rollback_targets_count_and_go_first(tmp_path: Path, fake_engines: None, rigs: list[Rig]) -> None:
    """1. --max-loaded 3, --keep 1: a 1 and b 1 loaded. 2. a 2 arrives: a 1 stays as a rollback
    target (3 loaded). 3. c's first request unloads a 1, the rollback target, though b was used
    less recently. 4. Rolling a back still works: a 1 loads again."""
    fakes(tmp_path, "a", "b", "c")
    rig = Rig(tmp_path, max_loaded=3, keep=1)
    rigs.append(rig)
    assert rig.say("b").status == 200
    fake_model(tmp_path / "models", "a", "2")
    rig.manager.reconcile()
    assert {v["version"]: v["state"] for v in rig.voices()["a"]["versions"]} == {"1": "standby", "2": "active"}
    assert rig.say("a").status == 200
    assert rig.say("c").status == 200
    assert rig.residency() == {"a": "loaded", "b": "loaded", "c": "loaded"}
    assert {v["version"]: v["state"] for v in rig.voices()["a"]["versions"]} == {"1": "available", "2": "active"}
    result = rig.front.post("/v1/voices/a/rollback", {})
    assert result.status == 200 and result.json()["to"] == "1"
    assert rig.say("a").headers["X-Ttsd-Version"] == "1"
    assert FakeEngine.live <= 3


@pytest.mark.slow
def test_preload_keeps_a_voice_resident(tmp_path: Path, fake_engines: None, rigs: list[Rig]) -> None:
    """1. --max-loaded 2 --preload b: b is loaded from the start, a (the default voice) is not
    pinned. 2. a and c take turns in the other slot; b is never unloaded."""
    fakes(tmp_path, "a", "b", "c")
    rig = Rig(tmp_path, max_loaded=2, preload=("b",))
    rigs.append(rig)
    assert rig.residency() == {"a": "unloaded", "b": "loaded", "c": "unloaded"}
    for voice in ("a", "c", "a", "c"):
        assert rig.say(voice).status == 200
        assert rig.residency()["b"] == "loaded"
    assert rig.metric("ttsd_voice_evictions_total", voice="b") == 0
    assert rig.metric("ttsd_voice_evictions_total", voice="a") == 2


@pytest.mark.slow
def test_a_cold_voice_that_fails_to_load_is_the_models_fault(tmp_path: Path, fake_engines: None,
                                                             rigs: list[Rig], monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """1. b is cold. 2. Its engine now fails to load: the request gets 500 load_failed (the model's
    fault), b 1 is refused and b has nothing left to serve. 3. a is unaffected."""
    fakes(tmp_path, "a", "b")
    rig = Rig(tmp_path, max_loaded=2)
    rigs.append(rig)
    real_load = FakeEngine.load

    def load(self: FakeEngine) -> None:
        if self.manifest.name == "b":
            raise LoadError("the weights do not fit this engine any more")
        real_load(self)

    monkeypatch.setattr(FakeEngine, "load", load)
    reply = rig.say("b")
    assert reply.status == 500 and reply.error["code"] == "load_failed", reply.body
    assert "do not fit" in reply.error["message"]
    assert rig.metric("ttsd_request_failures_total", fault="model") == 1
    assert rig.say("a").status == 200


@pytest.mark.slow
def test_a_restart_brings_cold_voices_back_unloaded(tmp_path: Path, fake_engines: None, rigs: list[Rig]) -> None:
    """1. b serves within a budget, then the daemon stops. 2. After a restart only the default
    voice is loaded; b is active but unloaded, and its first request loads it. 3. Without a budget
    every voice loads at start-up, as before."""
    fakes(tmp_path, "a", "b")
    rig = Rig(tmp_path, max_loaded=2)
    assert rig.say("b").status == 200
    rig.close()
    rig = Rig(tmp_path, max_loaded=2)
    rigs.append(rig)
    assert rig.residency() == {"a": "loaded", "b": "unloaded"}
    assert rig.say("b").status == 200 and rig.residency()["b"] == "loaded"
    rig.close()
    rigs.remove(rig)
    rig = Rig(tmp_path)
    rigs.append(rig)
    assert rig.residency() == {"a": "loaded", "b": "loaded"}


@pytest.mark.slow
def test_a_memory_budget_unloads_by_measured_rss(tmp_path: Path, fake_engines: None, rigs: list[Rig],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The RSS is what the budget is measured against, before and after each load: with a fake
    RSS where each loaded voice adds 100 MB to a 500 MB process and a budget of 750 MB, two voices
    fit and the third unloads the least recently used."""
    import ttsd.serving.bringup
    import ttsd.serving.demand

    fakes(tmp_path, "a", "b", "c")

    def rss() -> int:
        return (500 + 100 * FakeEngine.live) << 20

    monkeypatch.setattr(ttsd.serving.bringup, "resident_bytes", rss)
    monkeypatch.setattr(ttsd.serving.demand, "resident_bytes", rss)
    rig = Rig(tmp_path, memory_budget=750 << 20)
    rigs.append(rig)
    assert rig.residency() == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
    assert rig.voices()["b"]["versions"][0]["rss_bytes"] == 100 << 20  # measured when it was warmed
    assert rig.say("b").status == 200
    assert rig.residency() == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    assert rig.say("c").status == 200
    assert rig.residency() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert json.loads(rig.front.get("/v1/status").body)["memory"]["budget_bytes"] == 750 << 20


def test_serve_flags_and_environment_make_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from click.testing import CliRunner

    import ttsd.daemon
    from ttsd.cli import main

    seen: list[ServeConfig] = []

    class Stub:
        def __init__(self, config: ServeConfig) -> None:
            seen.append(config)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(ttsd.daemon, "Daemon", Stub)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        args = ["serve", "--models", str(tmp_path / "m"), "--state", str(tmp_path / "s"), "--socket",
                str(tmp_path / "t.sock")]
        result = CliRunner().invoke(main, [*args, "--preload", "x", "--preload", "y"],
                                    env={"TTSD_MAX_LOADED": "3", "TTSD_MEMORY_BUDGET": "1.5G", "TTSD_LOAD_WAIT": "5"})
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    budget, default = seen
    assert (budget.max_loaded, budget.memory_budget, budget.preload, budget.load_wait) == (3, 3 << 29, ("x", "y"), 5.0)
    assert (default.max_loaded, default.memory_budget, default.preload) == (None, None, ())


@pytest.mark.slow
def test_a_voice_that_cannot_fit_beside_the_preloaded_ones_is_told_so_at_once(tmp_path: Path, fake_engines: None,
                                                                              rigs: list[Rig]) -> None:
    """--max-loaded 1 with voice a preloaded: voice b can never load, and nothing is busy. Its
    request gets 503 "unavailable" at once saying why, not "every loaded voice is busy, retry
    shortly" after waiting out --load-wait."""
    fakes(tmp_path, "a", "b")
    rigs.append(rig := Rig(tmp_path, max_loaded=1, preload=("a",), load_wait=6.0))
    started = time.monotonic()
    reply = rig.say("b")
    body = reply.json()
    assert reply.status == 503 and body["error"]["code"] == "unavailable", body
    assert "does not fit in the memory budget beside the preloaded voices (a" in body["error"]["message"]
    assert time.monotonic() - started < 3.0
    assert rig.say("a").status == 200


def test_a_preload_canary_or_default_voice_that_names_no_voice_is_said(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """--preload de_DE-thorsten-medium with no such voice did nothing, without a word."""
    import logging

    from ttsd.config import ServeConfig
    from ttsd.daemon import Daemon as InProcess

    (tmp_path / "models").mkdir()
    daemon = InProcess(ServeConfig(models=tmp_path / "models", state=tmp_path / "state", cache=tmp_path / "cache",
                                   socket=tmp_path / "s.sock", seed_builtin=False, max_loaded=2,
                                   preload=("de_DE-thorsten-medium",), default_voice="nobody",
                                   canary=(("fak", 0.1),), swap_policy="memory"))
    try:
        daemon.manager.start()
        with caplog.at_level(logging.WARNING, logger="ttsd.daemon"):
            daemon._check_names()
    finally:
        daemon.manager.close()
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--preload de_DE-thorsten-medium: no such voice in") for m in said), said
    assert any(m.startswith("--default-voice nobody: no such voice in") for m in said), said
    # a typo in --canary sent the real voice's next version to every request without a word; and
    # the memory policy holds no canary at all
    assert any(m.startswith("--canary fak: no such voice in") for m in said), said
    assert any(m.startswith("--canary does nothing under --swap-policy memory") for m in said), said


def test_a_canary_of_an_unloaded_voice_does_not_lock_its_other_users_out(tmp_path: Path, fake_engines: None,
                                                                        rigs: list[Rig]) -> None:
    """--max-loaded 2: a (preloaded) and b's canary v2 fill the budget while b's active v1 is
    unloaded. The users the canary share leaves on v1 are served v1 at once, loaded (once) beside
    its canary over the budget, as an upgrade loads: they waited out --load-wait for room that
    never came, then got 503, since a running canary is never unloaded. The canary's users keep
    v2, each user the same version every time."""
    fakes(tmp_path, "a", "b")
    rig = Rig(tmp_path, max_loaded=2, canary=(("b", 0.5),), canary_requests=1000)
    rigs.append(rig)
    fake_model(tmp_path / "models", "b", "2")
    rig.manager.reconcile()
    b = rig.voices()["b"]
    assert (b["active"], b["canary"], b["residency"]) == ("1", "2", "unloaded"), b
    loads = FakeEngine.loads
    heard: dict[str, str] = {}
    for i in range(16):
        started = time.monotonic()
        reply = rig.front.post("/v1/synthesize", {"text": "hello", "voice": "b", "user": f"user-{i}"})
        assert reply.status == 200 and time.monotonic() - started < 10, (i, reply.status, reply.body[:200])
        heard[f"user-{i}"] = reply.headers["X-Ttsd-Version"]
    assert set(heard.values()) == {"1", "2"}, heard
    again = {user: rig.front.post("/v1/synthesize", {"text": "hi", "voice": "b", "user": user}).headers[
        "X-Ttsd-Version"] for user in heard}
    assert again == heard  # one user, one version
    assert FakeEngine.loads == loads + 1, FakeEngine.loads - loads
    assert rig.voices()["b"]["canary"] == "2"


def test_a_version_loaded_beside_its_canary_for_requests_that_gave_up_stays(tmp_path: Path, fake_engines: None,
                                                                           rigs: list[Rig]) -> None:
    """As above, with b v1 taking longer to load than --load-wait: its first user gets 503, and
    the load goes on; the version it loaded stays, though nobody waits for it any more (over the
    budget it was the only one that could go: it was unloaded at once, and every next user of v1
    loaded it again, in vain)."""
    fakes(tmp_path, "a", "b", b={"load_delay": 1.0})
    rig = Rig(tmp_path, max_loaded=2, canary=(("b", 0.5),), canary_requests=1000, load_wait=0.3)
    rigs.append(rig)
    fake_model(tmp_path / "models", "b", "2")
    rig.manager.reconcile()
    loads = FakeEngine.loads
    for i in range(32):  # the canary's users are served at once; the first of v1's waits, in vain
        user = f"user-{i}"
        if rig.front.post("/v1/synthesize", {"text": "hello", "voice": "b", "user": user}).status == 503:
            break
    else:
        pytest.fail("no user fell to v1")
    wait_for(lambda: FakeEngine.loads > loads and rig.manager.demand.waiting_for("b") == 0
             and not rig.manager.jobs.busy("b"), 10, "b 1's load ended")
    assert rig.residency()["b"] == "loaded", rig.voices()["b"]
    reply = rig.front.post("/v1/synthesize", {"text": "hi", "voice": "b", "user": user})
    assert reply.status == 200 and reply.headers["X-Ttsd-Version"] == "1"
    assert FakeEngine.loads - loads == 1, FakeEngine.loads - loads


def test_a_version_that_no_longer_serves_leaves_the_metrics(tmp_path: Path, rigs: list[Rig],
                                                            fake_engines: None) -> None:
    """Each version that served kept its ~30 series for the daemon's life: after 1,000 upgrades a
    scrape was 5 MB and held the event loop 0.66 s. A version's series go once it is unloaded and
    serves nothing (here: v1, beyond --keep 1 after two upgrades); a rollback target still
    loaded keeps them."""
    fake_model(tmp_path / "models", "voice", "1")
    rig = Rig(tmp_path)
    rigs.append(rig)

    def versions() -> set[str]:
        text = rig.front.get("/metrics").body.decode()
        return {line.split('version="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith(("ttsd_requests_total{", "ttsd_audio_seconds_total{")) and 'voice="voice"' in line}

    for version in ("1", "2", "3"):
        if version != "1":
            fake_model(tmp_path / "models", "voice", version)
            rig.manager.reconcile()
        assert rig.say("voice").status == 200
    wait_for(lambda: versions() == {"2", "3"}, timeout=10, what="v1's series gone, v2's (stand-by) kept")
