"""Test-only helpers over ``ttsd.testing`` (the one daemon harness, shared with bench/): daemons a
test starts are killed after it (conftest), and a fake engine a daemon subprocess can load."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ttsd.manifest import pack
from ttsd.testing import Daemon, Reply, UnixHTTPConnection, wait_for

__all__ = ["Daemon", "Reply", "UnixHTTPConnection", "fake_daemon_model", "fake_site", "kill_leftovers",
           "start_daemon", "wait_for"]

STARTED: list[Daemon] = []  # every daemon a test started; conftest kills leftovers after each test


def kill_leftovers() -> None:
    while STARTED:
        STARTED.pop().kill()


def start_daemon(root: Path, cache: Path, *args: str, models: Path | None = None,
                 wait_ready: bool = True, timeout: float = 120, per_test: bool = True) -> Daemon:
    """``ttsd serve`` on ``root`` (models, state, socket, log), the voice cache from ``TTSD_CACHE``
    (so ``ttsd`` commands run with ``daemon.env`` find it too), ready unless ``wait_ready=False``."""
    daemon = Daemon(root, args, models=models, env={"TTSD_CACHE": str(cache)})
    if per_test:  # a module-scoped fixture's daemon is stopped by the fixture instead
        STARTED.append(daemon)
    return daemon.start(wait=wait_ready, timeout=timeout)


TESTS = Path(__file__).parent


def fake_site(tmp_path: Path) -> str:
    """A PYTHONPATH under which a daemon subprocess finds the fake engine (``fake_engine.py``)."""
    site = tmp_path / "site"
    info = site / "ttsd_fake-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ttsd-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ttsd.engines]\nfake = fake_engine:FakeEngine\n")
    # keep what the run was given (e.g. the checkout under test) instead of relying on the cwd
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(site), str(TESTS), *inherited])


def fake_daemon_model(folder: Path, version: str, blob_mb: int = 0, **settings: object) -> Path:
    """Version ``version`` of voice ``fake`` in ``folder``, told ``settings`` (see ``fake_engine``)."""
    folder.mkdir(parents=True)
    (folder / "fake.json").write_text(json.dumps(settings))
    if blob_mb:  # something big enough that checking and storing it takes a moment
        with open(folder / "weights.bin.safetensors", "wb") as handle:
            handle.write(os.urandom(1 << 20) * blob_mb)
    pack(folder, name="fake", version=version, engine="fake", sample_rate=8000)
    return folder
