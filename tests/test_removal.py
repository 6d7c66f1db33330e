"""``ttsd models remove VOICE`` in-process (the manager's ``remove``): a voice leaves the running
daemon, the other voices untouched, requests already holding it finish, and nothing of it comes
back at the next rescan or restart but its rollback marks. The CLI and HTTP route are tested in
``test_control.py``-style daemon tests (``test_lifecycle.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fake_model, make_manager, v2_over_v1
from daemon_util import wait_for
from fake_engine import FakeEngine

from ttsd.errors import ConflictError, StateLockedError, UnknownVoiceError
from ttsd.serving.manager import ModelManager
from ttsd.serving.pacing import Superseded
from ttsd.serving.removal import remove_stopped
from ttsd.serving.state import StateDirLock
from ttsd.serving.versions import State


def names(manager: ModelManager) -> list[str]:
    return [v["name"] for v in manager.snapshot()]


def two_voices(tmp_path: Path, **policy: object) -> tuple[Path, ModelManager]:
    """ "voice" (v2 serving over v1) and "other" (v1); the folders of "voice" deleted, as the
    removal asks (it serves on from its store copies)."""
    models, manager = v2_over_v1(tmp_path, **policy)
    fake_model(models, "other", "1")
    manager.reconcile()
    for folder in ("voice-1", "voice-2"):
        shutil.rmtree(models / folder)
    manager.reconcile()
    with manager.acquire("voice") as lease:
        assert lease.voice.version == "2"  # still serving from the store
    return models, manager


def test_a_removed_voice_leaves_at_once_and_for_good(tmp_path: Path, fake_engines: None) -> None:
    models, manager = two_voices(tmp_path)
    live = FakeEngine.live
    answer = manager.remove("voice")
    assert (answer["voice"], answer["removed"], answer["active"]) == ("voice", ["1", "2"], "2")
    with pytest.raises(UnknownVoiceError):
        manager.acquire("voice")
    with pytest.raises(UnknownVoiceError):
        manager.acquire("voice", "1")  # no version of it either
    assert names(manager) == ["other"]
    assert not (tmp_path / "state" / "store" / "voice").exists()
    assert not [p for p in (tmp_path / "state" / "store").iterdir() if p.name.startswith(".")]  # nothing left aside
    wait_for(lambda: FakeEngine.live == live - 2, timeout=5)  # both versions were loaded (v1 stood by)
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert "voice" not in saved["voices"] and not [k for k in saved["versions"] if k.startswith("voice/")], saved
    entry = manager.history(1)[0]
    assert (entry["voice"], entry["from"], entry["to"], entry["why"]) == ("voice", "2", None, "removed")
    manager.reconcile()  # a rescan does not bring it back
    assert names(manager) == ["other"]
    with manager.acquire("other") as lease:
        assert lease.voice.version == "1"
    manager.close()
    restarted = make_manager(tmp_path)
    restarted.start()
    assert names(restarted) == ["other"]
    fake_model(models, "voice", "1")  # dropped in again later: a voice like any new one
    restarted.reconcile()
    with restarted.acquire("voice") as lease:
        assert lease.voice.version == "1"
    restarted.close()


def test_its_rollback_marks_stay(tmp_path: Path, fake_engines: None) -> None:
    """A version rolled back (or withdrawn by a fleet mirror) does not serve by itself when it is
    dropped in again after the voice was removed, as after the stop-and-delete recipe."""
    models, manager = two_voices(tmp_path)
    manager.rollback("voice")  # 2 rolled back, 1 serves
    manager.remove("voice")
    assert json.loads((tmp_path / "state" / "state.json").read_text())["voices"]["voice"]["rolled_back"] == ["2"]
    fake_model(models, "voice", "2")
    fake_model(models, "voice", "3")
    manager.reconcile()
    with manager.acquire("voice") as lease:
        assert lease.voice.version == "3"
    voice = next(v for v in manager.snapshot() if v["name"] == "voice")
    versions = {v["version"]: v["state"] for v in voice["versions"]}
    assert versions["2"] == "rolled-back", versions
    manager.close()


def test_a_voice_with_a_folder_left_is_not_removed(tmp_path: Path, fake_engines: None) -> None:
    models, manager = v2_over_v1(tmp_path)
    fake_model(models, "other", "1")
    manager.reconcile()
    shutil.rmtree(models / "voice-1")  # deleted, the rescan not yet run: it does not count
    with pytest.raises(ConflictError, match=r"still has a folder in the models dir.*voice-2; delete it first"):
        manager.remove("voice")
    with manager.acquire("voice") as lease:  # nothing changed
        assert lease.voice.version == "2"
    assert (tmp_path / "state" / "store" / "voice" / "2").is_dir()
    manager.close()


def test_the_only_voice_and_the_default_voice_are_not_removed(tmp_path: Path, fake_engines: None) -> None:
    models, manager = v2_over_v1(tmp_path)
    shutil.rmtree(models / "voice-1")
    shutil.rmtree(models / "voice-2")
    with pytest.raises(ConflictError, match="the only voice that serves"):
        manager.remove("voice")
    with pytest.raises(UnknownVoiceError, match="unknown voice 'nobody'"):
        manager.remove("nobody")
    manager.close()
    fake_model(models, "other", "1")
    manager = make_manager(tmp_path, default_voice="voice")
    manager.start()
    with pytest.raises(ConflictError, match="--default-voice"):
        manager.remove("voice")
    with manager.acquire("voice") as lease:
        assert lease.voice.version == "2"
    manager.close()


def test_requests_holding_it_finish_first(tmp_path: Path, fake_engines: None) -> None:
    _, manager = two_voices(tmp_path, keep=0)
    lease = manager.acquire("voice")
    answers: list[dict[str, object]] = []
    remover = threading.Thread(target=lambda: answers.append(manager.remove("voice")))
    remover.start()
    wait_for(lambda: manager.map.leaving("voice"), timeout=5)
    with pytest.raises(UnknownVoiceError, match="being removed"):
        manager.acquire("voice")  # new requests are refused at once
    with pytest.raises(ConflictError, match="being removed"):
        manager.activate("voice", "2")
    with pytest.raises(ConflictError, match="being removed"):  # (not "being upgraded")
        manager.rollback("voice")
    time.sleep(0.3)
    assert not answers and lease.engine.loaded  # its request still runs on it
    assert lease.engine.synthesize("still speaking").duration > 0
    lease.release(True)
    remover.join(10)
    assert answers and answers[0]["removed"] == ["1", "2"] and not lease.cut
    assert not lease.engine.loaded
    manager.close()


def test_a_request_that_holds_it_too_long_is_cut(tmp_path: Path, fake_engines: None) -> None:
    _, manager = two_voices(tmp_path, keep=0)
    manager.removal.wait = 0.3
    lease = manager.acquire("voice")
    manager.remove("voice")
    assert lease.cut and not lease.engine.loaded  # the daemon's doing: its release judges nothing
    lease.release(False)
    assert names(manager) == ["other"]
    manager.close()


def test_an_upgrade_under_way_is_called_off(tmp_path: Path, fake_engines: None) -> None:
    """An upgrade of the voice being loaded when the removal comes is called off: nothing of it
    serves, and it is not in the store."""
    models, manager = two_voices(tmp_path)
    live = FakeEngine.live
    fake_model(models, "voice", "3", load_delay=1.0)
    manager.reconcile(wait=False)
    wait_for(lambda: (v3 := manager.version("voice", "3")) is not None and v3.state is State.LOADING, timeout=5)
    shutil.rmtree(models / "voice-3")  # (copied into the store by now)
    manager.remove("voice")
    manager.jobs.wait(10)
    manager.reconcile()
    assert names(manager) == ["other"] and FakeEngine.live == live - 2  # v2 and v1 went; v3 never came
    assert not (tmp_path / "state" / "store" / "voice").exists()
    manager.close()


def test_its_wait_for_requests_holds_up_no_other_voice(tmp_path: Path, fake_engines: None) -> None:
    """The removal waits for the voice's last requests outside every job lane: a rollback of
    another voice that must load waited for a removal's 30 s."""
    models, manager = two_voices(tmp_path, keep=0)
    fake_model(models, "other", "2")
    manager.reconcile()  # other: 2 serves, 1 unloaded (keep=0): a rollback to it loads it
    manager.removal.wait = 20.0
    lease = manager.acquire("voice")
    remover = threading.Thread(target=manager.remove, args=("voice",))
    remover.start()
    wait_for(lambda: manager.map.leaving("voice"), timeout=5)
    started = time.monotonic()
    assert manager.rollback("other")["to"] == "1"
    assert time.monotonic() - started < 10 and remover.is_alive()
    lease.release(True)
    remover.join(10)
    assert names(manager) == ["other"]
    manager.close()


def test_with_no_daemon_running_it_is_done_on_disk(tmp_path: Path, fake_engines: None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """``ttsd models remove`` when no daemon answers: the same refusals as far as the disk tells
    them, then the store dir and the records go under the state dir's lock; the next start
    serves on without the voice and says nothing of it."""
    models, manager = two_voices(tmp_path)
    manager.rollback("voice")  # 2 rolled back: the mark stays
    manager.close()
    state = tmp_path / "state"
    with pytest.raises(UnknownVoiceError, match="unknown voice 'nobody'"):
        remove_stopped("nobody", models, state)
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    for name in ("../../outside", "..", "../store", "/tmp", "voice/2", ".voice"):  # a path, not a voice
        with pytest.raises(UnknownVoiceError, match="not a voice name"):
            remove_stopped(name, models, state)
    assert (outside / "keep").is_dir() and (state / "store" / "voice").is_dir()
    lock = StateDirLock(state)
    lock.acquire()  # a daemon running on it
    with pytest.raises(StateLockedError, match="remove it through that daemon"):
        remove_stopped("voice", models, state)
    lock.release()
    answer = remove_stopped("voice", models, state, "no one speaks it")
    assert (answer["removed"], answer["active"]) == (["1", "2"], "1")
    assert not (state / "store" / "voice").exists()
    assert json.loads((state / "state.json").read_text())["voices"]["voice"] == {
        "active": None, "previous": [], "rolled_back": ["2"]}
    with pytest.raises(UnknownVoiceError, match="unknown voice 'voice'"):  # only its rollback marks are left
        remove_stopped("voice", models, state)
    (state / "store" / "linked").symlink_to(outside, target_is_directory=True)  # not a dir ttsd made
    assert remove_stopped("linked", models, state)["removed"] == []
    assert not os.path.lexists(state / "store" / "linked") and (outside / "keep").is_dir()  # the link went, not its target
    shutil.rmtree(models / "other-1")
    with pytest.raises(ConflictError, match="the only voice"):
        remove_stopped("other", models, state)
    restarted = make_manager(tmp_path)
    with caplog.at_level("INFO", logger="ttsd"):
        restarted.start()
    assert names(restarted) == ["other"]
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if m.startswith(("voice ", "voice:"))], said  # (no "cannot be restored")
    entry = next(e for e in reversed(restarted.history(5)) if e["voice"] == "voice")
    assert (entry["from"], entry["to"], entry["why"]) == ("1", None, "no one speaks it")
    restarted.close()


def test_with_no_daemon_running_a_folder_left_refuses(tmp_path: Path, fake_engines: None) -> None:
    models, manager = v2_over_v1(tmp_path)
    fake_model(models, "other", "1")
    manager.reconcile()
    manager.close()
    with pytest.raises(ConflictError, match="still has 2 folders in the models dir.*voice-1.*voice-2; delete them"):
        remove_stopped("voice", models, tmp_path / "state")
    assert (tmp_path / "state" / "store" / "voice").is_dir()


def test_the_command_with_no_daemon_running(tmp_path: Path, fake_engines: None) -> None:
    """docs/operating.md: ``ttsd models remove VOICE --models DIR --state DIR`` with the daemon
    stopped; a line and an exit code for each refusal."""
    models, manager = two_voices(tmp_path)
    manager.close()
    env = {**os.environ, "TTSD_SOCKET": str(tmp_path / "none.sock")}

    def remove(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ttsd", "models", "remove", *args, "--models", str(models),
                               "--state", str(tmp_path / "state")], env=env, capture_output=True, text=True,
                              timeout=60)

    unknown = remove("nobody")
    assert unknown.returncode == 4 and unknown.stderr.count("\n") == 1, unknown
    bad = remove("voice", "--reason", "two\nlines")
    assert bad.returncode == 2 and "--reason" in bad.stderr, bad
    done = remove("voice")
    assert done.returncode == 0, done
    assert done.stderr.startswith(f"voice removed (1, 2) from {tmp_path / 'state'} (on disk: no daemon runs on it) in "), done
    last = remove("other")
    assert last.returncode == 13 and "the only voice" in last.stderr and "Traceback" not in last.stderr, last


def test_a_job_whose_version_was_removed_discards_what_it_loaded(tmp_path: Path, fake_engines: None) -> None:
    """A job that chose a version before the voice was removed, reaching its swap after: called
    off (Superseded), which the promoter's fall-back and resume answer by discarding what they
    loaded; an error there left the engine loaded."""
    _, manager = two_voices(tmp_path)
    v1 = manager.version("voice", "1")
    assert v1 is not None
    manager.remove("voice")
    with pytest.raises(Superseded, match="voice 1 was removed"):
        manager.lifecycle.activate(v1, "a job that began before the removal", unmarked=True, vacant=True)
    assert names(manager) == ["other"]
    manager.close()
