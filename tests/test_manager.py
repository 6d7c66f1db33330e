"""The model manager with a fake engine: leases pin a version, swaps are atomic, a bad folder never
takes the serving version down."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fake_engine import FakeEngine
from ttsd.errors import UnknownVoiceError
from ttsd.manager import ModelManager, State
from ttsd.manifest import pack


@pytest.fixture
def fake_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    info = site / "ttsd_fake-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ttsd-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ttsd.engines]\nfake = fake_engine:FakeEngine\n")
    monkeypatch.syspath_prepend(str(site))
    FakeEngine.live = 0


def fake_model(models: Path, name: str, version: str, **settings: object) -> Path:
    folder = models / f"{name}-{version}"
    folder.mkdir(parents=True)
    (folder / "fake.json").write_text(json.dumps(settings))
    pack(folder, name=name, version=version, engine="fake", sample_rate=8000)
    return folder


def test_newest_good_version_of_each_voice_serves(tmp_path: Path, fake_engines: None) -> None:
    models = tmp_path / "models"
    fake_model(models, "a", "1")
    fake_model(models, "a", "2")
    fake_model(models, "b", "1.0")
    manager = ModelManager(models, default_voice="b")
    manager.rescan()
    assert {v["name"]: v["active"] for v in manager.snapshot()} == {"a": "2", "b": "1.0"}
    assert FakeEngine.live == 2  # older versions are not loaded
    with manager.acquire(None) as lease:
        assert lease.model.name == "b"  # the default voice
    with pytest.raises(UnknownVoiceError, match="unknown voice 'c'"):
        manager.acquire("c")


def test_a_lease_keeps_its_version_through_a_swap(tmp_path: Path, fake_engines: None) -> None:
    """1. A request leases v1. 2. v2 arrives and is swapped in. 3. New requests get v2 while the
    old lease still runs on v1. 4. v1 is unloaded when that lease ends."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = ModelManager(models)
    manager.rescan()
    old = manager.acquire("voice")
    fake_model(models, "voice", "2")
    manager.rescan()
    with manager.acquire("voice") as new:
        assert new.model.version == "2"
    assert old.model.version == "1" and old.model.state is State.RETIRED
    assert old.engine.synthesize("still works").duration > 0
    assert FakeEngine.live == 2
    old.release()
    old.release()  # idempotent
    assert old.model.state is State.UNLOADED and FakeEngine.live == 1


@pytest.mark.parametrize("settings, reason", [
    ({"fail_on": "load"}, "fail on load"),
    ({"fail_on": "warmup"}, "fail on warm-up"),
    ({"fail_on": "request:1"}, "RuntimeError: fake engine told to fail on request 1"),
])
def test_a_bad_new_version_is_refused_and_the_old_keeps_serving(tmp_path: Path, fake_engines: None,
                                                                  settings: dict[str, object], reason: str) -> None:
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = ModelManager(models)
    manager.rescan()
    fake_model(models, "voice", "2", **settings)
    manager.rescan()
    voice = manager.snapshot()[0]
    assert voice["active"] == "1"
    refused = [v for v in voice["versions"] if v["version"] == "2"][0]
    assert refused["state"] == "refused" and reason in refused["reason"]
    assert FakeEngine.live == 1  # the refused version's engine was unloaded
    manager.rescan()  # unchanged folder: not retried
    assert FakeEngine.live == 1


def test_a_folder_that_fails_verification_is_refused(tmp_path: Path, fake_engines: None) -> None:
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = ModelManager(models)
    manager.rescan()
    v2 = fake_model(models, "voice", "2")
    (v2 / "fake.json").write_text('{"tone": 880}')  # changed after packing
    manager.rescan()
    versions = {v["version"]: v for v in manager.snapshot()[0]["versions"]}
    assert versions["2"]["state"] == "refused" and "changed: fake.json" in versions["2"]["reason"]
    shutil.rmtree(v2)
    manager.close()
    assert FakeEngine.live == 0
