"""Gray release by user: during a canary, a request's user key decides its version, so one user
always hears the same version while the canary runs; requests without a key keep the random draw,
and a pinned version still wins."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

from conftest import fake_model, make_manager

from ttsd.serving.serving_map import Served, ServingMap, user_point

USERS = [f"user-{i}" for i in range(200)]


def test_each_user_keeps_one_version_and_30_percent_of_users_are_on_the_canary(
        tmp_path: Path, fake_engines: None) -> None:
    """1. voice 1 serves; voice 2 arrives as a 30% canary (never promoted here).
    2. 200 users send 5 requests each, interleaved: each user gets one version for all five.
    3. 30% ± 10 points of the users are on the canary.
    4. Requests without a key are still drawn at random: both versions serve them.
    5. A user on the canary who pins version 1 gets version 1."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, canary={"*": 0.3}, canary_requests=10**9)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    assert (manager.snapshot()[0]["active"], manager.snapshot()[0]["canary"]) == ("1", "2")

    heard: dict[str, set[str]] = {user: set() for user in USERS}
    for _ in range(5):
        for user in USERS:
            with manager.acquire("voice", user=user) as lease:
                heard[user].add(lease.served.version)
    assert all(len(versions) == 1 for versions in heard.values()), heard
    on_canary = [user for user, versions in heard.items() if versions == {"2"}]
    assert 0.2 <= len(on_canary) / len(USERS) <= 0.4, len(on_canary)

    random.seed(7)
    anonymous = set()
    for _ in range(60):
        with manager.acquire("voice") as lease:
            anonymous.add(lease.served.version)
    assert anonymous == {"1", "2"}

    with manager.acquire("voice", "1", user=on_canary[0]) as lease:
        assert lease.served.version == "1"
    assert manager.snapshot()[0]["canary"] == "2"  # still a canary: the counts above all went on it


def test_a_larger_share_keeps_its_users_and_a_new_canary_picks_its_own() -> None:
    """1. At 10%, some users are on canary 2. 2. Grown to 30%, every one of them still is, and more
    join. 3. Canary 3 (at 30%) is a different set of users. The points are sha256, so they are the
    same on every box and after a restart."""
    share = {"value": 0.1}
    served_map = ServingMap(canary_share=lambda _name: share["value"])
    for version in ("1", "2", "3"):
        served_map.add(("voice", version), Served("voice", version, 16000), cast(Any, None))
    served_map.activate(("voice", "1"))
    served_map.set_canary(("voice", "2"))

    def canary_users() -> set[str]:
        users = set()
        for user in USERS:
            with served_map.acquire("voice", user=user) as lease:
                if lease.served.version != "1":
                    users.add(user)
        return users

    at_10 = canary_users()
    share["value"] = 0.3
    at_30 = canary_users()
    assert at_10 and at_10 < at_30
    served_map.set_canary(("voice", "3"))
    third = canary_users()
    assert 0.2 <= len(third) / len(USERS) <= 0.4 and third != at_30
    assert user_point(("voice", "2"), "user-1") == user_point(("voice", "2"), "user-1")
    assert 0.0 <= user_point(("voice", "2"), "x" * 256) < 1.0
