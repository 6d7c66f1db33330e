"""Gray release by user: during a canary, a request's user key decides its version, so one user
always hears the same version while the canary runs; requests without a key keep the random draw,
and a pinned version still wins."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import fake_model, make_manager
from inproc import FakeVoices, FrontEnds
from test_spool import Clock, settle_and_serve

from ttsd.front import spool as spool_module
from ttsd.serving.serving_map import ServingMap, VoiceVersion, user_point

USERS = [f"user-{i}" for i in range(200)]
CANARY = ("joe", "2")  # the fake backend below: joe 1 active, joe 2 a 30% canary


def on_canary(user: str) -> bool:
    return user_point(CANARY, user) < 0.3


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
                heard[user].add(lease.voice.version)
    assert all(len(versions) == 1 for versions in heard.values()), heard
    on_canary = [user for user, versions in heard.items() if versions == {"2"}]
    assert 0.2 <= len(on_canary) / len(USERS) <= 0.4, len(on_canary)

    random.seed(7)
    anonymous = set()
    for _ in range(60):
        with manager.acquire("voice") as lease:
            anonymous.add(lease.voice.version)
    assert anonymous == {"1", "2"}

    with manager.acquire("voice", "1", user=on_canary[0]) as lease:
        assert lease.voice.version == "1"
    assert manager.snapshot()[0]["canary"] == "2"  # still a canary: the counts above all went on it


def test_a_larger_share_keeps_its_users_and_a_new_canary_picks_its_own() -> None:
    """1. At 10%, some users are on canary 2. 2. Grown to 30%, every one of them still is, and more
    join. 3. Canary 3 (at 30%) is a different set of users. The points are sha256, so they are the
    same on every box and after a restart."""
    share = {"value": 0.1}
    served_map = ServingMap(canary_share=lambda _name: share["value"])
    for version in ("1", "2", "3"):
        served_map.add(("voice", version), VoiceVersion("voice", version, 16000), cast(Any, None))
    served_map.activate(("voice", "1"))
    served_map.set_canary(("voice", "2"))

    def canary_users() -> set[str]:
        users = set()
        for user in USERS:
            with served_map.acquire("voice", user=user) as lease:
                if lease.voice.version != "1":
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


# -- through the front ends (HTTP routes and the spool, in-process) ---------------------------------------
@pytest.fixture
def voices(tmp_path: Path) -> Iterator[FakeVoices]:
    v = FakeVoices(tmp_path, {"joe": {"1": {}, "2": {}}}, default_voice="joe", queue_size=4, canary_share=0.3)
    v.map.activate(("joe", "1"))
    v.map.set_canary(CANARY)
    yield v
    v.close()


# 12 users of whom 4 are on the canary: enough to tell a user key from a coin (2^-24 by chance)
SOME = [u for u in USERS if on_canary(u)][:4] + [u for u in USERS if not on_canary(u)][:8]


@pytest.mark.parametrize("route, body, key", [
    ("/v1/synthesize", {"text": "Hi."}, "header"),
    ("/v1/synthesize", {"text": "Hi."}, "field"),
    ("/v1/audio/speech", {"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "wav"}, "header"),
    ("/v1/audio/speech", {"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "wav"}, "field"),
])
def test_a_user_key_picks_the_version_over_http(api: FrontEnds, route: str, body: dict[str, Any], key: str) -> None:
    """Each user's two requests get the version the user's point says, by header or by field."""
    for _ in range(2):
        for user in SOME:
            if key == "header":
                reply = api.post(route, body, headers={"X-Ttsd-User": user})
            else:
                reply = api.post(route, {**body, "user": user})
            assert reply.status == 200, reply.body[:300]
            assert reply.headers["X-Ttsd-Version"] == ("2" if on_canary(user) else "1"), user


def test_the_same_user_in_header_and_field_is_fine_a_different_one_is_a_400(api: FrontEnds,
                                                                          voices: FakeVoices) -> None:
    user = SOME[0]  # on the canary
    reply = api.post("/v1/synthesize", {"text": "Hi.", "user": user}, headers={"X-Ttsd-User": user})
    assert (reply.status, reply.headers["X-Ttsd-Version"]) == (200, "2")
    reply = api.post("/v1/synthesize", {"text": "Hi.", "user": user}, headers={"X-Ttsd-User": SOME[5]})
    assert (reply.status, reply.error["code"]) == (400, "bad_request")
    assert "field 'user' and header X-Ttsd-User name different users" in reply.error["message"]
    reply = api.post("/v1/synthesize", {"text": "Hi.", "user": user, "version": "1"})  # a pinned version wins
    assert (reply.status, reply.headers["X-Ttsd-Version"]) == (200, "1")


@pytest.mark.parametrize("body, headers", [
    ({"user": ""}, {}),
    ({"user": "u" * 4097}, {}),
    ({"user": "tab\there"}, {}),
    ({"user": "new\nline"}, {}),
    ({"user": "\u200bzero-width"}, {}),
    ({"user": 42}, {}),
    ({"user": ["a"]}, {}),
    ({}, {"X-Ttsd-User": "u" * 4097}),
    ({}, {"X-Ttsd-User": ""}),
])
@pytest.mark.parametrize("route", ["/v1/synthesize", "/v1/audio/speech"])
def test_a_bad_user_key_is_the_request_s_fault(api: FrontEnds, voices: FakeVoices, route: str,
                                               body: dict[str, Any], headers: dict[str, str]) -> None:
    text = {"text": "Hi."} if route == "/v1/synthesize" else {"input": "Hi."}
    reply = api.post(route, {**text, **body}, headers=headers)
    assert (reply.status, reply.error["code"]) == (400, "bad_request"), reply.body
    assert "user key of 1 to 4096 printable characters" in reply.error["message"]
    assert voices.released == []  # refused before a lease: nothing counted against a version
    metrics = api.get("/metrics").body.decode()
    assert 'fault="request"' in metrics and "user-" not in metrics


def test_a_user_key_in_a_spool_request(api: FrontEnds, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(spool_module, "time", clock)  # settling without sleeps, as in test_spool
    dirs = api.spool.dirs
    canary, stable = SOME[0], SOME[-1]
    for name, user in (("a", canary), ("b", stable), ("c", canary)):
        (dirs["incoming"] / f"{name}.json").write_text(json.dumps({"text": "From the spool.", "user": user}))
    settle_and_serve(api, clock)
    versions = {n: json.loads((dirs["out"] / f"{n}.json").read_text())["version"] for n in "abc"}
    assert versions == {"a": "2", "b": "1", "c": "2"}


@pytest.mark.parametrize("route", ["/v1/synthesize", "/v1/audio/speech"])
def test_a_long_user_id_stands_as_its_hash(api: FrontEnds, voices: FakeVoices, route: str) -> None:
    """OpenAI clients may send end-user ids longer than 256 characters: taken, as their sha256,
    so the same long id is the same user (and the same canary side) every time, not refused."""
    from ttsd.front.speech_request import parse_user

    long_id = "org-1234/" + "u" * 400
    assert parse_user(long_id) == parse_user(long_id) != parse_user(long_id + "x")
    assert parse_user(long_id).startswith("sha256:") and len(parse_user(long_id)) < 80  # type: ignore[union-attr]
    text = {"text": "Hi."} if route == "/v1/synthesize" else {"input": "Hi."}
    assert api.post(route, {**text, "user": long_id}).status == 200

