"""The README's quick start for an edge box, run as a user runs it: its ``sh`` blocks, line by line,
in bash, with the ``ttsd`` on PATH.

What differs from a user's box, and only that: the default paths come from ``TTSD_*`` variables
that point into the test's directory (``ttsd`` reads them as the README says), the socket path in
the curl lines is the test's, ``/models/`` is the test's models dir, ``| aplay`` (no sound card
here) becomes a file, and the README's own upgrade folder is made from the seeded voice. The block
that downloads (``import-piper`` of a file one has to fetch, ``models get`` from the public
catalog) is parsed by tests/test_docs.py and run against a local mirror by tests/test_models_get.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_util import kill_leftovers, wait_for

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Quick start: an edge box"


def _blocks() -> list[list[str]]:
    """The sh blocks of the README's edge-box quick start, each a list of command lines."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def _sh(line: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{line}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _versions(env: dict[str, str], cwd: Path) -> dict[str, str]:
    rows = json.loads(_sh("ttsd models list --json", env, cwd).stdout)
    return {row["version"]: row["state"] for row in rows if row["version"] != "-"}


@pytest.mark.daemon
def test_the_edge_box_quick_start_runs_as_written(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    blocks = _blocks()
    assert len(blocks) == 5, blocks  # serve/say/status, curl, a new version, upgrade/rollback, make a folder
    start, speak, new_version, upgrade, _downloads = blocks
    models, socket = tmp_path / "models", tmp_path / "run" / "ttsd.sock"
    env = dict(os.environ, TTSD_MODELS=str(models), TTSD_STATE=str(tmp_path / "state"), TTSD_CACHE=str(cache_dir),
               TTSD_SOCKET=str(socket), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    work = tmp_path / "work"
    work.mkdir()

    serve = start[0].split("#")[0].strip()
    assert serve == "ttsd serve", start
    log = (tmp_path / "serve.log").open("w")
    daemon = subprocess.Popen(["bash", "-c", f"exec {serve}"], env=env, cwd=work, stdout=log, stderr=log)
    try:
        wait_for(lambda: subprocess.run(["bash", "-c", "ttsd status"], env=env, capture_output=True).returncode == 0,
                 timeout=120, what="ttsd serve to answer")
        for line in start[1:]:
            _sh(line, env, work)
        assert (work / "fox.wav").read_bytes()[:4] == b"RIFF"

        for line in speak:
            line = line.replace("/run/ttsd/ttsd.sock", str(socket)).replace("| aplay", "> streamed.wav")
            _sh(line, env, work)
        assert (work / "hello.wav").read_bytes()[:4] == b"RIFF"
        assert (work / "streamed.wav").read_bytes()[:4] == b"RIFF"

        # the folder the README drops in: made from the seeded version 1 as the README says
        for line in new_version:
            _sh(line.replace("/models/", f"{models}/"), env, work)
        made = json.loads((work / "en_US-joe-medium-2" / "ttsd.json").read_text())
        seeded = json.loads((models / "en_US-joe-medium-1" / "ttsd.json").read_text())
        assert made["version"] == "2" and made["files"] == seeded["files"]
        assert {k: v for k, v in made.items() if k not in ("version", "files")} == \
            {k: v for k, v in seeded.items() if k not in ("version", "files")}  # name, licence, settings kept
        drop, listing, rollback, activate = upgrade
        _sh(drop.replace("/models/", f"{models}/"), env, work)
        _sh(listing.split("#")[0], env, work)
        wait_for(lambda: _versions(env, work).get("2") == "active", timeout=120, what="version 2 active")
        _sh(rollback, env, work)
        assert _versions(env, work)["1"] == "active"
        _sh(activate, env, work)
        assert _versions(env, work)["2"] == "active"
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        kill_leftovers()
    assert daemon.returncode == 0, (tmp_path / "serve.log").read_text()
