"""What an operator's ``ttsd rollback`` and ``ttsd activate`` undo while a new version is on its way
in: a canary, or an upgrade still being brought up. A probe found the rollback rolled back the good
active version and left the canary running; an activate left the canary running, and it was
promoted later over the operator's choice; a rollback of a voice with one version before the
upgrade answered 409 and let the upgrade swap in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fake_model, make_manager
from daemon_util import wait_for

from ttsd.serving.manager import ModelManager


def voice_of(manager: ModelManager) -> dict[str, object]:
    return manager.snapshot()[0]


def states(manager: ModelManager) -> dict[str, str]:
    return {v["version"]: v["state"] for v in voice_of(manager)["versions"]}  # type: ignore[union-attr]


@pytest.fixture
def canary(tmp_path: Path, fake_engines: None) -> Iterator[ModelManager]:
    """v1 active, v2 a canary for half the requests (promoted after 5 clean ones)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, canary={"*": 0.5}, canary_requests=5)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    assert (voice_of(manager)["active"], voice_of(manager)["canary"]) == ("1", "2")
    yield manager
    manager.close()


def served(manager: ModelManager, requests: int = 40) -> set[str]:
    versions = set()
    for _ in range(requests):
        lease = manager.acquire("voice")
        versions.add(lease.voice.version)
        lease.release(True)
    return versions


def test_a_rollback_during_a_canary_ends_the_canary_and_keeps_the_active_version(
        canary: ModelManager, tmp_path: Path) -> None:
    assert voice_of(canary)["rollback_to"] == "1"  # what the status page's button says it does
    answer = canary.rollback("voice")
    assert (answer["from"], answer["to"]) == ("2", "1")
    assert (voice_of(canary)["active"], voice_of(canary)["canary"]) == ("1", None)
    assert states(canary)["2"] == "rolled-back" and states(canary)["1"] == "active"
    assert served(canary) == {"1"}
    assert canary.history(1)[0]["from"] == "2"
    canary.close()
    restarted = make_manager(tmp_path, canary={"*": 0.5}, canary_requests=5)  # the canary is not resumed
    restarted.start()
    assert (voice_of(restarted)["active"], voice_of(restarted)["canary"]) == ("1", None)
    assert states(restarted)["2"] == "rolled-back"
    restarted.close()


def test_activating_another_version_ends_the_canary_for_good(canary: ModelManager, tmp_path: Path) -> None:
    fake_model(tmp_path / "models", "voice", "0")
    canary.reconcile()
    answer = canary.activate("voice", "0")
    assert (answer["from"], answer["to"]) == ("1", "0")
    assert (voice_of(canary)["active"], voice_of(canary)["canary"]) == ("0", None)
    assert served(canary) == {"0"}  # 40 clean requests: no canary is left to promote
    assert voice_of(canary)["active"] == "0" and states(canary)["2"] == "rolled-back"


def test_activating_the_active_version_ends_the_canary(canary: ModelManager) -> None:
    answer = canary.activate("voice", "1")
    assert (answer["from"], answer["to"]) == ("2", "1")
    assert voice_of(canary)["canary"] is None and served(canary) == {"1"}


def test_activating_the_canary_promotes_it(canary: ModelManager) -> None:
    canary.activate("voice", "2")
    assert (voice_of(canary)["active"], voice_of(canary)["canary"]) == ("2", None)
    assert states(canary)["1"] != "rolled-back"


def test_a_rollback_to_another_version_ends_the_canary_too(canary: ModelManager, tmp_path: Path) -> None:
    fake_model(tmp_path / "models", "voice", "0")
    canary.reconcile()
    answer = canary.rollback("voice", "0")
    assert (answer["from"], answer["to"]) == ("1", "0")
    assert voice_of(canary)["canary"] is None and served(canary) == {"0"}
    assert states(canary)["2"] == "rolled-back"


def test_a_rollback_while_the_only_upgrade_loads_calls_it_off(tmp_path: Path, fake_engines: None) -> None:
    """v1 serves, v2 is loading (slowly) and the voice has nothing before v1: the rollback is from
    v2. It answers at once, v2 never swaps in, is marked rolled back, and stays so after a restart."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "voice", "2", load_delay=2.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("2") == "loading", 10, "v2 loading", interval=0.01)
    answer = manager.rollback("voice")
    assert (answer["from"], answer["to"]) == ("2", "1") and answer["seconds"] < 1.0
    assert manager.jobs.wait(20)
    assert voice_of(manager)["active"] == "1" and states(manager)["2"] == "rolled-back", states(manager)
    manager.reconcile()
    assert voice_of(manager)["active"] == "1"
    manager.close()
    restarted = make_manager(tmp_path)
    restarted.start()
    assert voice_of(restarted)["active"] == "1" and states(restarted)["2"] == "rolled-back"
    restarted.close()


def test_requests_pinned_to_the_canary_do_not_promote_it(canary: ModelManager) -> None:
    """A client that names the version ("version": "2", for testing) chose it: 20 such requests
    promoted a 1 % canary to every request. Only drawn requests judge it."""
    for _ in range(20):
        lease = canary.acquire("voice", "2")
        lease.release(True)
    assert (voice_of(canary)["active"], voice_of(canary)["canary"]) == ("1", "2")
    lease = canary.acquire("voice", "2")
    lease.release(False)  # a pinned request's failure is still the model's
    assert voice_of(canary)["canary"] is None and states(canary)["2"] == "rolled-back"


def test_a_rollback_of_the_only_upgrade_takes_up_no_other_version_found_with_it(tmp_path: Path,
                                                                                fake_engines: None) -> None:
    """v2 and v3 dropped in together while v1 serves; v3 loads. The rollback is from v3: v2,
    found with it, is not taken up instead (it swapped in after the rollback had answered)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "voice", "2")
    fake_model(models, "voice", "3", load_delay=2.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("3") == "loading", 10, "v3 loading", interval=0.01)
    answer = manager.rollback("voice")
    assert (answer["from"], answer["to"]) == ("3", "1")
    assert manager.jobs.wait(20)
    assert voice_of(manager)["active"] == "1", states(manager)
    manager.close()
