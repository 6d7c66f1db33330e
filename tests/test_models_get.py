"""``ttsd models get`` to the end, on the real voice served under a catalog name by a mirror the
test runs: the conversion, the manifest's licence and source, ``--upgrade``, Ctrl-C during the
conversion, and a running daemon serving the voice ``get`` published after a cut download was
resumed. Each conversion takes ~10 s, so the scenarios share them.

The failures that come before a conversion (md5, size, 404, a path escaping the mirror, no
network) are in ``test_catalog.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_server import Mirror, VoiceFiles, add_voice, serve
from click.testing import CliRunner, Result
from daemon_util import start_daemon, wait_for

from ttsd.cli import main
from ttsd.manifest import read_manifest, verify

KEY = "en_US-test-medium"


@pytest.fixture(scope="module")
def joe_files() -> VoiceFiles:
    return VoiceFiles.builtin()


@pytest.fixture
def mirror(joe_files: VoiceFiles) -> Iterator[tuple[Mirror, dict[str, Any]]]:
    with serve() as m:
        voices: dict[str, Any] = {}
        add_voice(m, voices, KEY, joe_files)
        m.publish(voices)
        yield m, voices


def get(mirror: Mirror, tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["models", "get", KEY, *args, "--mirror", mirror.url,
                                     "--models", str(tmp_path / "models"), "--cache", str(tmp_path / "cache")])


def onnx_path(voices: dict[str, Any]) -> str:
    return next(p for p in voices[KEY]["files"] if p.endswith(".onnx"))


@pytest.mark.slow
def test_get_then_upgrade(mirror: tuple[Mirror, dict[str, Any]], tmp_path: Path, joe_folder: Path,
                          joe_files: VoiceFiles) -> None:
    """1. A dot-folder a killed ``get`` left behind is in the models dir.
    2. ``get`` publishes KEY-1: verified, named for the catalog key, the MODEL_CARD's licence and
       the catalog entry in ttsd.json, the MODEL_CARD beside the weights, the same weights as the
       built-in conversion; the leftover dot-folder and the downloads are gone.
    3. ``get`` again: refused (17), the voice is there.
    4. ``get --upgrade`` with the same catalog: up to date, nothing downloaded.
    5. The catalog's .onnx.json changes: ``get --upgrade`` publishes KEY-2 beside KEY-1."""
    m, voices = mirror
    models = tmp_path / "models"
    (models / f".{KEY}-1.k9x2ab7q.partial").mkdir(parents=True)
    (models / f".{KEY}-1.k9x2ab7q.partial" / "model.safetensors").write_bytes(b"half")

    result = get(m, tmp_path)
    assert result.exit_code == 0, result.output
    folder = models / f"{KEY}-1"
    assert sorted(p.name for p in models.iterdir()) == [folder.name]
    manifest = verify(folder)
    assert (manifest.name, manifest.version, manifest.license) == (KEY, "1", "CC0")
    assert manifest.extra["source"] == {"catalog": "piper", "key": KEY,
                                        "files": {p: f["md5_digest"] for p, f in voices[KEY]["files"].items()}}
    assert (folder / "MODEL_CARD").read_bytes() == joe_files.card and "MODEL_CARD" in manifest.files
    assert manifest.files["model.safetensors"] == read_manifest(joe_folder).files["model.safetensors"]
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~umask())  # readable like a copied folder
    assert f"{folder}: voice {KEY} 1, licence: CC0" in result.stderr
    assert not (tmp_path / "cache" / "downloads" / KEY).exists()

    result = get(m, tmp_path)
    assert result.exit_code == 17 and "--upgrade" in result.stderr, result.output

    before = len(m.requests)
    result = get(m, tmp_path, "--upgrade")
    assert result.exit_code == 0 and "is up to date with the catalog" in result.stderr, result.output
    assert [path for path, _ in m.requests[before:]] == ["ttsd-index.json", "voices.json"]  # no fleet index here

    config = json.loads(joe_files.config)
    config["inference"]["noise_scale"] = 0.5
    changed = VoiceFiles(joe_files.onnx, json.dumps(config).encode(), joe_files.card)
    add_voice(m, voices, KEY, changed)
    m.publish(voices)
    result = get(m, tmp_path, "--upgrade")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in models.iterdir()) == [f"{KEY}-1", f"{KEY}-2"]
    assert verify(models / f"{KEY}-2").version == "2"
    assert json.loads((models / f"{KEY}-2" / "config.json").read_text())["noise_scale"] == 0.5


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_get(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ttsd", "models", "get", KEY], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.daemon
def test_ctrl_c_during_the_conversion_leaves_nothing_in_the_models_dir(
        mirror: tuple[Mirror, dict[str, Any]], tmp_path: Path) -> None:
    """1. ``get`` downloads and starts converting in its dot-folder. 2. Ctrl-C. 3. Exit 130, no
    dot-folder and no folder in the models dir; the checked downloads are kept for the next run."""
    m, _ = mirror
    models = tmp_path / "models"
    env = dict(os.environ, TTSD_MIRROR=m.url, TTSD_MODELS=str(models), TTSD_CACHE=str(tmp_path / "cache"))
    proc = run_get(env)
    try:
        wait_for(lambda: models.is_dir() and any(p.name.endswith(".partial") for p in models.iterdir()),
                 timeout=120, interval=0.02, what="the dot-folder")
        proc.send_signal(signal.SIGINT)  # the conversion has begun: from here on, nothing may stay
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # 130, as the CLI exits after Ctrl-C. Raised where it landed, the interrupt could land in a
    # Python callback of C++ code (onnx, torch) and abort the process (SIGABRT, no clean-up, 2 runs
    # in 8): the conversion now holds it until its next step
    assert proc.returncode == 130, err.decode()
    assert err.decode().rstrip().endswith("interrupted"), err.decode()
    assert list(models.iterdir()) == []
    assert (tmp_path / "cache" / "downloads" / KEY / f"{KEY}.onnx").is_file()


@pytest.mark.daemon
def test_a_running_daemon_serves_the_voice_get_published(
        mirror: tuple[Mirror, dict[str, Any]], tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """1. A daemon serves the built-in voice.
    2. The mirror cuts every connection for the .onnx after 4 MB: ``get`` tries 5 times, then
       stops with one line and exit 14; the models dir holds only the built-in voice.
    3. The mirror is fixed: ``get`` goes on from the 20 MB it kept, and publishes the voice.
    4. The daemon picks the folder up on its own and speaks with the new voice."""
    m, voices = mirror
    daemon = start_daemon(tmp_path / "serve", cache_dir)
    models = tmp_path / "serve" / "models"
    env = dict(os.environ, TTSD_MIRROR=m.url, TTSD_MODELS=str(models), TTSD_CACHE=str(tmp_path / "cache"))
    onnx = onnx_path(voices)
    m.cuts[onnx] = [4_000_000] * 5
    proc = run_get(env)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.decode().splitlines() if line.startswith("error:")]
    assert proc.returncode == 14 and len(lines) == 1, err.decode()
    assert "20000000 of 63201294 bytes kept" in lines[0] and "run the same command again" in lines[0]
    assert [p.name for p in models.iterdir()] == ["en_US-joe-medium-1"]
    assert m.fetched(onnx) == [None] + [f"bytes={n * 4_000_000}-" for n in range(1, 5)]

    proc = run_get(env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert m.fetched(onnx)[5:] == ["bytes=20000000-"]

    def serving() -> bool:
        return any(v["name"] == KEY and v["active"] == "1" for v in daemon.request("GET", "/v1/voices").json()["voices"])

    wait_for(serving, timeout=120, what=f"{KEY} active")
    reply = daemon.post("/v1/synthesize", {"text": "A voice from the catalog.", "voice": KEY})
    assert reply.status == 200 and reply.headers["x-ttsd-voice"] == KEY, reply.body[:300]
    assert daemon.stop() == 0, daemon.logs()
