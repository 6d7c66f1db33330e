"""A full disk, for real: the state dir, the store and the spool on a small tmpfs that is filled up.
A full disk is the box's fault: nothing is refused for good, nothing is half-changed, nothing is
lost, and everything goes on once space is free. CI runs as root and can mount a tmpfs; where
mounting is not allowed these tests are skipped with the reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import fake_model, plausible, save_tiny_vits

from ttsd.config import ServeConfig
from ttsd.daemon import Daemon
from ttsd.front.http_api import build_app
from ttsd.front.spool import Spool
from ttsd.serving.manager import ModelManager
from ttsd.serving.source import LocalFolderSource
from ttsd.serving.versions import Policy


class Tmpfs:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / f".filler-{uuid.uuid4().hex}"

    def fill(self) -> None:
        """Take every free byte."""
        with open(self.filler, "ab", buffering=0) as out:
            for size in (64 << 10, 512, 1):
                try:
                    while out.write(b"\0" * size):
                        pass
                except OSError:
                    pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield Tmpfs(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def manager_on(tmp_path: Path, state: Path, **options: Any) -> ModelManager:
    return ModelManager(LocalFolderSource(tmp_path / "models", settle=0.0), state_dir=state, policy=Policy(settle=0.0),
                        **options)


@pytest.mark.daemon
def test_rollback_with_the_state_dir_full_is_a_507_and_changes_nothing(tmp_path: Path, tmpfs: Tmpfs,
                                                                      fake_engines: None) -> None:
    """1. v1 then v2 serve, the state dir on a small disk. 2. The disk fills up. 3. A rollback over
    HTTP is a JSON 507 and nothing changed: v2 serves, state.json still says v2 (it used to be a
    plain-text 500 with the rollback applied in memory only, undone by the next restart).
    4. Space is freed: the rollback works and is on disk."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    config = ServeConfig(models=models, state=tmpfs.path / "state", cache=tmp_path / "cache",
                         socket=tmp_path / "s.sock", seed_builtin=False, settle=0.0, token="t" * 20)
    daemon = Daemon(config)
    daemon.manager.start()
    fake_model(models, "voice", "2")
    daemon.manager.reconcile()
    state_file = tmpfs.path / "state" / "state.json"
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(build_app(daemon.backend()), loop=loop), loop=loop)
    loop.run_until_complete(client.start_server())

    def rollback() -> tuple[int, dict[str, object]]:
        async def go() -> tuple[int, dict[str, object]]:
            async with client.post("/v1/voices/voice/rollback", json={},
                                   headers={"Authorization": "Bearer " + "t" * 20}) as resp:
                return resp.status, await resp.json()
        return loop.run_until_complete(go())

    try:
        tmpfs.fill()
        # read once the disk is full: until then the swap's own follow-up (v1 to standby) may still
        # be writing state.json, which made a read taken before the fill flaky on a busy box
        before = state_file.read_text()
        status, body = rollback()
        assert status == 507 and body["error"]["code"] == "insufficient_storage", body  # type: ignore[index]
        assert daemon.manager.snapshot()[0]["active"] == "2" and state_file.read_text() == before
        tmpfs.free()
        status, body = rollback()
        assert status == 200 and body["to"] == "1"
        assert json.loads(state_file.read_text())["voices"]["voice"]["active"] == "1"
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        daemon.manager.close()


@pytest.mark.daemon
def test_a_store_copy_that_hits_a_full_disk_is_retried_not_refused(tmp_path: Path, tmpfs: Tmpfs,
                                                                  fake_engines: None) -> None:
    """1. v1 serves, the store on a small disk that then fills up. 2. v2 arrives: copying it into
    the store fails with ENOSPC; v2 waits ('deferred'), no partial copy is left, v1 serves.
    3. Space is freed and SIGHUP's retry runs: v2 serves (it used to stay refused for good)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = manager_on(tmp_path, tmpfs.path / "state")
    manager.start()
    v2 = fake_model(models, "voice", "2", padding="x" * (1 << 20))
    tmpfs.fill()
    manager.reconcile()
    voice = manager.snapshot()[0]
    assert voice["active"] == "1"
    v2_state = next(v for v in voice["versions"] if v["version"] == "2")
    assert v2_state["state"] == "deferred" and "No space left" in v2_state["reason"], v2_state
    assert not list((tmpfs.path / "state" / "store").glob(".*partial"))
    manager.reconcile()  # within the back-off: not retried, still deferred
    assert manager.snapshot()[0]["active"] == "1"
    tmpfs.free()
    manager.retry_now()
    manager.reconcile()
    assert manager.snapshot()[0]["active"] == "2"
    assert v2.is_dir()
    manager.close()


@pytest.mark.daemon
def test_a_full_spool_keeps_the_request_and_serves_it_when_space_returns(tmp_path: Path, tmpfs: Tmpfs) -> None:
    """1. The spool's disk is full when a request's audio is written. 2. The request stays claimed
    in work/ (not failed/) and the spool pauses; it is not spoken again while the disk has no
    room for its audio. 3. Space is freed: the request is served, and its outputs are complete."""
    models = tmp_path / "models"
    save_tiny_vits(models / "tiny-1", edit=plausible, noise_scale_duration=0.0)
    config = ServeConfig(models=models, state=tmp_path / "state", cache=tmp_path / "cache",
                         socket=tmp_path / "s.sock", seed_builtin=False, settle=0.0)
    daemon = Daemon(config)
    daemon.manager.start()
    loop = asyncio.new_event_loop()
    spool = Spool(tmpfs.path / "spool", daemon.backend(), concurrency=1)
    spool.prepare()
    request = spool.dirs["incoming"] / "r1.txt"
    request.write_text("hello world, this request meets a full disk")

    async def scan_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            spool.scan_now()
            await spool.drain()
            await asyncio.sleep(0.1)

    try:
        tmpfs.fill()
        loop.run_until_complete(scan_for(1.0))
        assert not request.exists() and (spool.dirs["work"] / "r1.txt").exists(), "kept in work/"
        assert not list(spool.dirs["failed"].iterdir()) and not list(spool.dirs["out"].iterdir())
        assert spool._retry["r1.txt"].needs > 0  # it knows how much room its audio needs
        retried = b'ttsd_spool_requests_total{outcome="retry"} 1.0'
        assert retried in daemon.metrics.render()
        loop.run_until_complete(scan_for(2.5))  # past the first back-off (2 s), still no room: not spoken again
        assert retried in daemon.metrics.render()
        assert (spool.dirs["work"] / "r1.txt").exists()
        tmpfs.free()
        loop.run_until_complete(scan_for(1.0))
        meta = json.loads((spool.dirs["out"] / "r1.json").read_text())
        assert meta["duration"] > 0 and (spool.dirs["out"] / "r1.wav").stat().st_size > 44
        assert (spool.dirs["done"] / "r1.txt").exists()
    finally:
        loop.close()
        daemon.pool.shutdown()
        daemon.manager.close()


@pytest.mark.daemon
def test_a_full_state_dir_never_stops_a_reconcile(tmp_path: Path, tmpfs: Tmpfs, fake_engines: None) -> None:
    """Automatic saves and the audit trail are retried when space returns; they never raise."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = manager_on(tmp_path, tmpfs.path / "state")
    manager.start()
    tmpfs.fill()
    fake_model(models, "other", "1")
    manager.reconcile()  # a new voice: its activation cannot be recorded, so it waits
    assert [v["name"] for v in manager.snapshot() if v["active"]] == ["voice"]
    tmpfs.free()
    manager.retry_now()
    manager.reconcile()
    assert sorted(v["name"] for v in manager.snapshot() if v["active"]) == ["other", "voice"]
    tmpfs.free()
    manager.close()


def test_a_withdrawal_the_full_state_dir_cannot_record_changes_nothing(tmp_path: Path, tmpfs: Tmpfs,
                                                                        fake_engines: None) -> None:
    """1. v2 serves, v1 is its rollback target, the state dir on a small disk that fills up. 2. The
    fleet mirror withdraws v1: ResourceError (the HTTP route's 507), and nothing changed, so the
    fleet client keeps the folder and tries again (it was reported done with the mark in memory
    only: after a restart v1 was the rollback target again). 3. Space is freed: the withdrawal
    works, and holds across a restart."""
    from ttsd.errors import ResourceError

    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    state = tmpfs.path / "state"
    # the swap's follow-up (state and copy rewritten, the store pruned) done before the disk fills:
    # on its own thread, a file it replaced after the fill freed room, and the withdrawal fit
    manager = manager_on(tmp_path, state, spawn=lambda fn: fn())
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    tmpfs.fill()
    before = (state / "state.json").read_text()
    with pytest.raises(ResourceError):
        manager.withdraw("voice", "1", "withdrawn by the fleet mirror: clipped")
    assert (state / "state.json").read_text() == before and manager.snapshot()[0]["rollback_to"] == "1"
    tmpfs.free()
    manager.withdraw("voice", "1", "withdrawn by the fleet mirror: clipped")
    manager.close()
    restarted = manager_on(tmp_path, state)
    restarted.start()
    voice = restarted.snapshot()[0]
    assert voice["active"] == "2" and voice["rollback_to"] is None
    restarted.close()


def test_say_output_on_a_full_disk_is_exit_12_and_leaves_nothing(tmpfs: Tmpfs) -> None:
    """``ttsd say -o`` on a full disk: exit 12 ("the box ran out of something", docs/cli.md), not
    3 as for a bad path, and no temporary file left behind."""
    from ttsd.cli.common import write_output
    from ttsd.errors import ResourceError

    tmpfs.fill()
    with pytest.raises(ResourceError, match="No space left") as raised:
        write_output(str(tmpfs.path / "x.wav"), b"RIFF" * 100_000)
    assert raised.value.exit_code == 12
    assert sorted(p.name for p in tmpfs.path.iterdir()) == [tmpfs.filler.name]


@pytest.mark.slow
def test_cli_commands_that_write_a_full_disk_or_a_path_they_cannot_use_say_so_in_one_line(
    tmp_path: Path, tmpfs: Tmpfs
) -> None:
    """``models publish`` to a full disk and ``models builtin`` converting into a full cache: exit
    12, one line (an OSError, and safetensors' own error for the weights, were internal errors,
    exit 1). ``models publish`` into /proc: exit 3, one line. Nothing half-written is left."""
    from click.testing import CliRunner

    from ttsd.cli import main

    folder = fake_model(tmp_path / "models", "voice", "1", blob_mb=2)
    tmpfs.fill()
    runner = CliRunner()
    for args, code in ((["models", "publish", str(folder), str(tmpfs.path / "mirror")], 12),
                       (["models", "publish", str(folder), "/proc/ttsd-mirror"], 3),
                       # 8 MB free: room for config.json, not for the weights (safetensors' own error)
                       (["models", "builtin", "--cache", str(tmpfs.path / "cache")], 12)):
        if args[1] == "builtin":
            tmpfs.free()
        result = runner.invoke(main, args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
        assert "internal error" not in result.output
    assert "No space left on device" in result.output, result.output
    left = [p for p in tmpfs.path.rglob("*") if p.is_file()]
    assert [p.name for p in left if p.stat().st_size] == [], left  # (the mirror's empty lock file stays)


def test_a_fleet_get_checks_the_cache_s_disk_before_downloading(tmp_path: Path, tmpfs: Tmpfs) -> None:
    """The cache on its own small disk, the models dir elsewhere: only the models dir was checked,
    so the download filled the cache and stopped halfway, leaving it full. Now it is exit 12 at
    once, naming the cache's disk, and nothing is downloaded."""
    import os

    from catalog_server import serve, serve_dir
    from test_catalog import invoke, one_line_error

    from ttsd.manifest import pack

    folder = tmp_path / "build" / "voice-1"
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(os.urandom(12 << 20))  # more than the 8 MB disk
    pack(folder, name="voice", version="1", engine="vits", sample_rate=8000)
    assert invoke("models", "publish", str(folder), str(tmp_path / "published")).exit_code == 0
    with serve() as mirror:
        serve_dir(mirror, tmp_path / "published")
        result = invoke("models", "get", "voice", "--mirror", mirror.url, "--models", str(tmp_path / "models"),
                        "--cache", str(tmpfs.path), "--timeout", "10", "--socket", str(tmp_path / "none.sock"))
    one_line_error(result, 12, str(tmpfs.path), "MiB free")
    assert sum(p.stat().st_size for p in tmpfs.path.rglob("*") if p.is_file()) < 1 << 20
