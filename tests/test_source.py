"""The model source (``LocalFolderSource``), the settle rule (``ttsd.disk_changes.Settle``) and the
store's copy (``ModelStore.put``), directly: ``scan`` is driven with explicit monotonic times and
file mtimes are set by hand, so nothing here sleeps.

A folder's age at first sight comes from its files' mtimes against the wall clock: the folders
here get mtimes in the future (age 0: "just copied in") unless a test says they are old.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from ttsd.errors import VerifyError
from ttsd.manifest import pack, read_manifest
from ttsd.models_dir import holds_voices, scan
from ttsd.serving.source import Candidate, LocalFolderSource, Verdict, looks_incomplete
from ttsd.serving.store import ModelStore
from ttsd.disk_changes import Settle

SETTLE, TIMEOUT = 1.0, 10.0
FILES = {"model.safetensors": b"w" * 4096, "config.json": b'{"sampling_rate": 16000}'}


def touch(folder: Path, when: float | None = None) -> None:
    """Every entry's mtime to ``when`` (default: an hour ahead, so the folder's age is 0)."""
    when = time.time() + 3600 if when is None else when
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (when, when), follow_symlinks=False)


def model(models: Path, name: str = "voice", version: str = "1", *, when: float | None = None) -> Path:
    folder = models / f"{name}-{version}"
    folder.mkdir(parents=True)
    for rel, data in FILES.items():
        (folder / rel).write_bytes(data)
    pack(folder, name=name, version=version, engine="fake", sample_rate=16000)
    touch(folder, when)
    return folder


_changes = iter(range(1, 1 << 30))


def changed(folder: Path) -> None:
    """A new signature for ``folder``: later mtimes than any before (still in the future: age 0)."""
    touch(folder, time.time() + 7200 + next(_changes))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def source(models: Path) -> LocalFolderSource:
    return LocalFolderSource(models, settle=SETTLE, incomplete_timeout=TIMEOUT)


def verdicts(found: list[Candidate]) -> list[tuple[str, Verdict]]:
    return [(c.path.name, c.verdict) for c in found]


# -- settling and handing over ----------------------------------------------------------------------
def test_a_new_folder_is_judged_once_it_settled_and_then_once_per_change(models: Path,
                                                                        source: LocalFolderSource) -> None:
    folder = model(models)
    assert source.scan(now=100.0) == [] and source.waiting()
    assert source.scan(now=100.0 + SETTLE * 0.99) == [] and source.waiting()
    found = source.scan(now=100.0 + SETTLE)
    assert verdicts(found) == [("voice-1", Verdict.READY)]
    assert found[0].manifest is not None and (found[0].manifest.name, found[0].manifest.version) == ("voice", "1")
    assert not source.waiting()
    assert source.scan(now=500.0) == []  # handed over once: not again while it stays the same
    assert source.folders() == [] and source.present() == {folder}
    changed(folder)
    assert source.scan(now=600.0) == [] and source.waiting()  # a change settles again first
    assert verdicts(source.scan(now=600.0 + SETTLE)) == [("voice-1", Verdict.READY)]


def test_a_folder_there_long_before_is_judged_at_the_first_scan(models: Path, source: LocalFolderSource) -> None:
    model(models, when=time.time() - 3600)
    assert verdicts(source.scan(now=100.0)) == [("voice-1", Verdict.READY)]


def test_dot_folders_and_partial_folders_are_never_looked_at(models: Path, source: LocalFolderSource) -> None:
    model(models, "hidden", when=0)
    (models / "hidden-1").rename(models / ".hidden-1")
    model(models, "copying", when=0)
    (models / "copying-1").rename(models / "copying-1.partial")
    (models / "a-file").write_text("not a folder")
    for now in (100.0, 200.0):
        assert source.scan(now=now) == []
    assert source.present() == set() and source.folders() == [] and not source.waiting()


def test_every_link_in_the_models_dir_is_refused_and_said_once(models: Path, source: LocalFolderSource,
                                                              tmp_path: Path) -> None:
    """A link to a folder, a dangling link (a disk not mounted yet), a loop and a link to a file
    are each refused as a link, once: the dangling one and the loop were left out without a word,
    and a link's content was walked at every scan. A link made good later is judged again (still
    a link: refused)."""
    elsewhere = model(tmp_path / "elsewhere", when=0)
    (models / "linked-1").symlink_to(elsewhere)
    (models / "dangling-1").symlink_to(tmp_path / "not-mounted")
    (models / "loop-1").symlink_to(models / "loop-1")
    (models / "file-1").symlink_to(elsewhere / "config.json")
    found = source.scan(now=0.0) + source.scan(now=SETTLE)
    assert sorted(verdicts(found)) == [(name, Verdict.REFUSED) for name in ("dangling-1", "file-1", "linked-1",
                                                                             "loop-1")]
    assert all("symlink" in c.reason for c in found), [c.reason for c in found]
    assert source.scan(now=100.0) == [] and not source.waiting()
    # as the CLI and ``ttsd say`` see the models dir: no voice in a link either
    assert {c.folder.name: (c.manifest, "symlink" in c.problem) for c in scan(models)} == {
        name: (None, True) for name in ("dangling-1", "file-1", "linked-1", "loop-1")}
    assert holds_voices(models)  # the user's links: no built-in voice is seeded beside them
    (models / "dangling-1").unlink()
    (models / "dangling-1").symlink_to(elsewhere)
    found = source.scan(now=200.0) + source.scan(now=200.0 + SETTLE)
    assert verdicts(found) == [("dangling-1", Verdict.REFUSED)]


def test_a_link_there_long_before_is_judged_at_the_first_scan_and_one_it_cannot_read_settles(
        models: Path, source: LocalFolderSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link's age is its own (lstat), as a folder's is its files': an old one waited the settle
    time at every start-up; one whose target cannot be read had a signature that changed at
    every scan, and never settled."""
    (models / "old-1").symlink_to(models / "nowhere")
    old = time.time() - 3600
    os.utime(models / "old-1", (old, old), follow_symlinks=False)
    assert verdicts(source.scan(now=100.0)) == [("old-1", Verdict.REFUSED)]
    (models / "odd-1").symlink_to(models / "nowhere")
    monkeypatch.setattr(os, "readlink", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    found = source.scan(now=200.0) + source.scan(now=200.0 + SETTLE)
    assert ("odd-1", Verdict.REFUSED) in verdicts(found)
    assert source.scan(now=300.0) == [] and not source.waiting()  # settled: not judged again


def test_again_hands_a_folder_over_once_more(models: Path, source: LocalFolderSource) -> None:
    """The manager could not act on a READY folder for the box's reasons (disk full): ``again``
    makes the next settled scan hand it over again, unchanged."""
    folder = model(models)
    source.scan(now=0.0)
    assert verdicts(source.scan(now=SETTLE)) == [("voice-1", Verdict.READY)]
    assert source.scan(now=50.0) == []
    source.again(folder)
    assert source.waiting()
    assert source.scan(now=60.0) == [] and source.waiting()  # seen afresh: settles again (age 0)
    assert verdicts(source.scan(now=60.0 + SETTLE)) == [("voice-1", Verdict.READY)]
    assert source.scan(now=70.0) == []


def test_a_folder_that_vanishes_is_forgotten(models: Path, source: LocalFolderSource) -> None:
    folder = model(models)
    (folder / "extra.txt").write_text("x")
    touch(folder)
    source.scan(now=0.0)
    assert verdicts(source.scan(now=SETTLE)) == [("voice-1", Verdict.REFUSED)]
    assert [c.path for c in source.folders()] == [folder] and source.present() == {folder}
    shutil.rmtree(folder)
    assert source.scan(now=10.0) == [] and source.present() == set() and source.folders() == []
    model(models)  # the same name again, now good: judged afresh
    source.scan(now=20.0)
    assert verdicts(source.scan(now=20.0 + SETTLE)) == [("voice-1", Verdict.READY)]


# -- incomplete folders --------------------------------------------------------------------------------
def test_an_incomplete_folder_is_rejudged_on_change_and_refused_once_unchanged_too_long(
        models: Path, source: LocalFolderSource) -> None:
    """1. A copy in progress (a listed file missing): INCOMPLETE, and the source keeps waiting.
    2. Unchanged: not handed over again. 3. The copy goes on (the file is there, still short):
    INCOMPLETE again, with the new reason. 4. Unchanged for ``incomplete_timeout`` since that
    change: REFUSED, "still incomplete after". 5. Completed: READY."""
    folder = model(models)
    (folder / "model.safetensors").unlink()
    touch(folder)
    source.scan(now=0.0)
    found = source.scan(now=SETTLE)
    assert verdicts(found) == [("voice-1", Verdict.INCOMPLETE)] and "missing: model.safetensors" in found[0].reason
    assert found[0].manifest is not None and source.waiting()
    assert source.scan(now=5.0) == [] and source.waiting()

    (folder / "model.safetensors").write_bytes(FILES["model.safetensors"][:100])
    changed(folder)
    assert source.scan(now=6.0) == []
    found = source.scan(now=6.0 + SETTLE)
    assert verdicts(found) == [("voice-1", Verdict.INCOMPLETE)]
    assert "changed: model.safetensors (size 100, manifest says 4096)" in found[0].reason
    assert source.scan(now=6.0 + TIMEOUT - 0.01) == [] and source.waiting()  # the timeout counts from the change
    found = source.scan(now=6.0 + TIMEOUT)
    assert verdicts(found) == [("voice-1", Verdict.REFUSED)]
    assert found[0].reason.startswith(f"still incomplete after {TIMEOUT:.0f} s unchanged: ")
    assert "model.safetensors" in found[0].reason
    assert source.scan(now=100.0) == [] and not source.waiting()
    assert [(c.verdict, c.reason) for c in source.folders()] == [(Verdict.REFUSED, found[0].reason)]

    (folder / "model.safetensors").write_bytes(FILES["model.safetensors"])
    changed(folder)
    source.scan(now=200.0)
    assert verdicts(source.scan(now=200.0 + SETTLE)) == [("voice-1", Verdict.READY)]


def test_a_folder_without_its_manifest_yet_is_incomplete(models: Path, source: LocalFolderSource) -> None:
    folder = model(models)
    (folder / "ttsd.json").unlink()
    touch(folder)
    source.scan(now=0.0)
    found = source.scan(now=SETTLE)
    assert verdicts(found) == [("voice-1", Verdict.INCOMPLETE)] and found[0].manifest is None
    assert "no ttsd.json" in found[0].reason
    found = source.scan(now=SETTLE + TIMEOUT)
    assert verdicts(found) == [("voice-1", Verdict.REFUSED)] and "still incomplete after" in found[0].reason


# -- refused folders -----------------------------------------------------------------------------------
def add_extra(folder: Path) -> None:
    (folder / "notes.txt").write_text("unlisted")


def add_link(folder: Path) -> None:
    (folder / "link.json").symlink_to(folder / "config.json")


def add_pickle(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"\x80\x04pickle")


def bad_manifest(folder: Path) -> None:
    (folder / "ttsd.json").write_text('{"format": 1, "name": "voice"}')


def hidden_temp(folder: Path) -> None:  # what rsync writes before its rename
    (folder / ".model.safetensors.Xy12Ab").write_bytes(b"w" * 10)


@pytest.mark.parametrize("damage, verdict, reason", [
    (add_extra, Verdict.REFUSED, "extra: notes.txt (not listed in ttsd.json)"),
    (add_link, Verdict.REFUSED, "unsafe: link.json (symlink)"),
    (add_pickle, Verdict.REFUSED, "pickle weights: weights.bin (only safetensors are loaded)"),
    (bad_manifest, Verdict.REFUSED, "missing required field 'version'"),
    (hidden_temp, Verdict.INCOMPLETE, "extra: .model.safetensors.Xy12Ab"),
])
def test_what_cannot_serve_is_refused_until_the_folder_changes(models: Path, source: LocalFolderSource,
                                                               damage: object, verdict: Verdict, reason: str) -> None:
    folder = model(models)
    damage(folder)  # type: ignore[operator]
    touch(folder)
    source.scan(now=0.0)
    found = source.scan(now=SETTLE)
    assert verdicts(found) == [("voice-1", verdict)] and reason in found[0].reason, found[0].reason
    if verdict is Verdict.REFUSED:
        assert source.scan(now=SETTLE + 2 * TIMEOUT) == []  # not judged again while unchanged
        assert not source.waiting()
    assert [c.reason for c in source.folders()] == [found[0].reason]
    shutil.rmtree(folder)
    model(models)  # repaired (a change): judged again
    source.scan(now=100.0)
    assert verdicts(source.scan(now=100.0 + SETTLE)) == [("voice-1", Verdict.READY)]
    assert source.folders() == []


# -- Settle ------------------------------------------------------------------------------------------
def test_settle_counts_from_the_last_change() -> None:
    s: Settle[str] = Settle(2.0)
    seen, changed_ = s.update("a", (1, 10), 100.0)
    assert changed_ and (seen.changed_at, seen.observed_at) == (100.0, 100.0)
    assert not s.settled("a", 101.9)
    assert s.update("a", (1, 10), 101.0) == (seen, False)  # the same signature: no change
    assert s.settled("a", 102.0)
    seen, changed_ = s.update("a", (2, 11), 103.0)
    assert changed_ and seen.changed_at == 103.0 and not s.settled("a", 104.9) and s.settled("a", 105.0)
    assert not s.settled("never seen", 1e9)


def test_settle_age_forget_and_keep_only() -> None:
    s: Settle[str] = Settle(2.0)
    s.update("old", "sig", 100.0, age=5.0)  # first seen, but last changed 5 s ago
    assert s.settled("old", 100.0)
    s.update("old", "sig2", 100.0, age=5.0)  # age applies to a first sighting only
    assert not s.settled("old", 100.0)
    s.update("b", "sig", 100.0)
    s.forget("b")
    assert "b" not in s.seen and s.update("b", "sig", 200.0)[1]  # seen afresh
    s.keep_only(["b"])
    assert set(s.seen) == {"b"}


# -- ModelStore.put ------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "state" / "store")
    s.prepare()
    return s


def leftovers(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def test_put_copies_only_the_listed_files(models: Path, store: ModelStore) -> None:
    folder = model(models)
    manifest = read_manifest(folder)
    (folder / "unlisted.txt").write_text("not part of the model")
    with pytest.raises(VerifyError) as caught:  # the folder must be what its manifest lists, first
        store.put(folder, manifest)
    assert [(p.kind, p.path) for p in caught.value.problems] == [("extra", "unlisted.txt")]
    assert leftovers(store) == []
    (folder / "unlisted.txt").unlink()
    stored = store.put(folder, manifest)
    assert stored == store.path("voice", "1") == store.get("voice", "1")
    assert sorted(p.name for p in stored.iterdir()) == ["config.json", "model.safetensors", "ttsd.json"]
    for rel, data in FILES.items():
        assert (stored / rel).read_bytes() == data
    assert (stored / "ttsd.json").read_bytes() == (folder / "ttsd.json").read_bytes()
    assert leftovers(store) == ["voice"]
    assert store.put(folder, manifest) == stored  # the same content again: the copy is kept


def test_put_of_a_changed_byte_stores_nothing(models: Path, store: ModelStore) -> None:
    folder = model(models)
    manifest = read_manifest(folder)
    data = bytearray(FILES["model.safetensors"])
    data[1000] ^= 1  # same size, one bit
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(VerifyError) as caught:
        store.put(folder, manifest)
    assert [(p.kind, p.path) for p in caught.value.problems] == [("changed", "model.safetensors")]
    assert "sha256 differs" in str(caught.value)
    assert not caught.value.looks_incomplete() and not looks_incomplete(caught.value)
    assert store.get("voice", "1") is None and leftovers(store) == []  # no copy, no .partial


def test_put_of_a_short_file_looks_incomplete(models: Path, store: ModelStore) -> None:
    folder = model(models)
    manifest = read_manifest(folder)
    (folder / "model.safetensors").write_bytes(FILES["model.safetensors"][:10])
    with pytest.raises(VerifyError) as caught:
        store.put(folder, manifest)
    assert [(p.kind, p.path) for p in caught.value.problems] == [("short", "model.safetensors")]
    assert caught.value.looks_incomplete() and looks_incomplete(caught.value)
    assert store.get("voice", "1") is None and leftovers(store) == []


def test_one_version_is_one_store_folder_whatever_its_spelling(models: Path, store: ModelStore) -> None:
    """``1.0`` and ``1`` are one version (PEP 440): stored under one folder, found and removed by
    either spelling, so pruning a version never misses a copy made under its other spelling. A
    store written with the spelling as given is folded at start-up: the copy moves to the
    canonical name, and a second copy of the same version is removed."""
    folder = model(models, version="1.0")
    stored = store.put(folder, read_manifest(folder))
    assert stored == store.get("voice", "1") == store.get("voice", "1.0") == store.root / "voice" / "1"
    store.remove("voice", "1")
    assert store.get("voice", "1.0") is None and list((store.root / "voice").iterdir()) == []

    for spelling in ("2.0", "2.0.0"):  # as an older ttsd left them
        old = store.root / "voice" / spelling
        shutil.copytree(folder, old)
    shutil.copytree(folder, store.root / "voice" / "3.0")
    store.prepare()
    assert sorted(p.name for p in (store.root / "voice").iterdir()) == ["2", "3"]
    assert [(v, p.name) for _, v, p in store.scan()] == [("2", "2"), ("3", "3")]
