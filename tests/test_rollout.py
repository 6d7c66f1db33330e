"""Staged rollout across a fleet (issue 30): the mirror's index gives each version a share of boxes,
``get --upgrade`` follows it by the rule gray release uses (``ttsd.shares``), a withdrawn version
leaves every box that has it, and an unchanged mirror costs one request answered 304."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from catalog_server import Mirror, serve, serve_dir
from conftest import plausible, save_tiny_vits
from daemon_util import start_daemon, wait_for
from test_catalog import invoke, one_line_error
from test_signing import folder_of_two

from ttsd.fetch.fleet_index import INDEX_FILE
from ttsd.manifest import pack, read_manifest
from ttsd.shares import within

BOXES = [f"box-{i:02d}" for i in range(10)]


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    with serve() as m:
        yield m


def publish(folder: Path, where: Path, *args: str) -> None:
    result = invoke("models", "publish", str(folder), str(where), *args)
    assert result.exit_code == 0, result.output


def get(mirror: Mirror, box: Path, box_id: str, *args: str) -> Any:
    return invoke("models", "get", "voice", "--upgrade", *args, "--mirror", mirror.url, "--models",
                  str(box / "models"), "--cache", str(box / "cache"), "--box-id", box_id, "--timeout", "10",
                  "--socket", str(box / "no-daemon.sock"))


def versions_on(box: Path) -> list[str]:
    models = box / "models"
    return sorted(read_manifest(p).version for p in models.iterdir() if not p.name.startswith("."))


# -- shares ---------------------------------------------------------------------------------------------
def test_ten_boxes_follow_the_share_and_widening_keeps_every_box_that_had_it(tmp_path: Path, mirror: Mirror) -> None:
    """v1 to every box; v2 at 0.3: exactly the boxes the rule picks take it, the same on a rerun;
    at 0.6 every earlier box still has it and more take it; at 1.0 all do."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published, "--rollout", "0.3")
    serve_dir(mirror, published)
    picked: dict[float, set[str]] = {}
    for share in (0.3, 0.3, 0.6, 1.0):
        if share != 0.3:
            assert invoke("models", "rollout", str(published), "voice", "2", str(share)).exit_code == 0
            serve_dir(mirror, published)
        took = set()
        for box_id in BOXES:
            result = get(mirror, tmp_path / box_id, box_id)
            assert result.exit_code == 0, result.output
            if "2" in versions_on(tmp_path / box_id):
                took.add(box_id)
            else:
                assert versions_on(tmp_path / box_id) == ["1"] and "goes to" in result.output, result.output
        assert took == {b for b in BOXES if within(share, "voice", "2", b)}, share
        if share in picked:
            assert took == picked[share]  # a rerun picks the same boxes
        picked[share] = took
    assert 0 < len(picked[0.3]) < len(picked[0.6]) < 10 and picked[0.3] <= picked[0.6]
    assert picked[1.0] == set(BOXES)
    # narrowed back to 0.1: every box keeps v2 (withdraw takes a version back, narrowing does not),
    # and none is told v2 is not for it
    assert invoke("models", "rollout", str(published), "voice", "2", "0.1").exit_code == 0
    serve_dir(mirror, published)
    for box_id in BOXES:
        result = get(mirror, tmp_path / box_id, box_id)
        assert result.exit_code == 0 and "2" in versions_on(tmp_path / box_id), result.output
        assert "goes to" not in result.output, result.output


def test_a_box_outside_every_share_gets_the_newest_version_that_includes_it(tmp_path: Path, mirror: Mirror) -> None:
    """A new box, v1 at 1.0 and v2 at 0.0 (held): it gets v1 and exits 0 saying v2 is not for it."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published, "--rollout", "0")
    serve_dir(mirror, published)
    result = get(mirror, tmp_path / "box", "box-00")
    assert result.exit_code == 0 and versions_on(tmp_path / "box") == ["1"], result.output
    assert "version 2 goes to 0% of boxes, not this one (box-00)" in result.output


def test_a_new_box_outside_the_only_versions_share_waits_and_exits_0(tmp_path: Path, mirror: Mirror) -> None:
    """Only a staged version, not for this box: nothing lands, exit 0, and it says so (the timer's
    unit stays green on the 95 % of boxes a 5 % rollout leaves out)."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published, "--rollout", "0")
    serve_dir(mirror, published)
    result = get(mirror, tmp_path / "box", "box-00")
    assert result.exit_code == 0, result.output
    assert "no version on the mirror is for this box yet" in result.output
    assert not (tmp_path / "box" / "models").exists() or versions_on(tmp_path / "box") == []


def test_rollout_and_withdraw_refuse_what_is_not_published(tmp_path: Path) -> None:
    published = tmp_path / "published"
    one_line_error(invoke("models", "rollout", str(published), "voice", "1", "0.5"), 3, "has no ttsd-index.json")
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    one_line_error(invoke("models", "rollout", str(published), "voice", "7", "0.5"), 3, "no version 7 of voice")
    one_line_error(invoke("models", "withdraw", str(published), "nobody", "1"), 3, "no voice 'nobody'")
    assert invoke("models", "rollout", str(published), "voice", "1", "1.5").exit_code == 2  # click: out of range
    assert invoke("models", "withdraw", str(published), "voice", "1").exit_code == 0
    one_line_error(invoke("models", "rollout", str(published), "voice", "1", "0.5"), 3, "withdrawn")
    # a withdrawn version is never published again: boxes rolled it back
    one_line_error(invoke("models", "publish", str(tmp_path / "build" / "voice-1"), str(published)), 3, "withdrawn")


def test_the_index_keeps_a_version_for_older_releases(tmp_path: Path) -> None:
    """Beside "versions", the one version older ttsd releases read: the newest out to every box."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published, "--rollout", "0.05")
    entry = json.loads((published / INDEX_FILE).read_text())["voices"]["voice"]
    assert entry["version"] == "1" and entry["path"] == "ttsd/voice/1" and "share" not in entry
    assert entry["versions"]["2"]["share"] == 0.05 and "share" not in entry["versions"]["1"]
    assert invoke("models", "rollout", str(published), "voice", "2", "1").exit_code == 0
    assert json.loads((published / INDEX_FILE).read_text())["voices"]["voice"]["version"] == "2"


# -- withdrawals ------------------------------------------------------------------------------------------
def test_a_withdrawn_version_leaves_a_box_without_a_daemon(tmp_path: Path, mirror: Mirror) -> None:
    """A box with v1 and v2; v2 withdrawn: get removes its folder, keeps v1, exits 0. A withdrawal
    of a version the box never had changes nothing."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published)
    serve_dir(mirror, published)
    box = tmp_path / "box"
    assert get(mirror, box, "box-00").exit_code == 0 and versions_on(box) == ["2"]  # the newest for it
    publish(folder_of_two(tmp_path / "build" / "voice-3", version="3"), published, "--rollout", "0")
    assert invoke("models", "withdraw", str(published), "voice", "3").exit_code == 0  # never on this box
    serve_dir(mirror, published)
    result = get(mirror, box, "box-00")
    assert result.exit_code == 0 and versions_on(box) == ["2"], result.output
    # withdraw v2, the only version the box has: it goes back to v1, fetched for it
    assert invoke("models", "withdraw", str(published), "voice", "2", "--reason", "clipped").exit_code == 0
    serve_dir(mirror, published)
    result = get(mirror, box, "box-00")
    assert result.exit_code == 0 and versions_on(box) == ["1"], result.output
    assert "removed voice-2" in result.output
    assert not [p for p in (box / "models").iterdir() if p.name.startswith(".")]  # nothing left aside


def test_a_withdrawal_is_applied_when_the_newer_version_cannot_be_fetched(tmp_path: Path, mirror: Mirror) -> None:
    """The box has v1 and v2. The fleet withdraws v2 and publishes v3, one file of which the mirror
    fails to serve: the run fails on v3 as before, and v2 leaves the box anyway (it stayed while v3
    could not be fetched: one broken file on the mirror kept a withdrawn version serving)."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    serve_dir(mirror, published)
    box = tmp_path / "box"
    assert get(mirror, box, "box-00").exit_code == 0
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published)
    serve_dir(mirror, published)
    assert get(mirror, box, "box-00").exit_code == 0 and versions_on(box) == ["1", "2"]
    publish(folder_of_two(tmp_path / "build" / "voice-3", version="3"), published)
    assert invoke("models", "withdraw", str(published), "voice", "2", "--reason", "clipped").exit_code == 0
    serve_dir(mirror, published)
    broken = next(path for path in mirror.files if path.startswith("ttsd/voice/3/") and path.endswith(".json")
                  and not path.endswith("ttsd.json"))
    del mirror.files[broken]
    result = get(mirror, box, "box-00")
    assert result.exit_code not in (0, 1), result.output
    assert versions_on(box) == ["1"], result.output
    assert "removed voice-2" in result.output


def test_the_only_version_a_box_has_is_kept_when_withdrawn(tmp_path: Path, mirror: Mirror) -> None:
    """Withdrawn with nothing to go back to: the box keeps it and says why (exit 13), every run."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    serve_dir(mirror, published)
    box = tmp_path / "box"
    assert get(mirror, box, "box-00").exit_code == 0
    assert invoke("models", "withdraw", str(published), "voice", "1").exit_code == 0
    serve_dir(mirror, published)
    for _ in range(2):
        one_line_error(get(mirror, box, "box-00"), 13, "withdrawn by the fleet mirror", "no other version", "keeps it")
        assert versions_on(box) == ["1"]


@pytest.mark.daemon
def test_a_daemon_serving_a_withdrawn_version_rolls_back_for_good(tmp_path: Path, mirror: Mirror,
                                                                 cache_dir: Path) -> None:
    """A box's daemon serves v2 (v1 beside it). v2 is withdrawn. One get --upgrade, as the timer runs
    it with the daemon's socket: the daemon serves v1, v2 is rolled back with the mirror's reason in
    its history, v2's folder has left the models dir; after a restart v1 still serves and v2 stays
    rolled back."""
    published = tmp_path / "published"
    build = tmp_path / "build"
    for version in ("1", "2"):
        folder = save_tiny_vits(build / f"voice-{version}", version=version, seed=int(version), edit=plausible,
                                noise_scale_duration=0.0, pack_it=False)
        pack(folder, name="voice", version=version, engine="vits", sample_rate=16000)
        publish(folder, published)
    serve_dir(mirror, published)
    box = tmp_path / "box"
    models = box / "models"
    models.mkdir(parents=True)
    for version in ("1", "2"):  # the box got v1, then v2 (as its timer would have)
        os.rename(build / f"voice-{version}", models / f"voice-{version}")
    daemon = start_daemon(box, cache_dir, "--no-seed", "--settle", "0.2", "--rescan-interval", "0.5", models=models)

    def voice() -> dict[str, Any]:
        return next(v for v in daemon.request("GET", "/v1/status").json()["voices"] if v["name"] == "voice")

    def state(version: str) -> str:
        return next(v["state"] for v in voice()["versions"] if v["version"] == version)

    try:
        wait_for(lambda: voice()["active"] == "2", timeout=60, what="v2 serving")
        assert invoke("models", "withdraw", str(published), "voice", "2", "--reason", "clipped").exit_code == 0
        serve_dir(mirror, published)
        proc = subprocess.run(
            [sys.executable, "-m", "ttsd", "models", "get", "voice", "--upgrade", "--mirror", mirror.url,
             "--models", str(models), "--cache", str(box / "cache"), "--box-id", "box-00",
             "--socket", str(daemon.socket)],
            capture_output=True, text=True, timeout=120, env=daemon.env)
        assert proc.returncode == 0, proc.stderr
        assert "voice: 2 withdrawn on the daemon (serving 1)" in proc.stdout + proc.stderr
        assert voice()["active"] == "1" and state("2") == "rolled-back"
        assert not (models / "voice-2").exists()
        assert daemon.metric("ttsd_model_transitions_total", voice="voice", event="withdrawn") == 1
        history = daemon.request("GET", "/v1/status").json()["history"]
        assert any(h["from"] == "2" and h["to"] == "1" and h["why"] == "withdrawn by the fleet mirror: clipped"
                   for h in history)
        daemon.stop()
        daemon.start()
        wait_for(lambda: voice()["active"] == "1", timeout=60, what="v1 serving after the restart")
        assert state("2") == "rolled-back"
    finally:
        daemon.stop()


# -- cheap polling ------------------------------------------------------------------------------------------
class _Logged(SimpleHTTPRequestHandler):
    log: list[tuple[str, int]] = []

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        self.log.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, *_: Any) -> None:
        pass


@contextmanager
def static_server(root: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Python's http.server over ``root`` (Last-Modified only, as plain static servers answer):
    its URL and its log of (path, status)."""
    handler = type("Handler", (_Logged,), {"log": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **kw: handler(*a, directory=str(root), **kw))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.log
    finally:
        server.shutdown()
        server.server_close()


def poll(url: str, box: Path) -> Any:
    """The box's timer run."""
    return invoke("models", "get", "voice", "--upgrade", "--mirror", url, "--models", str(box / "models"),
                  "--cache", str(box / "cache"), "--box-id", "box-00", "--socket", str(box / "none.sock"))


def files_and_times(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_an_unchanged_mirror_costs_one_request_answered_304_and_no_writes(tmp_path: Path) -> None:
    """A plain static server (Python's http.server: Last-Modified only). The first get fetches; the
    next ones ask for the index only, get 304, and leave every file and folder of the box as it
    was (names, sizes, mtimes)."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    # published a while ago: a Last-Modified in the very second of the answer cannot tell two
    # versions apart, so it is never kept (the next test)
    old = os.stat(published / INDEX_FILE).st_mtime - 60
    os.utime(published / INDEX_FILE, (old, old))
    box = tmp_path / "box"
    with static_server(published) as (url, log):
        assert poll(url, box).exit_code == 0 and versions_on(box) == ["1"]
        before = files_and_times(box)
        log.clear()
        for _ in range(3):
            result = poll(url, box)
            assert result.exit_code == 0, result.output
        assert log == [(f"/{INDEX_FILE}", 304)] * 3
        assert files_and_times(box) == before


def test_an_index_changed_twice_in_one_second_is_not_missed(tmp_path: Path) -> None:
    """A rollout, a poll and a withdrawal in the same second (a script): the index's date is the
    same both times, so a kept Last-Modified would answer every later poll 304 and the box would
    never see the withdrawal. Such a date is not kept: the poll after the change sees it."""
    published = tmp_path / "published"
    publish(folder_of_two(tmp_path / "build" / "voice-1"), published)
    publish(folder_of_two(tmp_path / "build" / "voice-2", version="2"), published)
    box = tmp_path / "box"
    with static_server(published) as (url, _):
        # the answer's Last-Modified not a second before its Date, as a write in the second of the
        # answer gives (a date in the future makes it so however slow this box is)
        stamp = int(time.time()) + 30
        os.utime(published / INDEX_FILE, (stamp, stamp))
        assert poll(url, box).exit_code == 0 and versions_on(box) == ["2"]
        assert invoke("models", "withdraw", str(published), "voice", "2").exit_code == 0
        os.utime(published / INDEX_FILE, (stamp, stamp))  # the same second, as a quick script gives
        result = poll(url, box)
        assert result.exit_code == 0 and versions_on(box) == ["1"], result.output


# -- a signed index -----------------------------------------------------------------------------------------
def test_with_trusted_keys_shares_and_withdrawals_count_only_from_a_signed_index(tmp_path: Path,
                                                                                  mirror: Mirror) -> None:
    """A mirror's writer without the fleet key cannot send boxes back: 1. an unsigned index that
    withdraws the box's version is refused (18) and nothing changes; 2. the fleet signs its
    withdrawal (--sign-key) and the box follows it; 3. the signed index edited afterwards (a share,
    the signature kept), 4. signed by another key, 5. its signature stripped: each refused, nothing
    changes; 6. a signed index is never rewritten unsigned."""
    pytest.importorskip("model_signing", reason="the signing extra (model-signing) is not installed")
    from test_signing import make_key

    from ttsd.signing import sign

    key, pub = make_key(tmp_path / "secret", "fleet")
    other, _ = make_key(tmp_path / "secret", "other")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "fleet.pem").write_bytes(pub.read_bytes())
    published = tmp_path / "published"
    for version in ("1", "2"):
        folder = folder_of_two(tmp_path / "build" / f"voice-{version}", version=version)
        sign(folder, key)
        publish(folder, published, "--sign-key", str(key))
    serve_dir(mirror, published)
    box = tmp_path / "box"
    trust = ("--trusted-keys", str(trusted))
    assert get(mirror, box, "box-00", *trust).exit_code == 0 and versions_on(box) == ["2"]

    unsigned = {k: v for k, v in json.loads((published / INDEX_FILE).read_text()).items() if k != "signature"}
    (published / INDEX_FILE).write_text(json.dumps(unsigned))
    assert invoke("models", "withdraw", str(published), "voice", "2").exit_code == 0  # 1. no key
    serve_dir(mirror, published)
    one_line_error(get(mirror, box, "box-00", *trust), 18, "not signed", "nothing changed")
    assert versions_on(box) == ["2"]

    (published / INDEX_FILE).write_text(json.dumps(unsigned))  # 2. the fleet withdraws, signed
    result = invoke("models", "withdraw", str(published), "voice", "2", "--sign-key", str(key))
    assert result.exit_code == 0, result.output
    signed = json.loads((published / INDEX_FILE).read_text())
    assert set(signed["signature"]) == {"key", "value"}
    serve_dir(mirror, published)
    result = get(mirror, box, "box-00", *trust)
    assert result.exit_code == 0 and versions_on(box) == ["1"], result.output

    def served(index: dict[str, Any]) -> Any:
        (published / INDEX_FILE).write_text(json.dumps(index))
        serve_dir(mirror, published)
        return get(mirror, box, "box-00", *trust)

    edited = json.loads(json.dumps(signed))  # 3.
    edited["voices"]["voice"]["versions"]["1"]["share"] = 0.0
    one_line_error(served(edited), 18, "does not match its content")
    (published / INDEX_FILE).write_text(json.dumps(unsigned))  # 4.
    assert invoke("models", "withdraw", str(published), "voice", "2", "--sign-key", str(other)).exit_code == 0
    one_line_error(served(json.loads((published / INDEX_FILE).read_text())), 18, "a key this box does not trust")
    stripped = {k: v for k, v in signed.items() if k != "signature"}  # 5.
    one_line_error(served(stripped), 18, "not signed")
    # 5b. stripped, and the withdrawn version put back as an ordinary one: an index with no shares
    # or withdrawals, which such a box took (its folders are signed), and went back to 2
    one_line_error(served(unsigned), 18, "is not signed", "nothing changed")
    fresh = tmp_path / "fresh-box"
    one_line_error(get(mirror, fresh, "box-01", *trust), 18, "is not signed")
    assert versions_on(box) == ["1"]
    assert not (fresh / "models").exists() or versions_on(fresh) == []

    (published / INDEX_FILE).write_text(json.dumps(signed))  # 6.
    one_line_error(invoke("models", "rollout", str(published), "voice", "1", "0.5"), 3, "is signed: give --sign-key")
    assert json.loads((published / INDEX_FILE).read_text()) == signed
