"""Recipes run the way a user runs them, end to end: the fleet of examples/fleet/ from an empty box
(the build machine's ``publish.sh`` as written, a static HTTP server as the mirror, the box's
daemon started first and ``ttsd models get`` as ``ttsd-get@.service`` runs it).

Unit and drop-in combinations: tests/test_example_units.py. The README's quick start:
tests/test_quickstart.py."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from daemon_util import Daemon, start_daemon, wait_for
from test_example_units import merged

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOICE = "en_US-joe-medium"
TTSD = str(Path(sys.executable).parent / "ttsd")

pytest.importorskip("model_signing", reason="the signing extra (model-signing) is not installed")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A static web server (Python's own, as a mirror on a LAN might be) over a fresh dir."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/voices/"
    finally:
        server.shutdown()
        server.server_close()


def openssl_keys(where: Path) -> tuple[Path, Path]:
    """The fleet's key pair, made by the two openssl commands of examples/fleet/README.md."""
    where.mkdir(parents=True)
    key, pem = where / "fleet.key", where / "fleet.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pem)], check=True, capture_output=True)
    return key, pem


def box_get(models: Path, cache: Path, mirror: str, trusted: Path) -> subprocess.CompletedProcess[str]:
    """``ttsd models get`` exactly as examples/fleet/ttsd-get@.service runs it, with the unit's
    environment and this box's paths in place of /models and /var/cache/ttsd."""
    unit = merged(EXAMPLES / "fleet" / "ttsd-get@.service")
    command = [w.replace("%i", VOICE) for w in unit.command()]
    command[0] = TTSD
    command = [str(models) if w == "/models" else str(cache) if w == "/var/cache/ttsd" else w for w in command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSD_")}
    env.update(unit.environment(), TTSD_MIRROR=mirror, TTSD_TRUSTED_KEYS=str(trusted))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def publish_sh(onnx: Path, version: str, key: Path, trusted: Path, work: Path, remote: Path) -> None:
    """examples/fleet/publish.sh as written; rclone syncs to a local dir (the web server's)."""
    env = dict(os.environ, FLEET_KEY=str(key), MIRROR_DIR=str(work / "mirror"), TRUSTED_KEYS=str(trusted),
               RCLONE_REMOTE=str(remote), PATH=f"{Path(TTSD).parent}{os.pathsep}{os.environ['PATH']}",
               RCLONE_CONFIG=str(work / "rclone.conf"))
    done = subprocess.run(["sh", str(EXAMPLES / "fleet" / "publish.sh"), str(onnx), VOICE, version], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "mirror" / ".ttsd-index.lock").exists() and not (remote / ".ttsd-index.lock").exists()


def active(daemon: Daemon) -> tuple[str | None, str]:
    """The voice's active version and who signed it, from the daemon's status."""
    for voice in daemon.request("GET", "/v1/status").json()["voices"]:
        if voice["name"] == VOICE:
            version = voice.get("active")
            signer = next((v.get("signer") or "" for v in voice["versions"] if v["version"] == version), "")
            return version, signer
    return None, ""


@pytest.mark.daemon
@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (make setup installs it as root)")
def test_the_fleet_from_an_empty_box(tmp_path: Path, web: tuple[Path, str], cache_dir: Path) -> None:
    """1. Build machine: openssl keys, then publish.sh (import-piper, sign, verify, publish, rclone
    sync). 2. A new box: its daemon starts first, with the trusted key and an empty models dir:
    it does not seed the unsigned built-in voice, and says why. 3. The box's timer runs get: exit
    0, the signed voice lands and serves, signed by the fleet's key. 4. An older box whose models
    dir holds the unsigned built-in voice as version 1 (seeded before it trusted keys): get does
    not call that "already there", moves it aside and lands the signed version 1, which serves.
    5. Version 2 is published, then tampered with on the mirror (a byte of the weights changed,
    the manifest and index rewritten to match): get exits 18, nothing lands, v1 keeps serving."""
    from ttsd.voices import builtin_voice_files

    root, mirror = web
    key, pem = openssl_keys(tmp_path / "secure")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(pem, trusted / "fleet.pem")
    onnx = builtin_voice_files()
    publish_sh(onnx, "1", key, trusted, tmp_path / "build", root / "voices")
    assert json.loads((root / "voices" / "ttsd-index.json").read_text())["voices"][VOICE]["version"] == "1"

    new_box, old_box = tmp_path / "new-box", tmp_path / "old-box"
    (old_box / "models").mkdir(parents=True)
    from ttsd.voices import builtin_model

    shutil.copytree(builtin_model(cache_dir), old_box / "models" / f"{VOICE}-1")  # what the seed used to put there
    boxes = {}
    for box in (new_box, old_box):
        boxes[box] = start_daemon(box, cache_dir, "--trusted-keys", str(trusted), "--settle", "0.2",
                                  "--rescan-interval", "0.5", models=box / "models", wait_ready=False)
    for daemon in boxes.values():
        wait_for(lambda d=daemon: _answers(d), timeout=120, what="the daemon up")
        assert daemon.get("/readyz").status == 503  # nothing it may serve yet
    assert "not seeding the built-in voice" in boxes[new_box].logs()
    assert not any((new_box / "models").iterdir())
    wait_for(lambda: "not signed" in boxes[old_box].logs(), timeout=60, what="the unsigned v1 refused")

    for box, daemon in boxes.items():
        got = box_get(box / "models", box / "cache", mirror, trusted)
        assert got.returncode == 0, got.stdout + got.stderr
        wait_for(lambda d=daemon: active(d)[0] == "1", timeout=120, what=f"{box.name} serving the signed v1")
        assert active(daemon)[1].startswith("fleet"), active(daemon)
        assert daemon.get("/readyz").status == 200
        said = daemon.post("/v1/synthesize", {"text": "The fleet's voice.", "voice": VOICE})
        assert said.status == 200 and len(said.body) > 10_000
    old_output = got.stdout + got.stderr
    assert "would not serve" in old_output and "moved" in old_output, old_output
    assert [p.name for p in (old_box / "models").iterdir() if p.name.startswith(f".{VOICE}-1.refused")]

    # version 2 as the README makes a new version (a copy, packed as 2), signed and published the
    # way publish.sh does; publish.sh itself ran above (its conversion is the slow part)
    v2 = tmp_path / "build" / f"{VOICE}-2"
    shutil.copytree(tmp_path / "build" / "mirror" / "ttsd" / VOICE / "1", v2)
    (v2 / "model.sig").unlink()
    env = dict(os.environ, PATH=f"{Path(TTSD).parent}{os.pathsep}{os.environ['PATH']}",
               RCLONE_CONFIG=str(tmp_path / "build" / "rclone.conf"))
    for line in (f"ttsd models pack {v2} --version 2", f"ttsd models sign {v2} --key {key}",
                 f"ttsd models publish {v2} {tmp_path / 'build' / 'mirror'} --sign-key {key}",
                 f"rclone sync {tmp_path / 'build' / 'mirror'} {root / 'voices'}"):
        done = subprocess.run(shlex.split(line), env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, line + "\n" + done.stdout + done.stderr
    _tamper(root / "voices", "2")
    daemon = boxes[new_box]
    got = box_get(new_box / "models", new_box / "cache", mirror, trusted)
    assert got.returncode == 18 and "signature" in got.stderr, got.stdout + got.stderr
    assert sorted(p.name for p in (new_box / "models").iterdir() if not p.name.startswith(".")) == [f"{VOICE}-1"]
    assert active(daemon)[0] == "1"
    for d in boxes.values():
        assert d.stop() == 0


def _answers(daemon: Daemon) -> bool:
    try:
        return daemon.get("/healthz").status == 200
    except OSError:  # not listening yet
        return False


def _tamper(mirror: Path, version: str) -> None:
    """A byte of the published weights changed, the manifest and the index rewritten to match."""
    from ttsd.manifest import pack, read_manifest

    folder = mirror / "ttsd" / VOICE / version
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)
    manifest = read_manifest(folder)
    pack(folder, name=VOICE, version=version, engine=manifest.engine, sample_rate=manifest.sample_rate)
    index = json.loads((mirror / "ttsd-index.json").read_text())
    raw = (folder / "ttsd.json").read_bytes()
    pinned = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    index["voices"][VOICE]["versions"][version]["manifest"].update(pinned)  # what boxes follow
    if index["voices"][VOICE].get("version") == version:  # what older ttsd releases read
        index["voices"][VOICE]["manifest"].update(pinned)
    (mirror / "ttsd-index.json").write_text(json.dumps(index))


def test_the_recipe_commands_are_those_of_the_examples() -> None:
    """The test above runs the examples' own commands: publish.sh's lines and the get unit's
    ExecStart are read from the files, so a change to them is a change to what is tested."""
    script = (EXAMPLES / "fleet" / "publish.sh").read_text()
    commands = [shlex.split(line)[:3] for line in script.splitlines() if line.startswith("ttsd ")]
    assert commands == [["ttsd", "models", "import-piper"], ["ttsd", "models", "sign"],
                        ["ttsd", "models", "verify"], ["ttsd", "models", "publish"]]
    assert merged(EXAMPLES / "fleet" / "ttsd-get@.service").command()[1:4] == ["models", "get", "%i"]


@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (make setup installs it as root)")
def test_the_staged_rollout_block_of_the_fleet_docs(tmp_path: Path) -> None:
    """docs/signing-and-fleets.md's staged rollout, its sh block run line by line as written: the
    build machine's paths become this test's (/srv/mirror, remote:voices a local dir, the key
    made here), the folder ./joe-3 is made first. The index then holds version 3 withdrawn with the
    reason given, signed by the fleet key; the copy synced after publish gives it to 5 %."""
    from test_docs import split
    from test_signing import folder_of_two, make_key

    from ttsd.manifest import pack

    pytest.importorskip("model_signing", reason="the signing extra (model-signing) is not installed")
    text = (EXAMPLES.parent / "docs" / "signing-and-fleets.md").read_text(encoding="utf-8")
    section = text.split("### Staged rollout", 1)[1]
    block = next(b for b in split(section)[0] if b.lang == "sh")
    key, _ = make_key(tmp_path, "fleet")
    folder = folder_of_two(tmp_path / "joe-3", version="3")
    pack(folder, name="joe", version="3", engine="vits", sample_rate=8000)
    mirror, remote = tmp_path / "srv-mirror", tmp_path / "remote-voices"
    lines = [line.split("  #", 1)[0].strip() for line in block.text.splitlines() if line.strip()]
    assert [line.split()[:3] for line in lines if line.startswith("ttsd")] == [
        ["ttsd", "models", "publish"], ["ttsd", "models", "rollout"], ["ttsd", "models", "rollout"],
        ["ttsd", "models", "withdraw"]]
    script = "\n".join(["set -e", *lines]).replace("/srv/mirror", str(mirror)).replace("remote:voices", str(remote))
    env = dict(os.environ, PATH=f"{Path(TTSD).parent}{os.pathsep}{os.environ['PATH']}",
               RCLONE_CONFIG=str(tmp_path / "rclone.conf"))
    env.pop("TTSD_SIGN_KEY", None)
    done = subprocess.run(["sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    index = json.loads((mirror / "ttsd-index.json").read_text())
    assert index["voices"]["joe"]["versions"]["3"] == {"withdrawn": "clipped consonants"}
    assert set(index["signature"]) == {"key", "value"} and key.name == "fleet.key"
    synced = json.loads((remote / "ttsd-index.json").read_text())  # the block syncs once, after publish
    assert synced["voices"]["joe"]["versions"]["3"]["share"] == 0.05 and "signature" in synced


@pytest.mark.daemon
def test_the_readme_fleet_quick_start_runs_as_written(tmp_path: Path, web: tuple[Path, str], cache_dir: Path,
                                                      joe_folder: Path) -> None:
    """The README's fleet block, line by line in bash: keys made, the built-in voice copied,
    packed and signed as joe 2, published, the key installed where the box looks, got from the
    mirror and served. Only the box's paths differ: /models is a models dir holding the seeded
    voice, /srv/mirror the web server's dir, /etc/ttsd/trusted a temp dir, the mirror URL the
    web server's."""
    text = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start: a fleet", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.split("```sh\n", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    root, url = web
    seeded, trusted, box = tmp_path / "models", tmp_path / "etc-trusted", tmp_path / "box"
    seeded.mkdir()
    shutil.copytree(joe_folder, seeded / f"{VOICE}-1", copy_function=os.link)
    work = tmp_path / "build"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSD_")}
    env.update(PATH=f"{Path(TTSD).parent}{os.pathsep}{os.environ['PATH']}", TTSD_CACHE=str(cache_dir),
               TTSD_MODELS=str(box / "models"), TTSD_SOCKET=str(tmp_path / "none.sock"))
    serve = None
    for line in lines:
        line = (line.split("  #", 1)[0].strip().replace("/models/", f"{seeded}/").replace("/srv/mirror", str(root / "voices"))
                .replace("/etc/ttsd/trusted", str(trusted)).replace("http://mirror.lan/voices/", url))
        if line.startswith("ttsd serve"):
            serve = shlex.split(line)[2:]
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"{line}\n{done.stdout}{done.stderr}"
    assert serve is not None and (box / "models" / "joe-2" / "model.sig").is_file()
    daemon = start_daemon(box, cache_dir, *serve, models=box / "models")
    try:
        voices = daemon.request("GET", "/v1/voices").json()["voices"]
        assert [(v["name"], v["active"]) for v in voices] == [("joe", "2")], voices
    finally:
        daemon.stop()
