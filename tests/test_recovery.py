"""A box left alone for months: damaged state and store files, folders that vanish mid-check,
refused folders that would cost CPU forever. Whatever is damaged, the manager comes up serving a
version that verifies, by itself (in-process, with the fake engine)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import fake_model, make_manager, v2_over_v1
from daemon_util import wait_for
from fake_engine import FakeEngine

from ttsd.errors import ResourceError, TtsdError
from ttsd.manifest import MAX_ENTRIES, pack, verify
from ttsd.serving.manager import ModelManager
from ttsd.serving.source import signature
from ttsd.serving.store import ModelStore, content_id
from ttsd.serving.versions import State


def served_before(tmp_path: Path) -> tuple[Path, Path]:
    """A previous run: v1 then v2 arrived and v2 serves; both are in the store. Returns (models, state)."""
    models, manager = v2_over_v1(tmp_path)
    assert manager.snapshot()[0]["active"] == "2"
    manager.close()
    return models, tmp_path / "state"


def state_json_read_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The state dir refuses state.json's rename (EROFS) until the returned call."""
    real_replace = os.replace

    def read_only(src: str, dst: str) -> None:
        if str(dst).endswith("state.json"):
            raise OSError(30, "Read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    return lambda: monkeypatch.setattr(os, "replace", real_replace)


def active(manager: ModelManager, voice: str = "voice") -> str | None:
    with manager.acquire(voice) as lease:
        assert lease.engine.synthesize("still speaking").duration > 0
        return lease.voice.version


def states(manager: ModelManager) -> dict[str, str]:
    return {v["version"]: v["state"] for v in manager.snapshot()[0]["versions"]}


DAMAGED_STATE = {
    "list": "[]",
    "null": "null",
    "voices a list": '{"voices": []}',
    "active a number": '{"voices": {"voice": {"active": 5}}}',
    "versions a string": '{"voices": {}, "versions": "x"}',
    "a name that escapes": '{"voices": {"../../etc": {"active": "1"}}, "versions": {"../x/1": {"content": "a", '
                           '"state": "active"}}}',
    "a version that escapes": '{"voices": {"voice": {"active": "../../1"}}}',
    "a rollback target that escapes": '{"voices": {"voice": {"active": "2", "rolled_back": ["2"], '
                                      '"rolling_to": "../../1"}}}',
    "truncated": '{"voices": {"voice": {"act',
    "binary": "\x00\xff\xfe garbage",
    "deep": "[" * 50_000,
}


def test_a_state_file_from_a_newer_ttsd_keeps_what_this_one_knows(tmp_path: Path, fake_engines: None,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A newer ttsd writes keys this one does not know (as ``canary`` and ``folder`` once were new);
    after a downgrade, its state.json and the copy were judged damaged and left out record by
    record, so v2, which the operator had rolled back from, served again. The keys are left out,
    said once, and the records kept."""
    _, manager = v2_over_v1(tmp_path)
    manager.rollback("voice")
    manager.close()
    for name in ("state.json", "state.backup.json"):
        path = tmp_path / "state" / name
        data = json.loads(path.read_text())
        data["voices"]["voice"]["later"] = {"x": 1}
        data["top_later"] = 1
        for record in data["versions"].values():
            record["later_too"] = "y"
        path.write_text(json.dumps(data))
    caplog.set_level(logging.WARNING, logger="ttsd.state")
    restarted = make_manager(tmp_path)
    restarted.start()
    assert active(restarted) == "1" and states(restarted)["2"] == "rolled-back", states(restarted)
    assert not list((tmp_path / "state").glob("state.json.unreadable-*"))
    said = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(said) == 1 and "'voices.*.later'" in said[0] and "'versions.*.later_too'" in said[0], said
    assert "'top_later'" in said[0], said
    restarted.close()


def test_a_refusal_recorded_for_other_content_is_not_kept(tmp_path: Path, fake_engines: None,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """state.json (edited by hand, or damaged) says v2, the active version, was refused with other
    content than its store copy holds. The store copy was trusted for the content but the refusal
    was kept, so the voice fell back to v1, and with v1's folder gone it served nothing for good,
    the log saying v2 was "not known any more". The refusal was for other content: v2 is judged
    again and serves; and where a voice does end with nothing, the log says why."""
    models, state = served_before(tmp_path)
    shutil.rmtree(models / "voice-1")
    data = json.loads((state / "state.json").read_text())
    data["versions"]["voice/2"] = {"content": "zzzz", "state": "refused", "reason": "hand edit"}
    (state / "state.json").write_text(json.dumps(data))
    (state / "state.backup.json").unlink()
    caplog.set_level(logging.WARNING, logger="ttsd")
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "2", [r.getMessage() for r in caplog.records]
    assert any("judging it again rather than as refused" in r.getMessage() for r in caplog.records)
    manager.close()

    data = json.loads((state / "state.json").read_text())
    data["voices"]["voice"]["rolled_back"] = ["1", "2"]  # (a fleet withdrew every version)
    (state / "state.json").write_text(json.dumps(data))
    (state / "state.backup.json").unlink()
    caplog.clear()
    manager = make_manager(tmp_path)
    manager.start()
    said = [r.getMessage() for r in caplog.records]
    assert "voice 2 was active but is marked rolled back; choosing again" in said, said
    assert any(m.startswith("voice serves nothing: no version of it may serve (") for m in said), said
    manager.close()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [*DAMAGED_STATE, "a directory", "a symlink"])
def test_any_damaged_state_file_still_serves_a_verified_version(tmp_path: Path, fake_engines: None,
                                                                damage: str) -> None:
    """1. v2 served. 2. state.json is damaged (each shape that once stopped the daemon, and more).
    3. A restart serves v2 again, from the store: the newest version that verifies. 4. The damaged
    file is kept aside for a human, and a good state.json is written."""
    _, state = served_before(tmp_path)
    path = state / "state.json"
    path.unlink()
    if damage == "a directory":
        path.mkdir()
    elif damage == "a symlink":
        path.symlink_to("/etc/passwd")
    else:
        path.write_bytes(DAMAGED_STATE[damage].encode("latin-1"))
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "2"
    assert list(state.glob("state.json.unreadable-*")), "the damaged file is kept aside"
    assert json.loads(path.read_text())["voices"]["voice"]["active"] == "2"
    assert not (tmp_path / "etc").exists() and Path("/etc/passwd").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["state and store", "store", "models dir and state"])
def test_lost_state_or_store_recovers_from_what_is_left(tmp_path: Path, fake_engines: None, lost: str) -> None:
    models, state = served_before(tmp_path)
    if "state" in lost:
        (state / "state.json").unlink()
    if "store" in lost:
        shutil.rmtree(state / "store")
    if "models dir" in lost:
        shutil.rmtree(models)
        models.mkdir()
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "2"


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_store_copy_is_copied_again_from_the_models_dir(tmp_path: Path, fake_engines: None,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """1. v2 served. 2. A byte of its store copy flips. 3. A restart re-copies it from the intact
    models/voice-2 and serves v2, saying why; it used to refuse v2 and serve nothing."""
    _, state = served_before(tmp_path)
    flip(state / "store" / "voice" / "2" / "fake.json")
    manager = make_manager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ttsd.manager"):
        manager.start()
    assert active(manager) == "2"
    assert "store copy is damaged" in caplog.text and "copied again" in caplog.text
    verify(state / "store" / "voice" / "2")


@pytest.mark.slow
def test_a_damaged_copy_without_a_folder_falls_back_until_the_folder_returns(tmp_path: Path,
                                                                           fake_engines: None) -> None:
    """1. v2 served; its models-dir folder is deleted and its store copy damaged. 2. A restart
    serves v1, the newest version that verifies; v2 waits (deferred), it is not refused. 3. The
    folder of v2 is dropped in again: v2 serves. 4. `ttsd activate` on a damaged copy re-copies."""
    models, state = served_before(tmp_path)
    v2 = models / "voice-2"
    shutil.copytree(v2, tmp_path / "saved-v2")
    shutil.rmtree(v2)
    flip(state / "store" / "voice" / "2" / "fake.json")
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "1"
    assert states(manager)["2"] == "deferred"
    shutil.copytree(tmp_path / "saved-v2", v2)
    manager.reconcile()
    assert active(manager) == "2"
    flip(state / "store" / "voice" / "1" / "fake.json")
    assert manager.activate("voice", "1")["to"] == "1"  # was: 409 with the checksum error
    assert active(manager) == "1"


def test_a_folder_deleted_mid_check_stops_nothing(tmp_path: Path, fake_engines: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """1. Two new voices arrive; the first folder is deleted while it is being verified. 2. The
    same reconcile still brings up the second voice, and nothing stays in 'verifying' (a voice
    with no active version would answer 503 'being upgraded' forever)."""
    models = tmp_path / "models"
    fake_model(models, "a", "1")
    fake_model(models, "b", "1")
    real_put = ModelStore.put

    def deleting_put(store: ModelStore, folder: Path, manifest):  # type: ignore[no-untyped-def]
        if folder.name == "a-1":  # deleted while it is hashed and copied in
            shutil.rmtree(folder)
        return real_put(store, folder, manifest)

    monkeypatch.setattr(ModelStore, "put", deleting_put)
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager, "b") == "1"
    assert all(v["state"] != "verifying" for voice in manager.snapshot() for v in voice["versions"])
    monkeypatch.setattr(ModelStore, "put", lambda *_: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    fake_model(models, "c", "1")
    fake_model(models, "d", "1")
    manager.reconcile()  # an I/O error on every folder: the box's fault, retried after a back-off
    states = {v["name"]: v["versions"][0]["state"] for v in manager.snapshot() if v["name"] in "cd"}
    assert states == {"c": "deferred", "d": "deferred"}, states
    monkeypatch.setattr(ModelStore, "put", real_put)
    manager.reconcile()  # the back-off (10 s) is not over: not tried yet
    assert "c" not in {v["name"] for v in manager.snapshot() if v["active"]}
    manager.retry_now()  # what SIGHUP does
    manager.reconcile()
    assert active(manager, "c") == "1" and active(manager, "d") == "1"


def test_an_unforeseen_error_refuses_a_folder_until_it_changes(tmp_path: Path, fake_engines: None,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A version of 5,000 digits made packaging raise ValueError on every scan, twice a second,
    forever; it is a bad manifest now, and anything else unforeseen refuses the folder (one
    traceback) until the folder changes."""
    models = tmp_path / "models"
    fake_model(models, "a", "1")
    huge = fake_model(models, "a", "2")
    manifest = json.loads((huge / "ttsd.json").read_text())
    manifest["version"] = "9" * 5000
    (huge / "ttsd.json").write_text(json.dumps(manifest))
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager, "a") == "1"
    assert any("invalid version" in f["reason"] for f in manager.folders())
    real_put = ModelStore.put
    ModelStore.put = lambda *_: (_ for _ in ()).throw(ValueError("unforeseen"))  # type: ignore[assignment,method-assign]
    try:
        fake_model(models, "b", "1")
        with caplog.at_level(logging.ERROR, logger="ttsd.manager"):
            for _ in range(3):
                manager.reconcile()
        assert caplog.text.count("Traceback") <= 1 and caplog.text.count("refused until it changes") == 1
        assert any(f["state"] == "refused" and "ValueError" in f["reason"] for f in manager.folders())
    finally:
        ModelStore.put = real_put  # type: ignore[method-assign]
    (models / "b-1" / "extra-note").write_text("changed")  # the folder changes: looked at again
    manager.reconcile()
    # refused now as a version for its extra file (listed with the version, not again as a folder)
    reasons = [v["reason"] or "" for voice in manager.snapshot() if voice["name"] == "b" for v in voice["versions"]]
    assert any("extra: extra-note" in r for r in reasons), reasons


def test_a_huge_refused_folder_is_cheap_to_rescan(tmp_path: Path, fake_engines: None) -> None:
    """A folder with more entries than any model has is refused, and looking at it again on every
    rescan stops at the cap (it walked all 100,000 files of such a folder every 5 s)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    big = fake_model(models, "voice", "2")
    for i in range(MAX_ENTRIES + 500):
        (big / f"f{i}").touch()
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "1" and states(manager)["2"] == "refused"
    reason = next(v["reason"] for v in manager.snapshot()[0]["versions"] if v["version"] == "2")
    assert f"more than {MAX_ENTRIES} files" in reason
    assert len(signature(big)) == 3 * (MAX_ENTRIES + 1)  # stops looking after the cap


def test_a_version_refused_at_load_leaves_no_store_copy(tmp_path: Path, fake_engines: None) -> None:
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "voice", "2", fail_on="warmup")
    manager.reconcile()
    assert states(manager)["2"] == "refused"
    assert not (tmp_path / "state" / "store" / "voice" / "2").exists()
    assert FakeEngine.live == 1


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 0])
def test_an_unwritable_state_changes_nothing_on_rollback(tmp_path: Path, fake_engines: None,
                                                        monkeypatch: pytest.MonkeyPatch, keep: int) -> None:
    """The state dir cannot take the write (ENOSPC is tested on a real full tmpfs in
    test_disk_full.py; here the rename fails with EROFS): the rollback is refused as the box's
    fault and nothing changes, in memory or on disk; with the target not loaded (keep=0), before
    anything is loaded for it."""
    _, state = served_before(tmp_path)
    manager = make_manager(tmp_path, keep=keep)
    manager.start()
    loads = FakeEngine.loads
    before = (state / "state.json").read_text()
    writable = state_json_read_only(monkeypatch)
    with pytest.raises(ResourceError):
        manager.rollback("voice")
    writable()
    assert FakeEngine.loads == loads
    assert active(manager) == "2" and (state / "state.json").read_text() == before
    assert states(manager)["1"] in ("standby", "available")
    assert manager.rollback("voice")["to"] == "1"
    assert State(states(manager)["2"]) is State.ROLLED_BACK


@pytest.mark.parametrize("action", ["rollback", "rollback, its target not loaded", "activate"])
def test_an_action_the_state_dir_cannot_record_leaves_the_upgrade_in_progress(tmp_path: Path, fake_engines: None,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             action: str) -> None:
    """v3 loads for an upgrade when the operator rolls back (or activates v1) and the state dir
    cannot take the record: 507, "nothing changes". The upgrade had been called off first, and v3,
    known from then on, was never tried again. Now it goes on and serves."""
    models, manager = v2_over_v1(tmp_path, keep=0 if "not loaded" in action else 1)
    fake_model(models, "voice", "3", load_delay=1.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=10, interval=0.01, what="v3 loading")
    writable = state_json_read_only(monkeypatch)
    with pytest.raises(ResourceError):
        manager.activate("voice", "1") if action == "activate" else manager.rollback("voice")
    assert manager.activate("voice", "2")["to"] == "2"  # what serves already: nothing to record, no 507
    writable()
    assert manager.jobs.wait(20)
    assert active(manager) == "3", states(manager)
    manager.close()


@pytest.mark.slow
def test_a_state_file_with_wrong_content_ids_never_costs_a_good_copy(tmp_path: Path, fake_engines: None) -> None:
    """A well-formed state.json whose recorded content ids are wrong (damage, or one flipped hex
    digit) made ttsd delete both good store copies and refuse both intact folders as "the same
    version with other content": nothing served. The verified store copy is the truth."""
    _models, state = served_before(tmp_path)
    path = state / "state.json"
    data = json.loads(path.read_text())
    for record, fake in zip(data["versions"].values(), ("deadbeefdeadbeef", "0000000000000000"), strict=True):
        record["content"] = fake
    path.write_text(json.dumps(data))
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "2"
    assert (state / "store" / "voice" / "1" / "ttsd.json").is_file()
    assert (state / "store" / "voice" / "2" / "ttsd.json").is_file()
    assert not manager.folders(), manager.folders()  # neither folder refused


def test_an_unforeseen_error_judging_a_folder_refuses_the_folder_not_its_version(
        tmp_path: Path, fake_engines: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error no check foresaw while the source looks at a folder refuses that folder until it
    changes; the version it names is not refused for good (it was, and stayed so after restarts)."""
    import ttsd.serving.source as source_module

    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    v2 = fake_model(models, "voice", "2")
    real = source_module.inspect_folder
    monkeypatch.setattr(source_module, "inspect_folder", lambda folder: (_ for _ in ()).throw(RuntimeError("odd")))
    manager.reconcile()
    assert "2" not in states(manager)
    assert [f["reason"] for f in manager.folders()] == ["could not be checked: RuntimeError: odd"]
    monkeypatch.setattr(source_module, "inspect_folder", real)
    os.utime(v2 / "fake.json", ns=(1, 1))  # the folder changes
    manager.reconcile()
    assert active(manager) == "2" and not manager.folders()


def test_an_error_taking_one_folder_stops_neither_the_others_nor_its_voice(tmp_path: Path,
                                                                            fake_engines: None) -> None:
    """An unforeseen error while the manager takes one folder's verdict (here: a listener that
    raises) leaves no voice 'being upgraded' forever, and the other folders of the scan go on."""
    models = tmp_path / "models"
    fake_model(models, "a", "1")
    fake_model(models, "b", "1")
    manager = make_manager(tmp_path)
    raised: list[str] = []

    def listener(event: str, model) -> None:  # type: ignore[no-untyped-def]
        if event == "verifying" and model.name == "a" and not raised:
            raised.append(model.name)
            raise RuntimeError("a listener that fails once")

    manager._listener = listener
    manager.start()
    assert raised == ["a"] and active(manager, "b") == "1"
    assert all(v["state"] != "verifying" for voice in manager.snapshot() for v in voice["versions"])
    assert any("RuntimeError" in f["reason"] for f in manager.folders())


def test_a_folder_replaced_by_a_link_is_not_copied_through_it(tmp_path: Path, fake_engines: None) -> None:
    """v1's folder in the models dir becomes a link to a copy elsewhere; activating v1 (known, not
    stored) must refuse to copy through the link."""
    models, manager = v2_over_v1(tmp_path, keep=0)
    shutil.rmtree(tmp_path / "state" / "store" / "voice" / "1", ignore_errors=True)
    manager.version("voice", "1").store_copy = None  # type: ignore[union-attr]
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(models / "voice-1"), str(elsewhere))
    (models / "voice-1").symlink_to(elsewhere)
    with pytest.raises(TtsdError) as caught:
        manager.activate("voice", "1")
    assert "symlink" in str(caught.value)
    assert active(manager) == "2"


@pytest.mark.parametrize("damage", ["truncated", "lost"])
def test_a_damaged_or_lost_state_file_keeps_an_operators_rollback(tmp_path: Path, fake_engines: None,
                                                                  damage: str) -> None:
    """v2 was rolled back to v1, and v1's folder then left the models dir (its store copy serves).
    state.json is cut short, or lost: the restart took the state from what was left, so v2 (its
    rollback mark gone) served again, and v1, in no record, was pruned from the store for good.
    The state comes from its copy now: v1 serves, v2 stays rolled back."""
    models, manager = v2_over_v1(tmp_path)
    manager.rollback("voice")
    assert manager.snapshot()[0]["active"] == "1"
    manager.close()
    shutil.rmtree(models / "voice-1")
    path = tmp_path / "state" / "state.json"
    if damage == "lost":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-5])
    restarted = make_manager(tmp_path)
    restarted.start()
    assert active(restarted) == "1" and states(restarted)["2"] == "rolled-back", states(restarted)
    restarted.close()


def test_with_its_copy_damaged_too_the_state_comes_from_the_store(tmp_path: Path, fake_engines: None) -> None:
    _, state = served_before(tmp_path)
    for name in ("state.json", "state.backup.json"):
        (state / name).write_text('{"voices": {"voice": {"act')
    manager = make_manager(tmp_path)
    manager.start()
    assert active(manager) == "2"
    assert list(state.glob("state.json.unreadable-*")), "the damaged file is kept aside"
    # its damaged copy too (it was written over without a word)
    kept = list(state.glob("state.backup.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"voices": {"voice": {"act'
    manager.close()


def test_a_store_made_unusable_defers_a_new_version_instead_of_refusing_it(tmp_path: Path,
                                                                          fake_engines: None) -> None:
    """The store is ttsd's own dir: its voice folder replaced by a file (or made unwritable after
    a restore) refused a new version for good, and it stayed refused once the store was mended.
    Now it is deferred, and the retry after the mend serves it."""
    models, manager = v2_over_v1(tmp_path)
    store_voice = tmp_path / "state" / "store" / "voice"
    aside = tmp_path / "store-voice-aside"
    store_voice.rename(aside)
    store_voice.write_text("not a folder")
    fake_model(models, "voice", "3")
    manager.reconcile()
    assert states(manager)["3"] == "deferred", states(manager)
    store_voice.unlink()
    aside.rename(store_voice)
    manager.retry_now()
    manager.reconcile()
    assert active(manager) == "3", states(manager)
    manager.close()


def test_a_box_with_no_copy_of_its_state_gets_one_at_the_start(tmp_path: Path, fake_engines: None) -> None:
    """A box upgraded from a release without the copy (or whose last copy failed to be written)
    has a good state.json and no copy: the start writes it, changed state or not (the copy was
    taken for written, and a quiet box never wrote it)."""
    _, state = served_before(tmp_path)
    for _ in range(2):  # the second start finds the state unchanged
        (state / "state.backup.json").unlink()
        manager = make_manager(tmp_path)
        manager.start()
        manager.close()
    assert json.loads((state / "state.backup.json").read_text()) == json.loads((state / "state.json").read_text())


def test_a_damaged_copy_of_the_state_is_said_and_written_again(tmp_path: Path, fake_engines: None,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """state.json is whole and its copy is damaged: the copy was written over without a word (the
    rollback marks it held are lost if state.json goes next). It is said, and written again."""
    _, state = served_before(tmp_path)
    (state / "state.backup.json").write_text("[" * 20_000)
    caplog.set_level(logging.WARNING, logger="ttsd.state")
    manager = make_manager(tmp_path)
    manager.start()
    manager.close()
    said = [r.getMessage() for r in caplog.records]
    assert any("state.backup.json" in m and "written again from state.json" in m for m in said), said
    assert json.loads((state / "state.backup.json").read_text()) == json.loads((state / "state.json").read_text())


def test_a_saved_canary_that_cannot_resume_is_ended_and_said(tmp_path: Path, fake_engines: None,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """state.json (edited by hand, or damaged) names a canary that is unknown, or rolled back: it
    was passed over without a word and stayed in the record for good."""
    _, state = served_before(tmp_path)
    for canary, why in (("9", "unknown"), ("2", "rolled back")):
        data = json.loads((state / "state.json").read_text())
        if canary == "2":  # v1 serves, v2 was rolled back
            data["voices"]["voice"].update(active="1", previous=[])
        data["voices"]["voice"].update(canary=canary, rolled_back=["2"] if canary == "2" else [])
        (state / "state.json").write_text(json.dumps(data))
        (state / "state.backup.json").unlink()
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="ttsd.manager")
        manager = make_manager(tmp_path)
        manager.start()
        assert active(manager) == ("1" if canary == "2" else "2") and manager.snapshot()[0]["canary"] is None
        said = [r.getMessage() for r in caplog.records]
        assert f"voice: the saved canary {canary} cannot resume ({why}); it is ended" in said, said
        manager.close()
        assert "canary" not in json.loads((state / "state.json").read_text())["voices"]["voice"]


def test_a_lost_state_with_a_damaged_copy_is_said_and_the_copy_kept(tmp_path: Path, fake_engines: None,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """state.json is gone and its copy is damaged: the state came from the store without a word
    (a version the operator had rolled back from served again), and the copy was written over."""
    _, manager = v2_over_v1(tmp_path)
    manager.rollback("voice")
    manager.close()
    state = tmp_path / "state"
    (state / "state.json").unlink()
    (state / "state.backup.json").write_text('{"format": 1, "voices": [')
    caplog.set_level(logging.ERROR, logger="ttsd.state")
    restarted = make_manager(tmp_path)
    restarted.start()
    said = [r.getMessage() for r in caplog.records]
    assert any("is missing and its copy state.backup.json is damaged" in m and "rollback marks" in m for m in said), said
    kept = list(state.glob("state.backup.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"format": 1, "voices": ['
    restarted.close()


def _died_loading(tmp_path: Path, folder: Path, tries: int) -> None:
    """What a daemon killed while it loaded ``folder``'s version (the ``tries``-th such load in a
    row) leaves in its state dir."""
    manifest = verify(folder)
    marks = {f"{manifest.name}/{manifest.version}": {"content": content_id(manifest), "tries": tries}}
    (tmp_path / "state" / "loading.json").write_text(json.dumps(marks))


@pytest.mark.parametrize("tries, loads", [(2, True), (3, False)])
def test_a_version_the_daemon_died_loading_waits_after_three_deaths(
        tmp_path: Path, fake_engines: None, tries: int, loads: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Three loads in a row the process did not live through (the OOM killer): the version is not
    loaded again by itself while another serves; SIGHUP (``retry_now``) tries it again. Two: it
    is tried, and its next load counts as the third."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    make_manager(tmp_path).start()  # v1 served, and was recorded as the active version
    _died_loading(tmp_path, fake_model(models, "voice", "2"), tries)
    manager = make_manager(tmp_path)
    seen: list[str] = []
    manager.lifecycle.marks.begin = lambda model: seen.append(  # type: ignore[method-assign]
        f"{model.version}:{model.short_of_memory + 1}")
    with caplog.at_level(logging.WARNING, logger="ttsd.manager"):
        manager.start()
        manager.reconcile()
    assert f"voice 2: the daemon stopped while loading it (killed: out of memory?); {tries} such" in caplog.text
    assert manager.snapshot()[0]["active"] == ("2" if loads else "1")
    if loads:
        assert seen == ["1:1", "2:3"]
        return
    v2 = manager.table.get("voice", "2")
    assert v2 is not None and v2.state is State.DEFERRED and "killed while loading it" in v2.reason
    manager.retry_now()
    manager.reconcile()
    assert manager.snapshot()[0]["active"] == "2" and seen == ["1:1", "2:1"]


def test_a_version_the_daemon_died_loading_is_tried_again_when_nothing_else_serves(
        tmp_path: Path, fake_engines: None) -> None:
    """Its only version: the voice keeps trying it (it has nothing else to serve)."""
    folder = fake_model(tmp_path / "models", "voice", "1")
    (tmp_path / "state").mkdir()
    _died_loading(tmp_path, folder, 5)
    manager = make_manager(tmp_path)
    manager.start()
    assert manager.snapshot()[0]["active"] == "1"
    assert not (tmp_path / "state" / "loading.json").exists()  # every load it began, it lived through


@pytest.mark.parametrize("damage", ["other content", "not json", "a list", "bad tries", "a link"])
def test_load_marks_of_other_content_or_damaged_count_nothing(
        tmp_path: Path, fake_engines: None, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """A folder changed since the deaths is judged afresh; a damaged or linked loading.json is
    ignored, with a word for the damage, and never read through its link."""
    models, state = tmp_path / "models", tmp_path / "state"
    fake_model(models, "voice", "1")
    make_manager(tmp_path).start()
    folder = fake_model(models, "voice", "2")
    _died_loading(tmp_path, folder, 3)
    marks = state / "loading.json"
    if damage == "other content":
        (folder / "fake.json").write_text('{"delay": 0}')
        pack(folder, name="voice", version="2", engine="fake", sample_rate=8000)
    elif damage == "not json":
        marks.write_text("{")
    elif damage == "a list":
        marks.write_text("[1, 2]")
    elif damage == "bad tries":
        marks.write_text(marks.read_text().replace('"tries": 3', '"tries": true'))
    else:
        elsewhere = tmp_path / "elsewhere.json"
        marks.rename(elsewhere)
        marks.symlink_to(elsewhere)
    manager = make_manager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ttsd.manager"):
        manager.start()
    assert manager.snapshot()[0]["active"] == "2"
    if damage in ("not json", "a link"):
        assert "loading.json is damaged" in caplog.text
    if damage == "a link":
        assert (tmp_path / "elsewhere.json").read_text().count("voice/2") == 1  # untouched


def test_two_folders_of_one_version_with_other_content_in_one_scan_refuse_the_later(
        tmp_path: Path, fake_engines: None) -> None:
    """Dropped together, the later folder by name served without a word, the other had no row in
    `models list`; after a restart the verdict flipped. The later one is refused, with the other
    named, and stays refused at a restart."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    first = models / "voice-2a"
    fake_model(models, "voice", "2", delay=0.0).rename(first)
    fake_model(models, "voice", "2", delay=0.001).rename(models / "voice-2b")
    for _ in range(2):  # and again at a restart
        manager = make_manager(tmp_path)
        manager.start()
        v2 = manager.table.get("voice", "2")
        assert manager.snapshot()[0]["active"] == "2" and v2 is not None and v2.folder == first
        refused = {path.name: why for path, (state, why) in manager.table.folders().items() if state == "refused"}
        assert "with different content (in voice-2a)" in refused["voice-2b"], refused
        manager.close()


def test_a_voice_removed_while_the_daemon_was_stopped_is_forgotten(tmp_path: Path, fake_engines: None,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """operating.md's recipe for removing a voice: stop the daemon, delete the voice's folders and
    its STATE/store/NAME, start. The voice stayed listed with nothing to serve, and every start
    said its saved version 'cannot be restored'. It is forgotten, its rollback marks kept (a
    rolled-back version dropped in again stays rolled back); the other voice is untouched."""
    models, manager = v2_over_v1(tmp_path)
    fake_model(models, "other", "1")
    manager.reconcile()
    manager.rollback("voice")  # marks 2 rolled back
    assert active(manager) == "1" and active(manager, "other") == "1"
    manager.close()
    for folder in ("voice-1", "voice-2"):
        shutil.rmtree(models / folder)
    shutil.rmtree(tmp_path / "state" / "store" / "voice")
    manager = make_manager(tmp_path)
    with caplog.at_level(logging.INFO, logger="ttsd"):
        manager.start()
    assert [v["name"] for v in manager.snapshot()] == ["other"] and active(manager, "other") == "1"
    assert any("voice is forgotten" in r.getMessage() for r in caplog.records), caplog.text
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["voices"]["voice"] == {"active": None, "previous": [], "rolled_back": ["2"]}, saved
    assert not [key for key in saved["versions"] if key.startswith("voice/")], saved
    manager.close()
    caplog.clear()
    manager = make_manager(tmp_path)  # the next start says nothing of it
    with caplog.at_level(logging.INFO, logger="ttsd"):
        manager.start()
    assert not [r for r in caplog.records if "voice " in r.getMessage() and r.name != "ttsd.serving"], caplog.text
    fake_model(models, "voice", "2")  # the rolled-back version, dropped in again: not served by itself
    fake_model(models, "voice", "3")
    manager.reconcile()
    versions = next(v["versions"] for v in manager.snapshot() if v["name"] == "voice")
    assert active(manager) == "3" and {v["version"]: v["state"] for v in versions}["2"] == "rolled-back"
    manager.close()


def test_a_voice_whose_folder_is_still_arriving_at_start_up_is_not_forgotten(tmp_path: Path,
                                                                             fake_engines: None) -> None:
    """Its store dir deleted (or never there) and its new folder still being copied when the
    daemon starts (no ttsd.json yet): nothing says the folder is this voice's, so the voice is
    kept, its saved active version with it, until the folder has arrived."""
    models, manager = v2_over_v1(tmp_path)
    manager.close()
    for folder in ("voice-1", "voice-2"):
        shutil.rmtree(models / folder)
    shutil.rmtree(tmp_path / "state" / "store" / "voice")
    arriving = models / "voice-3"
    arriving.mkdir()
    (arriving / "fake.json").write_text("{}")  # the manifest comes last
    manager = make_manager(tmp_path)
    manager.start()
    assert [v["name"] for v in manager.snapshot()] == ["voice"] and manager.state.voice("voice").active == "2"
    pack(arriving, name="voice", version="3", engine="fake", sample_rate=8000)
    manager.reconcile()
    assert active(manager) == "3"
    manager.close()
