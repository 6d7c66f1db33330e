"""kill -9 in the middle of a hot upgrade (while the new version is checked, copied into the
store, loaded or warmed up), then a restart: nothing half-made serves, nothing is blamed on the
version; and in the middle of a rollback's load: the restart finishes the rollback. (On its own
file so that a parallel run spreads the hot-upgrade tests over two workers.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_util import Daemon, fake_daemon_model, fake_site, start_daemon, wait_for
from test_hotswap import version_states, voices

from ttsd.manifest import verify
from ttsd.serving.store import content_id


def read_history(state: Path) -> list[dict[str, object]]:
    path = state / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.daemon
@pytest.mark.parametrize("step, settings", [("verifying", {"blob_mb": 400}), ("storing", {"blob_mb": 400}),
                                            ("loading", {"load_delay": 2}), ("warming", {"warmup_delay": 2})])
def test_kill_9_mid_load_restarts_on_a_verified_version(tmp_path: Path, cache_dir: Path, step: str,
                                                        settings: dict[str, object],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 while v2 is checked in the models dir, copied into the store (a .partial copy on
    disk), loaded or warmed up. After a restart: every version that serves has a store copy that
    verifies and holds exactly its folder's files, and is the content the daemon reports; no
    .partial copy is left; v2 is judged again and becomes active, never refused or deferred (the
    crash was not its fault); state.json and the history agree with that. Which version answers
    first after the restart is not asserted: only that whichever does was verified."""
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    models, state = tmp_path / "models", tmp_path / "state"
    store = state / "store"
    fake_daemon_model(models / "fake-1", "1")
    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--settle", "0.2")
    fake_daemon_model(tmp_path / "stage", "2", **settings)
    os.rename(tmp_path / "stage", models / "fake-2")
    if step == "storing":  # still "verifying" to the API: the copy is verified before it is renamed in
        wait_for(lambda: list(store.glob(".fake-2.*.partial")) or (store / "fake" / "2").exists(), timeout=60,
                 interval=0.02, what="v2 being stored")
    else:
        wait_for(lambda: version_states(d, "fake").get("2", {}).get("state") == step, timeout=30, interval=0.02,
                 what=step)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    before = read_history(state)
    assert [h["to"] for h in before] == ["1"], f"v2 got past {step} before the kill: {before}"
    copies = [copy for copy in store.glob("*/*") if not copy.parent.name.startswith(".")]
    for copy in copies:  # what the store holds under a real name is complete and verified
        verify(copy)
    if step == "storing":
        assert list(store.glob(".*.partial")), "the kill did not interrupt the copy into the store"

    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--settle", "0.2")
    try:
        first = d.post("/v1/synthesize", {"text": "hello"})
        assert first.status == 200
        served = {first.headers["x-ttsd-version"]}
        wait_for(lambda: voices(d)["fake"]["active"] == "2", timeout=60, what="v2 active after restart")
        again = d.post("/v1/synthesize", {"text": "hello"})
        assert again.status == 200 and again.headers["x-ttsd-version"] == "2"
        served.add("2")
        reported = {v: s["content"] for v, s in version_states(d, "fake").items()}
        for version in sorted(served):
            stored = verify(store / "fake" / version)  # raises VerifyError on an incomplete or changed copy
            assert stored.files == verify(models / f"fake-{version}").files, version
            assert content_id(stored) == reported[version], (version, reported)
        assert not list(store.glob(".*.partial")), "an interrupted copy was left in the store"
    finally:
        assert d.stop() == 0, d.logs()
    after = read_history(state)
    assert after[:len(before)] == before
    new = after[len(before):]
    assert not [h for h in new if h["why"] in ("refused", "deferred")], new
    assert [h["to"] for h in after].count("2") == 1 and new[-1]["to"] == "2", after
    saved = json.loads((state / "state.json").read_text())
    assert saved["voices"]["fake"]["active"] == "2" and "1" in saved["voices"]["fake"]["previous"], saved
    assert saved["voices"]["fake"]["rolled_back"] == [], saved
    assert saved["versions"]["fake/2"]["state"] == "active", saved
    for version in ("1", "2"):
        assert saved["versions"][f"fake/{version}"]["content"] == content_id(verify(store / "fake" / version))


@pytest.mark.daemon
def test_kill_9_while_a_rollback_loads_its_target_finishes_the_rollback_at_the_restart(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--keep 0: v2 serves, v1 is its unloaded rollback target, slow to load. `ttsd rollback`,
    and kill -9 while v1 loads. The restart serves v1, with v2 rolled back (it served v2 again:
    the rollback was written to state.json only at the swap), and the history has the move."""
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    models, state = tmp_path / "models", tmp_path / "state"
    fake_daemon_model(models / "fake-1", "1", load_delay=2)
    args = ("--no-seed", "--settle", "0.2", "--keep", "0")
    d = start_daemon(tmp_path, cache_dir, *args)
    fake_daemon_model(tmp_path / "stage", "2")
    os.rename(tmp_path / "stage", models / "fake-2")
    wait_for(lambda: voices(d)["fake"]["active"] == "2", timeout=30, what="v2 active")
    assert version_states(d, "fake")["1"]["state"] != "standby"  # not loaded: the rollback must load it
    env = dict(d.env, TTSD_SOCKET=str(d.socket))
    cli = subprocess.Popen([sys.executable, "-m", "ttsd", "rollback"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: version_states(d, "fake")["1"]["state"] == "loading", timeout=30, interval=0.02,
                 what="v1 loading for the rollback")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
    finally:
        cli.kill()
        cli.wait(10)
    assert json.loads((state / "state.json").read_text())["voices"]["fake"]["active"] == "2"  # not swapped yet

    d = start_daemon(tmp_path, cache_dir, *args)
    try:
        assert voices(d)["fake"]["active"] == "1", voices(d)
        assert version_states(d, "fake")["2"]["state"] == "rolled-back"
        assert d.post("/v1/synthesize", {"text": "back"}).headers["x-ttsd-version"] == "1"
    finally:
        assert d.stop() == 0, d.logs()
    assert ("2", "1") in [(h["from"], h["to"]) for h in read_history(state)]
    saved = json.loads((state / "state.json").read_text())["voices"]["fake"]
    assert saved["active"] == "1" and "2" in saved["rolled_back"] and "rolling_to" not in saved, saved


@pytest.mark.daemon
def test_a_version_whose_load_kills_the_daemon_three_times_waits_for_sighup(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2 is too big for the box: the kernel's OOM killer ends the daemon as v2 loads (kill -9
    here), and systemd starts it into the same load again, until the unit's start limit leaves no
    daemon at all. After three such deaths in a row, the restart serves v1 and leaves v2 waiting,
    with the reason; SIGHUP tries it again. A stop by SIGTERM during the load is no death."""
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    models = tmp_path / "models"
    fake_daemon_model(models / "fake-1", "1")
    args = ("--no-seed", "--settle", "0.2")
    assert start_daemon(tmp_path, cache_dir, *args).stop() == 0  # v1 serves, as it did for months
    fake_daemon_model(models / "fake-2", "2", load_delay=2)

    def start_into_v2_loading() -> Daemon:  # (the start-up's upgrade: before the daemon is ready)
        d = start_daemon(tmp_path, cache_dir, *args, wait_ready=False)
        marks = tmp_path / "state" / "loading.json"
        wait_for(lambda: d.proc.poll() is None and "serves again" in d.logs()
                 and "fake/2" in (marks.read_text() if marks.exists() else ""),
                 timeout=60, interval=0.02, what="v2 loading")
        return d

    for death in (True, False, True, True, True):  # an orderly stop between: the count starts again
        d = start_into_v2_loading()
        if death:
            d.kill()
        else:
            assert d.stop() == 0
    d = start_daemon(tmp_path, cache_dir, *args)
    time.sleep(1.0)  # a few rescans: v2 is not tried again by itself
    v2 = version_states(d, "fake")["2"]
    assert v2["state"] == "deferred" and "killed while loading it" in str(v2["reason"]), v2
    assert voices(d)["fake"]["active"] == "1"
    assert d.post("/v1/synthesize", {"text": "hello"}).headers["x-ttsd-version"] == "1"
    assert "3 such load(s) in a row" in d.logs()
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: voices(d)["fake"]["active"] == "2", timeout=60, what="v2 active after SIGHUP")
    assert d.stop() == 0, d.logs()
    assert not (tmp_path / "state" / "loading.json").exists()
