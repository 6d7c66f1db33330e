"""Hot upgrades on a running daemon: a slow copy under load, a corpus of bad folders, rollback
through the CLI and across restarts, auto-rollback. kill -9 in the middle of a load:
tests/test_hotswap_kill.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile
from conftest import plausible, save_tiny_vits
from daemon_util import Daemon, fake_daemon_model, fake_site, start_daemon, wait_for

from ttsd.manifest import pack, verify


def voices(d: Daemon) -> dict[str, dict[str, object]]:
    return {v["name"]: v for v in d.request("GET", "/v1/voices").json()["voices"]}


def version_states(d: Daemon, voice: str) -> dict[str, dict[str, object]]:
    return {v["version"]: v for v in voices(d)[voice]["versions"]}


def staged_copy(source: Path, staging: Path, version: str) -> Path:
    """``source`` repacked as ``version`` in a staging dir outside the models dir."""
    shutil.copytree(source, staging)
    manifest = verify(staging)
    pack(staging, name=manifest.name, version=version, engine=manifest.engine, sample_rate=manifest.sample_rate)
    return staging


def slow_copy(src: Path, dst: Path, chunk: int = 4 << 20, pause: float = 0.1) -> None:
    """Copy a folder the way a slow `cp -r` does: manifest first, then each file in pieces."""
    dst.mkdir()
    files = ["ttsd.json"] + sorted(p.name for p in src.iterdir() if p.name != "ttsd.json")
    for name in files:
        with open(src / name, "rb") as reader, open(dst / name, "wb") as writer:
            while block := reader.read(chunk):
                writer.write(block)
                writer.flush()
                time.sleep(pause)


@pytest.mark.daemon
def test_slow_copy_under_load_switches_versions_with_zero_failures(tmp_path: Path, cache_dir: Path,
                                                                    joe_folder: Path) -> None:
    """1. v1 serves four clients in a loop. 2. v2 is copied in file by file, manifest first.
    3. v2 becomes active. 4. Every response is 200 and valid audio, no request failed, and no
    request sent after v2's first answer got v1."""
    d = start_daemon(tmp_path, cache_dir, "--workers", "2", "--threads", "1", "--queue-size", "8")
    staging = staged_copy(joe_folder, tmp_path / "staging", "2")
    results: list[tuple[float, float, int, str, bool]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            reply = d.post("/v1/synthesize", {"text": f"Client {n} asks for a short sentence.",
                                              "stream": n == 0})
            body = reply.body[44:] if n == 0 else reply.body
            ok = False
            if reply.status == 200:
                if n == 0:
                    ok = reply.body[:4] == b"RIFF" and len(body) > 22050
                else:
                    ok = soundfile.info(io.BytesIO(reply.body)).duration > 0.5
            results.append((started, time.monotonic(), reply.status, reply.headers.get("x-ttsd-version", "?"), ok))
            time.sleep(0.05)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in clients:
        t.start()
    try:
        wait_for(lambda: len(results) >= 4, timeout=120, what="v1 serving the clients")
        slow_copy(staging, tmp_path / "models" / "en_US-joe-medium-2")
        wait_for(lambda: voices(d)["en_US-joe-medium"]["active"] == "2", timeout=240, interval=0.5,
                 what="v2 active")
        seen_v2 = len([r for r in results if r[3] == "2"])
        wait_for(lambda: len([r for r in results if r[3] == "2"]) >= seen_v2 + 4, timeout=60, what="v2 responses")
    finally:
        stop.set()
        for t in clients:
            t.join(120)
    assert d.stop() == 0, d.logs()
    assert results and all(r[2] == 200 and r[4] for r in results), [r for r in results if r[2] != 200 or not r[4]]
    v1 = [r for r in results if r[3] == "1"]
    v2 = [r for r in results if r[3] == "2"]
    assert v1 and v2 and len(v1) + len(v2) == len(results)
    # Causal, so no allowance for scheduling: once any request has been answered by v2 the swap
    # is done, and every request sent after that must get v2 (a client's own next one included).
    answered_by_v2 = min(r[1] for r in v2)
    late = [r for r in v1 if r[0] > answered_by_v2]
    assert not late, f"{len(late)} request(s) sent after v2 had answered got v1"


def bad(models: Path, staging: Path, base: Path, version: str, change: str) -> Path:
    folder = staging / f"tiny-{version}-{change}"
    if change == "same-version-other-content":
        save_tiny_vits(folder, seed=9, version=version, edit=plausible, noise_scale_duration=0.0)
    else:
        shutil.copytree(base, folder)
        manifest = verify(folder)
        pack(folder, name="tiny", version=version, engine="vits", sample_rate=manifest.sample_rate)
    return folder


@pytest.mark.daemon
def test_bad_folders_are_refused_while_the_active_version_serves(tmp_path: Path, cache_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    models, staging = tmp_path / "models", tmp_path / "staging"
    save_tiny_vits(models / "tiny-5", version="5", edit=plausible, noise_scale_duration=0.0)
    base = models / "tiny-5"
    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--settle", "0.3", "--incomplete-timeout", "3")
    cases: dict[str, tuple[str, str]] = {}  # folder name -> (version, expected reason)

    def case(version: str, change: str, reason: str) -> Path:
        folder = bad(models, staging, base, version, change)
        cases[folder.name] = (version, reason)
        return folder

    f = case("6", "wrong-checksum", "changed: vocab.json (sha256 differs")
    data = bytearray((f / "vocab.json").read_bytes())
    data[2] = ord("X") if data[2] != ord("X") else ord("Y")
    (f / "vocab.json").write_bytes(bytes(data))
    f = case("7", "missing-file", "still incomplete after 3 s unchanged")
    (f / "tokenizer_config.json").unlink()
    f = case("8", "extra-file", "extra: notes.txt")
    (f / "notes.txt").write_text("hello")
    f = case("9", "symlink", "unsafe: config.json (symlink)")
    (f / "config.json").unlink()
    (f / "config.json").symlink_to("/etc/hostname")
    f = case("10", "pickle", "pickle weights: pytorch_model.bin")
    (f / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    f = case("11", "truncated", "weights do not load")
    (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:2000])
    pack(f, name="tiny", version="11", engine="vits", sample_rate=16000)
    f = case("12", "config-mismatch", "does not match")
    config = json.loads((f / "config.json").read_text())
    config["hidden_size"] = 32
    (f / "config.json").write_text(json.dumps(config))
    pack(f, name="tiny", version="12", engine="vits", sample_rate=16000)
    for version, change, key, value, reason in (("13", "nan", "decoder.conv_pre.weight", float("nan"), "NaN"),
                                                ("14", "silent", "decoder.conv_post.weight", 0.0, "silence")):
        f = case(version, change, reason)
        weights = load_file(str(f / "model.safetensors"))
        weights[key] = torch.full_like(weights[key], value)
        save_file(weights, str(f / "model.safetensors"), metadata={"format": "pt"})
        pack(f, name="tiny", version=version, engine="vits", sample_rate=16000)
    f = case("15", "unknown-engine", "engine 'tensorrt' is not installed")
    pack(f, name="tiny", version="15", engine="tensorrt", sample_rate=16000)
    f = case("16", "manifest-not-json", "not valid JSON")
    (f / "ttsd.json").write_text("{broken")
    case("4", "older", "not newer than the active 5")
    case("5", "same-version-other-content", "already known with different content")

    for folder in sorted(staging.iterdir()):
        os.rename(folder, models / folder.name)

    def reasons() -> dict[str, str]:
        status = d.request("GET", "/v1/status").json()
        found = {f["folder"].rsplit("/", 1)[1]: f["reason"] for f in status["folders"] if f["state"] == "refused"}
        tiny = {v["version"]: v for v in status["voices"][0]["versions"]}
        for name, (version, _) in cases.items():
            if name not in found and version in tiny and tiny[version]["state"] == "refused" and version != "5":
                found[name] = tiny[version]["reason"]
        return found

    try:
        deadline = time.monotonic() + 120
        while len(reasons()) < len(cases) and time.monotonic() < deadline:
            time.sleep(0.5)
        got = reasons()
        status = d.request("GET", "/v1/status").json()
        assert not set(cases) - set(got), (set(cases) - set(got), status["voices"], status["folders"])
        for name, (_, expected) in cases.items():
            assert expected in got[name], (name, got[name])
        assert voices(d)["tiny"]["active"] == "5"
        reply = d.post("/v1/synthesize", {"text": "still serving"})
        assert reply.status == 200 and reply.headers["x-ttsd-version"] == "5"
        listing = subprocess.run([sys.executable, "-m", "ttsd", "models", "list", "--json"], capture_output=True,
                                 env=dict(d.env, TTSD_SOCKET=str(d.socket)), timeout=60)
        rows = json.loads(listing.stdout)
        assert {"voice": "tiny", "version": "5", "state": "active", "signer": "", "reason": "", "folder": ""} in rows
        assert any(r["state"] == "refused" and "NaN" in r["reason"] for r in rows)
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.daemon
def test_rollback_through_the_cli_survives_restart(tmp_path: Path, cache_dir: Path) -> None:
    """1. tiny 1 serves; 2 is dropped and promoted. 2. `ttsd rollback`: 1 serves at once, and
    nothing is loaded for it (1 stayed loaded as the standby; counted in /metrics, not timed).
    3. Restart: 1 still serves and 2 stays rolled back, through rescans that each take up v2's
    folder again (moved to a new name: by the 0.2 s rescan tick or inotify, then after SIGHUP).
    4. A newer 3 is promoted normally, and the history never shows 2 coming back."""
    models = tmp_path / "models"
    save_tiny_vits(models / "tiny-1", version="1", edit=plausible, noise_scale_duration=0.0)
    args = ("--no-seed", "--settle", "0.2")
    d = start_daemon(tmp_path, cache_dir, *args)
    env = dict(d.env, TTSD_SOCKET=str(d.socket))
    save_tiny_vits(tmp_path / "stage2", version="2", seed=2, edit=plausible, noise_scale_duration=0.0)
    os.rename(tmp_path / "stage2", models / "tiny-2")
    wait_for(lambda: voices(d)["tiny"]["active"] == "2", timeout=60, what="v2 active")

    def loads() -> float:  # versions of tiny this daemon started loading
        return d.metric("ttsd_model_transitions_total", voice="tiny", event="loading")

    assert loads() == 2  # 1, then 2
    proc = subprocess.run([sys.executable, "-m", "ttsd", "rollback"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0 and "tiny: 2 -> 1" in proc.stderr.decode(), proc.stderr.decode()
    assert loads() == 2, "the rollback loaded a version: 1 should have stayed loaded as the standby"
    assert d.logs().count("tiny 1 loaded and warmed") == 1, d.logs()
    assert d.post("/v1/synthesize", {"text": "back"}).headers["x-ttsd-version"] == "1"
    proc = subprocess.run([sys.executable, "-m", "ttsd", "rollback"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 13 and "no previous version" in proc.stderr.decode()
    assert d.stop() == 0

    d = start_daemon(tmp_path, cache_dir, *args, "--rescan-interval", "0.2")
    try:
        states = version_states(d, "tiny")
        assert states["1"]["state"] == "active" and states["2"]["state"] == "rolled-back"
        assert states["2"]["source"] == str(models / "tiny-2")
        assert loads() == 1  # only 1
        history = d.request("GET", "/v1/status").json()["history"]

        def v2_found_in(folder: Path) -> bool:
            return version_states(d, "tiny")["2"]["source"] == str(folder)

        # v2's folder moves: a rescan must take it up as a folder it has not seen, judge it again,
        # and say so in v2's "source". Rescans run one at a time, so the second move is taken up
        # only after the rescan that took up the first has finished (promotions included).
        os.rename(models / "tiny-2", models / "tiny-2-moved")
        wait_for(lambda: v2_found_in(models / "tiny-2-moved"), timeout=60, what="a rescan to find v2 moved")
        mark = d.log_mark()
        os.rename(models / "tiny-2-moved", models / "tiny-2-again")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("SIGHUP: rescanning", since=mark)
        wait_for(lambda: v2_found_in(models / "tiny-2-again"), timeout=60, what="a rescan to find v2 moved again")
        states = version_states(d, "tiny")
        assert voices(d)["tiny"]["active"] == "1" and states["2"]["state"] == "rolled-back", states
        assert loads() == 1, "v2 started loading again by itself"
        assert d.request("GET", "/v1/status").json()["history"] == history
        assert d.post("/v1/synthesize", {"text": "still one"}).headers["x-ttsd-version"] == "1"
        save_tiny_vits(tmp_path / "stage3", version="3", seed=3, edit=plausible, noise_scale_duration=0.0)
        os.rename(tmp_path / "stage3", models / "tiny-3")
        wait_for(lambda: voices(d)["tiny"]["active"] == "3", timeout=60, what="v3 active")
    finally:
        assert d.stop() == 0, d.logs()
    # read after a clean stop: a swap is visible in /v1/voices a moment before it is in the history
    history_file = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
    history = [(h["from"], h["to"]) for h in history_file]
    rollback = history.index(("2", "1"))
    assert not [h for h in history[rollback:] if h[1] == "2"], history
    assert history[-1] == ("1", "3") and "load_seconds" in history_file[-1], history_file


@pytest.mark.daemon
def test_auto_rollback_on_a_version_that_starts_failing(tmp_path: Path, cache_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    models = tmp_path / "models"
    fake_daemon_model(models / "fake-1", "1")
    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--settle", "0.2", "--auto-rollback-requests", "8")
    try:
        fake_daemon_model(tmp_path / "stage", "2", fail_from=3)  # passes warm-up, then every request fails
        os.rename(tmp_path / "stage", models / "fake-2")
        wait_for(lambda: voices(d)["fake"]["active"] == "2", timeout=60, what="v2 active")
        statuses = [d.post("/v1/synthesize", {"text": "hello"}).status for _ in range(3)]
        assert statuses == [500, 500, 500]
        wait_for(lambda: voices(d)["fake"]["active"] == "1", timeout=30, what="auto-rollback")
        reply = d.post("/v1/synthesize", {"text": "hello"})
        assert reply.status == 200 and reply.headers["x-ttsd-version"] == "1"
        assert "auto-rollback" in version_states(d, "fake")["2"]["reason"]
    finally:
        assert d.stop() == 0, d.logs()
