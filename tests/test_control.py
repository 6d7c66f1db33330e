"""Control never waits behind background work: a rollback or an activate answers at once while
another version is copied in or loaded, and calls that upgrade off; a newer folder supersedes an
upgrade in progress; listings are consistent while versions come and go; unloading never holds up
the request whose release asked for it. In-process, fake engines (``load_spin``: a load that
computes, in Python calls, for that many CPU seconds)."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from conftest import fake_model, make_manager, v2_over_v1
from daemon_util import wait_for
from fake_engine import FakeEngine

from ttsd.serving.manager import ModelManager


def states(manager: ModelManager, voice: str = "voice") -> dict[str, str]:
    return {v["version"]: v["state"] for v in next(x for x in manager.snapshot() if x["name"] == voice)["versions"]}


def in_background(fn) -> threading.Thread:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_rollback_during_an_upgrade_answers_at_once_and_calls_the_upgrade_off(tmp_path: Path,
                                                                                 fake_engines: None) -> None:
    """1. v1 then v2: v2 serves, v1 is a loaded rollback target. 2. v3 arrives, and its load
    computes for a long time. 3. While it loads, a rollback answers in well under a second:
    v1 serves, v2 is rolled back. 4. v3's upgrade is called off: it never serves, it is available
    with the reason, and nothing of it stays loaded. 5. A rescan does not promote it again."""
    models, manager = v2_over_v1(tmp_path)
    fake_model(models, "voice", "3", load_spin=60)
    upgrade = in_background(manager.reconcile)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=30, interval=0.01, what="v3 loading")
    started = time.monotonic()
    result = manager.rollback("voice")
    took = time.monotonic() - started
    assert (result["from"], result["to"]) == ("2", "1") and took < 0.5, (result, took)
    with manager.acquire("voice") as lease:
        assert lease.voice.version == "1"
    upgrade.join(10)
    assert not upgrade.is_alive()
    assert states(manager) == {"1": "active", "2": "rolled-back", "3": "available"}
    v3 = manager.version("voice", "3")
    assert v3 is not None and v3.engine is None and "called off" in v3.reason and "rollback" in v3.reason
    wait_for(lambda: FakeEngine.live == 1, timeout=10, what="v2 unloaded")
    manager.reconcile()
    assert manager.snapshot()[0]["active"] == "1" and states(manager)["3"] == "available"
    rollback = [h for h in manager.history() if h["why"] == "rollback requested"]
    assert rollback and "load_seconds" not in rollback[-1]  # a swap: nothing was loaded for it
    manager.close()


@pytest.mark.slow
def test_a_rollback_to_an_unloaded_version_does_not_wait_for_the_upgrade(tmp_path: Path,
                                                                          fake_engines: None) -> None:
    """keep=0: the rollback target must load. 1. v2 serves, v1 is not loaded. 2. v3's long load
    runs. 3. The rollback loads v1 as an urgent job beside it, calls v3 off, and answers within
    2 s."""
    models, manager = v2_over_v1(tmp_path, keep=0)
    assert states(manager)["1"] == "available"
    fake_model(models, "voice", "3", load_spin=60)
    upgrade = in_background(manager.reconcile)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=30, interval=0.01, what="v3 loading")
    started = time.monotonic()
    result = manager.rollback("voice")
    assert result["to"] == "1" and time.monotonic() - started < 2.0
    upgrade.join(10)
    assert not upgrade.is_alive() and states(manager)["3"] == "available"
    manager.close()


@pytest.mark.slow
def test_a_newer_folder_supersedes_an_upgrade_in_progress(tmp_path: Path, fake_engines: None) -> None:
    """1. v1 serves. 2. v2 arrives; its load computes for a long time. 3. v3 arrives: the rescan
    calls v2's upgrade off and v3 serves within seconds, not after v2's load. 4. v2 is available,
    never loaded or refused."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "voice", "2", load_spin=60)
    upgrade = in_background(manager.reconcile)
    wait_for(lambda: states(manager).get("2") == "loading", timeout=30, interval=0.01, what="v2 loading")
    fake_model(models, "voice", "3")
    started = time.monotonic()
    manager.reconcile()
    assert manager.snapshot()[0]["active"] == "3" and time.monotonic() - started < 5.0
    upgrade.join(10)
    assert not upgrade.is_alive()
    assert states(manager) == {"1": "standby", "2": "available", "3": "active"}
    assert "called off" in (manager.version("voice", "2").reason or "")  # type: ignore[union-attr]
    manager.close()


@pytest.mark.slow
def test_listings_stay_whole_while_folders_come_and_go(tmp_path: Path, fake_engines: None) -> None:
    """What /v1/voices, /v1/status and Wyoming's describe read (``snapshot``, ``memory``) is read
    on the event loop while rescans add and forget versions on other threads. Hammered with a tiny
    GIL switch interval, so a thread switch lands inside a listing's walk of the table: never a
    "dictionary changed size during iteration"."""
    interval = sys.getswitchinterval()
    models = tmp_path / "models"
    for name in ("a", "b", "c"):
        fake_model(models, name, "100")
    manager = make_manager(tmp_path)
    manager.start()
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                manager.snapshot()
                manager.memory()
                manager.folders()
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                errors.append(exc)
                return

    sys.setswitchinterval(1e-6)
    readers = [in_background(hammer) for _ in range(2)]
    try:
        for i in range(150):  # older versions: each rescan adds a record, none loads
            folder = fake_model(models, "abc"[i % 3], f"1.{i}")
            manager.reconcile()
            if i % 4 == 0:
                shutil.rmtree(folder)  # and forgets some
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        for reader in readers:
            reader.join(10)
        manager.close()
    assert not errors, errors[0]


@pytest.mark.slow
def test_an_unload_never_holds_up_the_request_that_asked_for_it(tmp_path: Path, fake_engines: None) -> None:
    """1. A request leases v1. 2. v2 is swapped in (keep 0: v1 is retired). 3. The request ends:
    its release returns at once although unloading v1 takes a second, and v1 is unloaded on
    another thread."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1", unload_delay=1.0)
    manager = make_manager(tmp_path, keep=0)
    manager.start()
    lease = manager.acquire("voice")
    fake_model(models, "voice", "2")
    manager.reconcile()
    started = time.monotonic()
    lease.release(True)
    assert time.monotonic() - started < 0.3
    wait_for(lambda: FakeEngine.unloaded_on, timeout=10, what="v1 unloaded")
    assert FakeEngine.unloaded_on == [n for n in FakeEngine.unloaded_on if n != threading.current_thread().name]
    manager.close()


@pytest.mark.slow
def test_an_upgrade_called_off_while_it_is_copied_in_says_so(tmp_path: Path, fake_engines: None,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """While a request is in flight the copy into the store is paced, so it takes a while. 1. v3
    (80 MB) is being copied in when a rollback comes: it is called off, available, with the
    reason, and no partial copy is left. 2. v4's folder is deleted while it is copied in: logged,
    and the version is forgotten."""
    models, manager = v2_over_v1(tmp_path)
    lease = manager.acquire("voice")  # a request in flight: background work is paced
    try:
        fake_model(models, "voice", "3", blob_mb=80)
        upgrade = in_background(manager.reconcile)
        wait_for(lambda: states(manager).get("3") == "verifying", timeout=30, interval=0.01, what="v3 copied in")
        time.sleep(0.2)
        manager.rollback("voice")
        upgrade.join(30)
        v3 = manager.version("voice", "3")
        assert v3 is not None and v3.state.value == "available" and "called off" in v3.reason
        assert not list((tmp_path / "state" / "store").glob(".*.partial"))

        folder = fake_model(models, "voice", "4", blob_mb=80)
        upgrade = in_background(manager.reconcile)
        wait_for(lambda: states(manager).get("4") == "verifying", timeout=30, interval=0.01, what="v4 copied in")
        time.sleep(0.2)
        shutil.rmtree(folder)
        upgrade.join(30)
    finally:
        lease.release()
    assert "4" not in states(manager) and "went away while it was copied into the store" in caplog.text
    manager.close()


@pytest.mark.slow
def test_a_version_neither_stored_nor_in_the_models_dir_is_forgotten(tmp_path: Path, fake_engines: None) -> None:
    """The store keeps the active version and the three most recent rollback targets. 1. Versions
    1 to 6 arrive in turn, each folder deleted once it serves. 2. Versions 1 and 2 are no longer
    kept: with no folder either, they can never serve again, and are gone from the listing and
    from state.json, not shown as available (a rollback to one would fail)."""
    models = tmp_path / "models"
    manager = make_manager(tmp_path, keep=0)
    manager.start()
    for version in range(1, 7):
        folder = fake_model(models, "voice", str(version))
        manager.reconcile()
        assert manager.snapshot()[0]["active"] == str(version)
        shutil.rmtree(folder)
    manager.reconcile()  # the rescan that sees the last folder gone
    wait_for(lambda: set(states(manager)) == {"3", "4", "5", "6"}, timeout=10, what="1 and 2 forgotten")
    manager.close()
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert sorted(saved["versions"]) == ["voice/3", "voice/4", "voice/5", "voice/6"]


def test_rollback_without_voice_takes_the_one_voice_even_while_it_serves_nothing() -> None:
    """``ttsd rollback`` with no ``--voice``: the one active voice; with none active (an upgrade
    under --swap-policy memory has it out of service for the moment), the one voice the daemon
    has; several, or none at all, is a usage error that says what to do."""
    from ttsd.cli.control import _only_voice
    from ttsd.errors import ConfigError

    class Daemon:
        def __init__(self, voices: list[dict[str, object]]) -> None:
            self.voices = voices

        def status(self) -> dict[str, object]:
            return {"voices": self.voices}

    assert _only_voice(Daemon([{"name": "a", "active": "1"}, {"name": "b", "active": None}]), None) == "a"
    assert _only_voice(Daemon([{"name": "a", "active": None}]), None) == "a"
    assert _only_voice(Daemon([]), "x") == "x"
    with pytest.raises(click.UsageError, match="several voices"):
        _only_voice(Daemon([{"name": "a", "active": "1"}, {"name": "b", "active": "2"}]), None)
    with pytest.raises(ConfigError, match="no voice"):
        _only_voice(Daemon([]), None)


def test_the_status_memory_line_counts_versions_in_english() -> None:
    """``ttsd status`` said "1 versions loaded"."""
    from ttsd.cli.control import _memory_line

    assert _memory_line({"rss_bytes": 2**29, "loaded_versions": 1}) == "RSS 512 MB, 1 version loaded"
    assert _memory_line({"rss_bytes": 2**29, "loaded_versions": 2}) == "RSS 512 MB, 2 versions loaded"
    assert _memory_line({"rss_bytes": 2**29, "loaded_versions": 1, "max_loaded": 3}).endswith("1 of 3 versions loaded")
