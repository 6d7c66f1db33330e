"""Races in the model manager's version lifecycle, found by probing it with the fake engine: each
test widens one window (a slow load, a slow write) and checks a promise of docs/upgrading.md or
docs/signing-and-fleets.md across it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import fake_model, make_manager, v2_over_v1
from daemon_util import wait_for
from fake_engine import FakeEngine

from ttsd.serving.manager import ModelManager
from ttsd.serving.residency import Budget
from ttsd.serving.source import LocalFolderSource
from ttsd.serving.versions import ModelVersion, Policy, State


def states(manager: ModelManager, voice: str = "voice") -> dict[str, str]:
    return {v["version"]: v["state"] for v in next(x for x in manager.snapshot() if x["name"] == voice)["versions"]}


def v2_and_a_slow_v3(manager: ModelManager, models: Path) -> None:
    """v2 and v3 arrive in one scan: one upgrade, v3 (the newest) first. Returns while v3 loads."""
    fake_model(models, "voice", "2")
    fake_model(models, "voice", "3", load_delay=1.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=10, interval=0.01, what="v3 loading")


def in_background(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` on a thread; (the thread, a list that gets its result or exception)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_an_upgrade_called_off_before_it_ran_leaves_no_version_verifying(tmp_path: Path, fake_engines: None) -> None:
    """Voice's upgrade to v2 waits for the background lane (another voice loads). v3 arrives and calls
    it off before it ran: v2 must not stay "verifying" for good (the upgrade's own clean-up never
    ran; a version coming up also keeps the voice from falling back)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    fake_model(models, "other", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "other", "2", load_delay=3)  # holds the background lane
    fake_model(models, "voice", "2")
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager, "other").get("2") == "loading", timeout=10, interval=0.01, what="other 2")
    print("voice while its job waits for the lane:", states(manager))
    fake_model(models, "voice", "3")
    manager.reconcile(wait=False)  # supersedes voice's upgrade to 2 before it ran
    assert manager.jobs.wait(30)
    manager.reconcile()
    time.sleep(0.5)
    manager.reconcile()
    print("after the jobs and two rescans:", states(manager))
    assert states(manager)["2"] != "verifying", states(manager)
    manager.close()


def test_an_upgrade_called_off_at_its_first_call_leaves_no_version_verifying(tmp_path: Path, fake_engines: None,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The upgrade is called off just after its job's last check: the pacing hook raises at the very
    call of the work, before the upgrade's own clean-up could run, and v2 stayed "verifying" for
    good (rescans took it as known, and it kept the voice from falling back)."""
    from ttsd.serving import pacing

    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    check, fired = pacing.Ticket.check, []

    def check_then_call_off(self: pacing.Ticket) -> None:
        check(self)
        if self.what.startswith("upgrade of voice") and not fired:
            fired.append(self)
            self.cancel("a newer folder")  # as a reconcile on another thread would, right after

    monkeypatch.setattr(pacing.Ticket, "check", check_then_call_off)
    fake_model(models, "voice", "2")
    manager.reconcile()
    monkeypatch.undo()
    assert fired
    manager.reconcile()
    assert states(manager)["2"] != "verifying", states(manager)
    manager.close()


def test_a_rollback_that_calls_off_a_waiting_upgrade_leaves_no_version_verifying(
    tmp_path: Path, fake_engines: None
) -> None:
    """As above, called off by an operator's rollback: v3 must not stay "verifying"."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    fake_model(models, "other", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()  # v2 active, v1 loaded standby
    fake_model(models, "other", "2", load_delay=3)
    fake_model(models, "voice", "3")
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager, "other").get("2") == "loading", timeout=10, interval=0.01, what="other 2")
    print("rollback:", manager.rollback("voice"))
    assert manager.jobs.wait(30)
    manager.reconcile()
    print("after:", states(manager))
    assert states(manager)["3"] != "verifying", states(manager)
    manager.close()


def test_a_version_whose_upgrade_was_called_off_shows_rolled_back_once_withdrawn(
    tmp_path: Path, fake_engines: None
) -> None:
    """v2's upgrade was called off before it ran; the fleet mirror then withdraws v2: it shows
    rolled back (a withdrawal keeps the state only of a version a job is bringing up)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    fake_model(models, "other", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "other", "2", load_delay=3)
    fake_model(models, "voice", "2")
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager, "other").get("2") == "loading", timeout=10, interval=0.01, what="other 2")
    fake_model(models, "voice", "3")
    manager.reconcile(wait=False)
    assert manager.jobs.wait(30)
    print("before:", states(manager))
    print("withdraw:", manager.withdraw("voice", "2", "fleet: bad build"))
    assert manager.jobs.wait(30)
    manager.reconcile()
    print("after withdraw + rescan:", states(manager), "marked:", manager.state.voice("voice").rolled_back)
    assert states(manager)["2"] == "rolled-back", states(manager)
    manager.close()


def test_a_withdrawal_before_the_upgrade_knows_its_version_stops_it_before_it_unloads(
    tmp_path: Path, fake_engines: None
) -> None:
    """--swap-policy memory: v2's upgrade waits for the background lane and does not know its version
    yet when the fleet mirror withdraws v2. It must not unload v1 and load v2 (it did, and the voice
    served nothing for about 1.2 s until v1 loaded again)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    fake_model(models, "other", "1")
    manager = make_manager(tmp_path, swap="memory")
    manager.start()
    fake_model(models, "other", "2", load_delay=3)
    fake_model(models, "voice", "2", load_delay=1)
    events: list[tuple[float, str, str, str]] = []
    gaps: list[float] = []
    manager._listener = lambda e, m: events.append((time.monotonic(), e, m.name, m.version))
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager, "other").get("2") == "loading", timeout=10, interval=0.01, what="other 2")
    print("withdraw:", manager.withdraw("voice", "2", "bad build"), states(manager))
    t0 = time.monotonic()
    stop = time.monotonic() + 30
    while manager.jobs.busy("voice") or manager.jobs.busy("other"):
        if manager.map.active("voice") is None:
            gaps.append(time.monotonic())
        time.sleep(0.01)
        assert time.monotonic() < stop
    after = [(e, n, v) for t, e, n, v in events if t >= t0 and n == "voice"]
    print("voice events after the withdrawal:", after)
    print("voice had nothing active for about %.2f s" % (0.01 * len(gaps)))
    print("states:", states(manager), "loads:", FakeEngine.loads)
    assert ("loading", "voice", "2") not in after and not gaps
    manager.close()


def test_a_withdrawal_during_an_activate_of_that_version_is_not_undone(tmp_path: Path, fake_engines: None) -> None:
    """keep=0: the operator activates v1, which must load; the fleet mirror withdraws v1 meanwhile.
    The activate must fail rather than clear the withdrawal's mark (v1 served across restarts)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1", load_delay=1.5)
    manager = make_manager(tmp_path, keep=0)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    assert states(manager) == {"1": "available", "2": "active"}, states(manager)
    t, out = in_background(lambda: manager.activate("voice", "1"))
    wait_for(lambda: states(manager).get("1") == "loading", timeout=10, interval=0.01, what="v1 loading")
    print("withdraw:", manager.withdraw("voice", "1", "fleet: bad build"))
    t.join(10)
    print("activate:", out, "states:", states(manager))
    print("state.json voice record:", manager.state.voice("voice"))
    manager.close()
    again = make_manager(tmp_path, keep=0)
    again.start()
    print("after restart:", states(again), again.snapshot()[0]["active"])
    assert again.snapshot()[0]["active"] != "1"
    again.close()


def test_a_withdrawal_between_a_rollbacks_load_and_its_swap_is_a_clear_error(
    tmp_path: Path, fake_engines: None
) -> None:
    """The operator's `rollback --to 1` has loaded v1 and not swapped yet; the fleet mirror withdraws
    v1. The rollback answers with a clear error, not an AssertionError (500): the withdrawal freed
    the engine the job had just loaded."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, keep=0)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    gate = threading.Event()

    def listener(event: str, model) -> None:  # type: ignore[no-untyped-def]
        if event == "loaded" and model.version == "1":
            gate.set()
            time.sleep(1.0)  # widen: loaded, not yet committed

    manager._listener = listener
    t, out = in_background(lambda: manager.rollback("voice", to="1"))
    assert gate.wait(10)
    print("withdraw:", manager.withdraw("voice", "1", "fleet: bad build"))
    t.join(10)
    print("rollback --to 1:", repr(out[0]), "states:", states(manager), "live:", FakeEngine.live)
    assert not isinstance(out[0], AssertionError)
    manager.close()


def test_an_operators_load_waits_its_turn_within_a_memory_budget(tmp_path: Path, fake_engines: None) -> None:
    """max_loaded=2: a background upgrade, a request's load of a parked voice and an operator's
    activate load at once. Each load makes room only for itself, so the operator's lane is not
    used within a budget: at most one engine over the budget (4 live engines were seen)."""
    models = tmp_path / "models"
    slow = dict(load_delay=0.5, warmup_delay=1.5)
    fake_model(models, "a", "1")
    fake_model(models, "b", "1", **slow)
    fake_model(models, "c", "1", **slow)
    fake_model(models, "c", "2")
    fake_model(models, "d", "1")
    source = LocalFolderSource(models, settle=0.0, incomplete_timeout=60.0)
    manager = ModelManager(
        source, state_dir=tmp_path / "state", policy=Policy(settle=0.0), default_voice="a", budget=Budget(max_loaded=2)
    )
    manager.start()
    assert manager.jobs.wait(30)
    time.sleep(0.5)
    print(
        "after start: live",
        FakeEngine.live,
        {n: manager.demand.residency(n, manager.lifecycle.active(n))["residency"] for n in "abcd"},
    )
    FakeEngine.peak = FakeEngine.live
    fake_model(models, "d", "2", **slow)
    manager.reconcile(wait=False)  # background lane: d's upgrade
    wait_for(lambda: states(manager, "d").get("2") in ("loading", "warming"), timeout=10, interval=0.01, what="d2")
    with manager.wanting("b") as future:  # urgent lane: a request's load of parked b
        t, out = in_background(lambda: manager.activate("c", "1"))  # operator lane
        future.result(30)
    t.join(30)
    assert manager.jobs.wait(30)
    print("activate:", out, "peak live engines:", FakeEngine.peak, "max_loaded: 2")
    assert FakeEngine.peak <= 3
    manager.close()


def test_a_rollback_whose_targets_are_withdrawn_one_after_another_ends(tmp_path: Path, fake_engines: None) -> None:
    """A rollback goes on to the next version when its target is withdrawn while it loads: it ends,
    and what it leaves holds across a restart."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, keep=0)
    manager.start()
    fake_model(models, "voice", "2", load_delay=1.5)
    manager.reconcile()
    fake_model(models, "voice", "3")
    manager.reconcile()
    print("start:", states(manager), manager.state.voice("voice"))
    t, out = in_background(lambda: manager.rollback("voice"))
    wait_for(lambda: states(manager).get("2") == "loading", timeout=10, interval=0.01, what="v2 loading")
    print("withdraw:", manager.withdraw("voice", "2", "fleet: bad build"))
    t.join(20)
    assert manager.jobs.wait(30)
    time.sleep(0.3)
    print("rollback:", out, "states:", states(manager), "live:", FakeEngine.live, manager.state.voice("voice"))
    assert out and isinstance(out[0], dict) and out[0]["to"] == "1"
    assert states(manager) == {"1": "active", "2": "rolled-back", "3": "rolled-back"} and FakeEngine.live == 1
    manager.close()
    again = make_manager(tmp_path, keep=0)
    again.start()
    print("after restart:", states(again), again.state.voice("voice"))
    again.close()


def test_a_memory_policy_upgrade_does_not_swap_in_over_an_operators_activate(
    tmp_path: Path, fake_engines: None
) -> None:
    """--swap-policy memory: v3's upgrade has unloaded v1 (so no action calls it off); the operator
    activates the loaded v2 meanwhile, which answers at once. v3 must not swap in over it."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, swap="memory")
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    manager.activate("voice", "1")  # v1 active, v2 a loaded standby
    print("before:", states(manager))
    fake_model(models, "voice", "3", load_delay=2)
    t, _ = in_background(manager.reconcile)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=10, interval=0.01, what="v3 loading")
    print("activate 2 during the memory upgrade:", manager.activate("voice", "2"), states(manager))
    t.join(20)
    print("after the upgrade:", states(manager), manager.state.voice("voice"))
    assert manager.snapshot()[0]["active"] == "2"
    manager.close()


def test_the_budget_does_not_unload_a_rollbacks_target_during_its_swap(tmp_path: Path, fake_engines: None) -> None:
    """A memory budget: the rollback to b's loaded standby writes state.json (slow on an SD card),
    and a request for parked c makes room meanwhile, choosing b 1, the idle standby. b 1 must
    not be unloaded under the swap (an AssertionError, state.json saying 1 while 2 served), nor
    parked once active (b is preloaded)."""
    models = tmp_path / "models"
    fake_model(models, "a", "1")
    fake_model(models, "b", "1")
    fake_model(models, "c", "1")
    source = LocalFolderSource(models, settle=0.0, incomplete_timeout=60.0)
    manager = ModelManager(
        source,
        state_dir=tmp_path / "state",
        policy=Policy(settle=0.0),
        default_voice="a",
        budget=Budget(max_loaded=3, preload=("a", "b")),
    )
    manager.start()
    fake_model(models, "b", "2")
    manager.reconcile()
    assert manager.jobs.wait(10)
    time.sleep(0.3)
    print("before:", states(manager, "b"), "c:", manager.demand.residency("c", manager.lifecycle.active("c")))
    commit = manager.state.commit

    def slow_commit(name, record):  # type: ignore[no-untyped-def]
        commit(name, record)
        time.sleep(0.5)  # a slow fsync

    manager.state.commit = slow_commit  # type: ignore[method-assign]
    t, out = in_background(lambda: manager.rollback("b"))
    time.sleep(0.1)
    with manager.wanting("c") as f:  # a request for parked c: make_room evicts the idle rollback target b 1
        f.result(10)
    t.join(10)
    print("rollback:", repr(out[0]))
    print("in memory: active", manager.lifecycle.active("b").version, states(manager, "b"))  # type: ignore[union-attr]
    print("state.json:", manager.state.voice("b"))
    with manager.acquire("b") as lease:
        print("a request for b is served by", lease.voice.version)
    manager.close()
    again = ModelManager(
        LocalFolderSource(models, settle=0.0, incomplete_timeout=60.0),
        state_dir=tmp_path / "state",
        policy=Policy(settle=0.0),
        default_voice="a",
        budget=Budget(max_loaded=3, preload=("a", "b")),
    )
    again.start()
    print("after restart:", states(again, "b"))
    again.close()
    assert not isinstance(out[0], BaseException)


def test_a_job_that_outlives_the_shutdown_commits_nothing(tmp_path: Path, fake_engines: None) -> None:
    """keep=0: an operator's activate loads v1 when the manager shuts down (``close`` waits 10 s for
    jobs; a slow load outlives that). The job must not swap v1 into the emptied map: its engine
    stayed loaded, referenced by nothing."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1", load_delay=1.0)
    manager = make_manager(tmp_path, keep=0)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    t, out = in_background(lambda: manager.activate("voice", "1"))
    wait_for(lambda: states(manager).get("1") == "loading", timeout=10, interval=0.01, what="v1 loading")
    manager.lifecycle.close()  # what ModelManager.close does once its wait for jobs has run out
    t.join(20)
    assert manager.jobs.wait(20) and out and isinstance(out[0], BaseException), out
    assert manager.map.active("voice") is None and FakeEngine.live == 0


def test_a_pruned_store_copy_leaves_the_store_at_once(tmp_path: Path, fake_engines: None) -> None:
    """Pruning a store copy moves it out of the store under the table's lock and deletes it after:
    a job copying the same version in again meanwhile writes a fresh directory, never one being
    deleted (its files vanished mid-load and the version was refused for it). A crash between the
    two leaves a ``.partial`` dir, which the next start removes."""
    from ttsd.serving.store import ModelStore

    _models, manager = v2_over_v1(tmp_path, keep=0)
    store = ModelStore(tmp_path / "state" / "store")
    copy = store.path("voice", "1")
    assert copy.is_dir()
    aside = store.set_aside("voice", "1")
    assert aside is not None and aside.is_dir() and not copy.exists() and aside.name.endswith(".partial")
    assert store.set_aside("voice", "1") is None  # nothing left there
    manager.close()
    store.prepare()  # the next start
    assert not aside.exists()


def test_a_store_copy_pruned_while_it_is_copied_in_again_is_copied_afresh(
    tmp_path: Path, fake_engines: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback to a version the settle thread is pruning at that moment (it was rolled back a
    moment before) copies it into the store again: the old copy vanishing between the store's look
    and its removal is no reason to refuse the version (seen once in CI: "cannot serve voice 2"),
    nor to warn of a damaged copy."""
    from ttsd.manifest import read_manifest
    from ttsd.serving import store as stores

    models, manager = v2_over_v1(tmp_path)
    manager.close()
    store = stores.ModelStore(tmp_path / "state" / "store")
    assert store.path("voice", "2").is_dir()
    real_verify = stores.verify

    def pruned_meanwhile(folder: Path):  # type: ignore[no-untyped-def]
        assert store.set_aside("voice", "2") is not None  # what the prune does, under its lock
        return real_verify(folder)  # the copy is gone: an OSError, taken for a damaged copy

    monkeypatch.setattr(stores, "verify", pruned_meanwhile)
    folder = models / "voice-2"
    copy = store.put(folder, read_manifest(folder))
    monkeypatch.setattr(stores, "verify", real_verify)
    assert copy == store.path("voice", "2") and stores.content_id(stores.verify(copy)) == stores.content_id(
        read_manifest(folder)
    )
    assert "damaged" not in caplog.text, caplog.text


@pytest.mark.parametrize("swap", ["parallel", "memory"])
def test_withdrawing_the_newest_of_two_new_versions_still_brings_up_the_other(
    tmp_path: Path, fake_engines: None, swap: str
) -> None:
    """v2 and v3 arrive in one scan: one upgrade, v3 first. The fleet mirror withdraws v3 while it
    loads. v2, newer than v1 and good, must still be brought up (the whole job was called off and
    v2, left "available" and known, was never promoted, across restarts too; a v3 that failed to
    load fell through to v2)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, swap=swap)
    manager.start()
    v2_and_a_slow_v3(manager, models)
    manager.withdraw("voice", "3", "withdrawn by the fleet mirror: clipped")
    wait_for(lambda: manager.snapshot()[0]["active"] == "2", timeout=20, what="v2 active")
    assert manager.jobs.wait(20)
    assert states(manager) == {
        "1": "standby" if swap == "parallel" else "available",
        "2": "active",
        "3": "rolled-back",
    }, states(manager)
    manager.close()


def test_a_rollback_while_the_memory_policy_upgrade_serves_nothing_ends_that_upgrade(
    tmp_path: Path, fake_engines: None
) -> None:
    """--swap-policy memory: v3's upgrade has v1 out of service (v2 came in the same scan). A
    rollback then is not a 409 to retry later: v3 is marked rolled back, its swap does not
    happen, v1 loads again, and the answer says so once v1 serves. v2, handed to the same
    upgrade, is not taken up instead (as a withdrawal would have it): the operator wanted back."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, swap="memory")
    manager.start()
    v2_and_a_slow_v3(manager, models)
    assert manager.snapshot()[0]["active"] is None  # v1 is unloaded: the memory policy
    result = manager.rollback("voice")
    assert (result["from"], result["to"]) == ("3", "1"), result
    assert manager.snapshot()[0]["active"] == "1"
    assert manager.jobs.wait(20)
    manager.reconcile()
    assert manager.jobs.wait(20)
    assert states(manager) == {"1": "active", "2": "available", "3": "rolled-back"}, states(manager)
    assert "3" in manager.state.voice("voice").rolled_back
    manager.close()


def test_a_rollback_to_another_version_while_the_memory_policy_upgrade_serves_nothing_is_a_conflict(
    tmp_path: Path, fake_engines: None
) -> None:
    """--swap-policy memory: v3's upgrade has v2 out of service. ``rollback --to 1`` names neither
    the version coming up nor the one it replaces: a 409 that says why ("being upgraded"), not a
    404 "no active version"; once the upgrade is done it works."""
    from ttsd.errors import ConflictError

    models, manager = v2_over_v1(tmp_path, swap="memory")
    fake_model(models, "voice", "3", load_delay=1.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=10, interval=0.01, what="v3 loading")
    with pytest.raises(ConflictError, match="being upgraded"):
        manager.rollback("voice", to="1")
    assert manager.jobs.wait(20)
    assert manager.snapshot()[0]["active"] == "3"
    assert manager.rollback("voice", to="1")["to"] == "1"
    manager.close()


def test_a_withdrawal_of_the_active_version_that_loses_the_race_to_an_upgrade(
    tmp_path: Path, fake_engines: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet mirror withdraws active v2; before its rollback takes the lock, v3's upgrade swaps
    in (v2 is now v3's rollback target). The rollback must not go from v3 back to v2, serving the
    withdrawn version and marking the good one: v3 serves, v2 is marked and no rollback target."""
    models, manager = v2_over_v1(tmp_path)
    fake_model(models, "voice", "3")
    real = manager.control.rollback

    def late(*args, **kwargs):  # type: ignore[no-untyped-def]
        manager.reconcile()  # v3's upgrade lands first
        return real(*args, **kwargs)

    monkeypatch.setattr(manager.control, "rollback", late)
    manager.withdraw("voice", "2", "withdrawn by the fleet mirror: clipped")
    monkeypatch.undo()
    voice = manager.snapshot()[0]
    assert voice["active"] == "3" and states(manager)["2"] == "rolled-back", states(manager)
    assert voice["rollback_to"] != "2"
    manager.close()


@pytest.mark.parametrize("swap", ["parallel", "memory"])
def test_a_store_prune_while_a_job_copies_its_version_in_leaves_that_copy(
    tmp_path: Path, fake_engines: None, swap: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A version an upgrade takes up again (handed on when a newer one was withdrawn, or retried)
    was "available" when its job began. The swap that put v1 back prunes the store on a thread of
    its own; landing just after v2 was copied in, it took v2's fresh copy as stale, and v2 was
    refused for it ("AssertionError", seen once in CI). A job's version is "verifying" from the
    start, so the prune leaves it: here the prune runs right after each copy is recorded. (A copy
    lost all the same is made again by the load, never a refusal.)"""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, swap=swap)
    manager.start()
    real_store_new = manager.bringup.store_new

    def store_new_then_prune(model, folder, again):  # type: ignore[no-untyped-def]
        stored = real_store_new(model, folder, again)
        manager.lifecycle.prune_store(model.name)  # the swap's settle, at the worst moment
        return stored

    monkeypatch.setattr(manager.bringup, "store_new", store_new_then_prune)
    v2_and_a_slow_v3(manager, models)
    manager.withdraw("voice", "3", "withdrawn by the fleet mirror: clipped")
    wait_for(lambda: manager.snapshot()[0]["active"] == "2", timeout=20, what="v2 active")
    assert manager.jobs.wait(20)
    assert states(manager)["2"] == "active", states(manager)
    assert "copied again" not in caplog.text  # kept, not lost and made again by the load
    manager.close()


@pytest.mark.parametrize("action", ["activate", "rollback --to"])
def test_a_swap_back_to_a_version_whose_last_request_is_ending_keeps_its_engine(
    tmp_path: Path, fake_engines: None, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """v2 serves a request; a rollback puts v1 back and v2 stays loaded until that request ends.
    The operator swaps back to v2 (loaded: no load). The request ends while the swap writes
    state.json: its unload took v2's engine between the swap's "is it loaded" and serving it, so
    the swap failed with state.json saying v2 while v1 went on serving (after ``rollback --to``,
    a restart then served nothing). The unload waits for the swap, and then leaves v2 alone."""
    _models, manager = v2_over_v1(tmp_path)
    lease = manager.acquire("voice")
    assert lease.voice.version == "2"
    manager.rollback("voice")
    v2 = manager.version("voice", "2")
    assert v2 is not None and v2.engine is not None
    real_commit = manager.state.commit

    def commit_while_the_last_request_ends(name, record):  # type: ignore[no-untyped-def]
        lease.release()  # -> unload_later(v2), on a thread of its own
        time.sleep(0.3)  # ample for that unload, were it not held off
        return real_commit(name, record)

    monkeypatch.setattr(manager.state, "commit", commit_while_the_last_request_ends)
    result = manager.activate("voice", "2") if action == "activate" else manager.rollback("voice", "2")
    monkeypatch.setattr(manager.state, "commit", real_commit)  # (undo() would take the fake engine too)
    assert result["to"] == "2"
    time.sleep(0.3)  # the unload, once let through
    assert manager.map.active("voice") == v2.key and v2.engine is not None
    assert manager.state.voice("voice").active == "2"
    with manager.acquire("voice") as lease2:
        assert lease2.voice.version == "2"
    manager.close()
    again = make_manager(tmp_path)
    again.start()
    assert again.snapshot()[0]["active"] == "2"
    again.close()


def test_a_store_prune_while_an_activate_makes_room_leaves_the_target(
    tmp_path: Path, fake_engines: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1 was withdrawn (off the rollback stack; its store copy stays until the next prune) and its
    models-dir folder removed. ``ttsd activate voice 1`` loads it from the store copy. A swap's
    prune landing while the load made room took that copy (v1 was not yet "verifying"), and the
    activate failed with nothing left to copy again. v1 is "verifying" before room is made."""
    import shutil

    models, manager = v2_over_v1(tmp_path)
    time.sleep(0.5)  # v2's swap's own settle (its prune) is done
    manager.withdraw("voice", "1", "withdrawn by the fleet mirror")
    shutil.rmtree(models / "voice-1")
    manager.reconcile()
    v1 = manager.version("voice", "1")
    assert v1 is not None and v1.store_copy is not None and v1.folder is None
    real_make_room = manager.demand.make_room

    def prune_then_make_room(model, **kw):  # type: ignore[no-untyped-def]
        manager.lifecycle.prune_store(model.name)  # a swap's settle, at the worst moment
        return real_make_room(model, **kw)

    monkeypatch.setattr(manager.demand, "make_room", prune_then_make_room)
    assert manager.activate("voice", "1")["to"] == "1"
    assert manager.snapshot()[0]["active"] == "1"
    manager.close()


def test_an_activate_while_the_memory_policy_upgrade_serves_nothing_keeps_the_retired_version(
    tmp_path: Path, fake_engines: None
) -> None:
    """--swap-policy memory: v2 serves, v1 is a loaded standby. v3's upgrade takes v2 out of
    service and loads; the operator's ``activate voice 1`` (loaded: no load) serves v1 meanwhile.
    v2, the version that served until then, is v1's rollback target: it was left off the stack
    (only the upgrade's own swap counted it as replaced), and with its folder gone the prune
    dropped its store copy and forgot it."""
    import shutil

    models, manager = v2_over_v1(tmp_path, swap="memory")
    manager.rollback("voice")  # v1 serves, v2 rolled back
    manager.activate("voice", "2")  # v2 serves again; v1 is unloaded (the memory policy keeps none)
    v1 = manager.version("voice", "1")
    assert v1 is not None and v1.engine is None
    # loaded as a standby by hand: the memory policy's own actions never leave one (a state this
    # code must still handle, as a version a request loads within a memory budget may be)
    assert manager.bringup.bring_up(v1, "a standby for the test") and manager.lifecycle.stand_by(v1)
    shutil.rmtree(models / "voice-2")  # only the store holds v2 now
    manager.reconcile()
    fake_model(models, "voice", "3", load_delay=1.5)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("3") == "loading", timeout=10, interval=0.01, what="v3 loading")
    assert manager.activate("voice", "1")["to"] == "1"
    assert manager.jobs.wait(20)
    time.sleep(0.5)  # the swap's settle (its prune), on a thread of its own
    assert manager.snapshot()[0]["active"] == "1"
    assert manager.state.voice("voice").previous[-1] == "2"
    v2 = manager.version("voice", "2")
    assert v2 is not None and v2.store_copy is not None and v2.store_copy.is_dir()
    assert manager.rollback("voice")["to"] == "2"
    manager.close()


def test_an_upgrade_handed_on_after_a_withdrawal_leaves_the_versions_already_refused(
    tmp_path: Path, fake_engines: None, caplog: pytest.LogCaptureFixture
) -> None:
    """v2, v3 and v4 arrive in one scan: v4 fails to load (refused), v3 loads and is withdrawn
    meanwhile. The versions handed on to a job of their own are the ones not tried: v2 comes up,
    and v4 is not copied, hashed and loaded again to be refused a second time."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    fake_model(models, "voice", "4", fail_on="load")  # in the same scan
    v2_and_a_slow_v3(manager, models)
    manager.withdraw("voice", "3", "withdrawn by the fleet mirror: clipped")
    wait_for(lambda: manager.snapshot()[0]["active"] == "2", timeout=20, what="v2 active")
    assert manager.jobs.wait(20)
    assert states(manager)["4"] == "refused", states(manager)
    assert caplog.text.count("refused voice 4") == 1, caplog.text
    manager.close()


def test_a_rollback_of_a_voice_serving_nothing_for_another_reason_leaves_its_upgrade(
    tmp_path: Path, fake_engines: None
) -> None:
    """Default swap policy. v1 was active but cannot come back after a restart (its store copy
    damaged, its folder gone): nothing serves, and v2's upgrade is the voice's way back. A rollback
    meanwhile is a 409 that changes nothing (it is not the memory policy's upgrade, which took a
    serving version out: marking v2 rolled back would leave the voice serving nothing)."""
    import os
    import shutil

    from ttsd.errors import ConflictError

    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path)
    manager.start()
    copy = manager.version("voice", "1").store_copy
    manager.close()
    shutil.rmtree(models / "voice-1")
    os.chmod(copy, 0o755)
    os.chmod(copy / "fake.json", 0o644)
    (copy / "fake.json").write_text('{"damaged": true}')
    manager = make_manager(tmp_path)
    manager.start()
    assert manager.snapshot()[0]["active"] is None and manager.state.voice("voice").active == "1"
    fake_model(models, "voice", "2", load_delay=1.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("2") == "loading", timeout=10, interval=0.01, what="v2 loading")
    with pytest.raises(ConflictError, match="being upgraded"):
        manager.rollback("voice")
    assert manager.jobs.wait(20)
    assert manager.snapshot()[0]["active"] == "2"
    assert "2" not in manager.state.voice("voice").rolled_back
    manager.close()


def test_two_rollbacks_while_the_memory_policy_upgrade_serves_nothing_record_it_once(
    tmp_path: Path, fake_engines: None
) -> None:
    """Two operators roll back while v2's upgrade has v1 out of service: both get the same answer
    (from 2 to 1); the history and the transitions metric say it once, with where it went."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, swap="memory")
    manager.start()
    fake_model(models, "voice", "2", load_delay=1.0)
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("2") == "loading", timeout=10, interval=0.01, what="v2 loading")
    answers = [in_background(lambda: manager.rollback("voice")) for _ in range(2)]
    for thread, _ in answers:
        thread.join(20)
    assert [(out[0]["from"], out[0]["to"]) for _, out in answers] == [("2", "1"), ("2", "1")], answers
    assert manager.jobs.wait(20)
    trail = [(h["from"], h["to"], h["why"]) for h in manager.history()]
    assert trail.count(("2", "1", "rollback requested")) == 1, trail
    manager.close()


def test_a_rollback_after_the_memory_policy_upgrade_failed_leaves_the_refusal(
    tmp_path: Path, fake_engines: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--swap-policy memory: v2 fails to load (refused) and the upgrade loads v1 again (slowly
    here). A rollback then has no upgrade left to end: a 409 ("being upgraded") that keeps v2's
    refusal and its reason, and marks nothing (a fixed v2 dropped in again is judged again)."""
    from ttsd.errors import ConflictError

    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, swap="memory")
    manager.start()
    real_load = FakeEngine.load

    def slow_v1(self):  # type: ignore[no-untyped-def]
        if self.folder.name == "1":
            time.sleep(1.5)
        return real_load(self)

    monkeypatch.setattr(FakeEngine, "load", slow_v1)
    fake_model(models, "voice", "2", fail_on="load")
    manager.reconcile(wait=False)
    wait_for(lambda: states(manager).get("2") == "refused", timeout=10, interval=0.01, what="v2 refused")
    assert manager.snapshot()[0]["active"] is None
    with pytest.raises(ConflictError, match="being upgraded"):
        manager.rollback("voice")
    assert manager.jobs.wait(20)
    v2 = manager.version("voice", "2")
    assert v2 is not None and "fail on load" in v2.reason, v2.reason
    assert "2" not in manager.state.voice("voice").rolled_back
    assert manager.snapshot()[0]["active"] == "1"
    manager.close()


def voice_serving_nothing(tmp_path: Path) -> tuple[ModelManager, ModelVersion, ModelVersion]:
    """v1 loaded as v2's rollback target, and v2 out of service: the voice serves nothing and
    falls back. Returns (the manager, v1, v2)."""
    _models, manager = v2_over_v1(tmp_path)
    v1, v2 = manager.table.get("voice", "1"), manager.table.get("voice", "2")
    assert v1 is not None and v2 is not None and v1.engine is not None
    manager.lifecycle.retire_now(v2)
    assert manager.lifecycle.active("voice") is None
    return manager, v1, v2


@pytest.mark.parametrize("then", ["serves", "shutting down", "withdrawn"])
def test_a_fall_back_whose_standby_is_unloaded_before_it_serves_loads_it_again(
    tmp_path: Path, fake_engines: None, then: str
) -> None:
    """v2 did not come back (refused), so the voice falls back to v1, its loaded standby. Another
    voice's load makes room in the memory budget between the fall-back's "is it loaded" and its
    swap, taking v1's engine: v1 is still the newest that verifies, so it loads again and serves
    (the fall-back went on to older versions, and with none the voice served nothing until the
    next rescan). Not when ttsd is shutting down (close unloads every engine), nor when v1 was
    withdrawn meanwhile."""
    manager, _v1, v2 = voice_serving_nothing(tmp_path)
    manager.table.change(v2, state=State.REFUSED, reason="did not come back")
    serve, bring_up = manager.promoter._serve, manager.promoter.bringup.bring_up
    loads: list[str] = []

    def evicted_first(model, why, **kw):  # type: ignore[no-untyped-def]
        if not loads:  # the budget's eviction (demand._evict) lands just before the swap
            loads.append("evicted")
            assert manager.demand._evict(model) and model.engine is None
            if then == "shutting down":
                manager.lifecycle.close()
            elif then == "withdrawn":
                manager.state.put("voice", manager.state.voice("voice").withdrawn("1"))
        return serve(model, why, **kw)

    def counted(model, why):  # type: ignore[no-untyped-def]
        loads.append(f"load {model.version}")
        return bring_up(model, why)

    manager.promoter._serve = evicted_first  # type: ignore[method-assign]
    manager.promoter.bringup.bring_up = counted  # type: ignore[method-assign]
    manager.promoter.fall_back("voice")
    active = manager.lifecycle.active("voice")
    if then == "serves":
        assert loads == ["evicted", "load 1"]
        assert active is not None and active.version == "1", states(manager)
        with manager.acquire("voice") as lease:
            assert lease.voice.version == "1"
    else:
        assert loads == ["evicted"] and active is None, (loads, states(manager))
    manager.close()


def test_a_fall_back_does_not_swap_in_over_an_operators_activate(tmp_path: Path, fake_engines: None) -> None:
    """The voice serves nothing and falls back to v2, which must load. Meanwhile the operator
    activates v1, a loaded standby, which swaps at once beside the fall-back's job. When v2 is
    loaded the fall-back stops: it swapped v2 in over the operator's choice (and not durably,
    so state.json said 1 while 2 served)."""
    manager, _v1, _v2 = voice_serving_nothing(tmp_path)
    bring_up = manager.promoter.bringup.bring_up
    answers: list[object] = []

    def operator_meanwhile(model, why):  # type: ignore[no-untyped-def]
        if not answers:
            answers.append(manager.activate("voice", "1"))
        return bring_up(model, why)

    manager.promoter.bringup.bring_up = operator_meanwhile  # type: ignore[method-assign]
    manager.promoter.fall_back("voice")
    active = manager.lifecycle.active("voice")
    assert active is not None and active.version == "1", (answers, states(manager))
    assert manager.state.voice("voice").active == "1"
    assert states(manager)["2"] != "active" and manager.table.get("voice", "2").engine is None  # type: ignore[union-attr]
    manager.close()
