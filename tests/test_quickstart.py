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


@pytest.mark.daemon
def test_examples_curl_runs_as_written(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """examples/curl.md's blocks after the first (which starts the daemon: the test's, with a spool
    as there), each line in bash with ``S`` set as the first block sets it; a player (no sound card
    here) becomes a file. Every file a line writes is audio a reader opens, headers printed with
    ``-D -`` name the voice (``curl -i -o`` wrote the headers into the WAV), and the error block
    answers as shown."""
    from daemon_util import start_daemon

    text = (ROOT / "examples" / "curl.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)
    first, rest = blocks[0].splitlines(), blocks[1:]
    assert first[0].startswith("ttsd serve --socket /tmp/ttsd.sock --spool") and first[1].startswith("S="), first
    daemon = start_daemon(tmp_path / "d", cache_dir, "--spool", str(tmp_path / "spool"))
    # (no TTSD_SOCKET: curl.md sets none, and its `ttsd status` found the daemon only through it)
    env = {k: v for k, v in os.environ.items() if k != "TTSD_SOCKET"}
    env.update(S=f"--unix-socket {daemon.socket}", TTSD_CACHE=str(cache_dir),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    said: list[str] = []
    for block in rest:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\|\s*(aplay|mpg123)\b.*$", f"> played-{len(said)}.out", line)
            line = line.replace("/tmp/ttsd.sock", str(daemon.socket))  # the daemon the first block starts
            said.append(_sh(line, env, work).stdout)
    import soundfile

    written = re.findall(r"-o (\S+)", "\n".join(rest))
    assert {"hello.wav", "fast.flac", "which.wav", "a.wav", "b.wav", "speech.mp3"} <= set(written), written
    for name in written:
        info = soundfile.info(str(work / name))  # raises on headers in the file
        assert info.samplerate == 22050 and info.duration > 0.3, name
    headers = [out for out in said if out.startswith("HTTP/1.1 200")]
    assert len(headers) == 3 and all("X-Ttsd-Voice: " in h and "X-Ttsd-Version: " in h for h in headers), said
    assert any(out.startswith("HTTP/1.1 400") and '"text is empty"' in out for out in said), said
    played = sorted(work.glob("played-*.out"))  # what aplay and mpg123 would have played
    assert len(played) == 3 and all(p.stat().st_size > 1000 for p in played), played


@pytest.mark.daemon
def test_the_example_clients_run_as_written(tmp_path: Path, cache_dir: Path, joe_folder: Path) -> None:
    """examples/client.py, examples/spool.sh and examples/synthesize.py as their usage lines say,
    against a daemon with a spool (client.py without one: one line, no traceback)."""
    from daemon_util import start_daemon

    examples = ROOT / "examples"
    env = dict(os.environ, TTSD_CACHE=str(cache_dir), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    missing = subprocess.run([sys.executable, str(examples / "client.py"), "Hi.", str(tmp_path / "x.wav"),
                              "--socket", str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert missing.stderr.startswith("no ttsd answers on") and len(missing.stderr.splitlines()) == 1

    spool = tmp_path / "spool"
    daemon = start_daemon(tmp_path / "d", cache_dir, "--spool", str(spool))
    said = subprocess.run([sys.executable, str(examples / "client.py"), "Text to speak.", str(tmp_path / "out.wav")],
                          capture_output=True, text=True, timeout=120, env=dict(env, TTSD_SOCKET=str(daemon.socket)))
    assert said.returncode == 0 and "voice en_US-joe-medium 1" in said.stdout, said.stderr
    assert (tmp_path / "out.wav").read_bytes()[:4] == b"RIFF"

    nowhere = subprocess.run(["sh", str(examples / "spool.sh"), "Hi."], capture_output=True, text=True, timeout=60,
                             env=dict(env, TTSD_SPOOL=str(tmp_path / "no-spool")))
    assert nowhere.returncode == 2 and nowhere.stderr.startswith("no spool at"), nowhere.stderr
    spooled = subprocess.run(["sh", str(examples / "spool.sh"), "Text to speak."], capture_output=True, text=True,
                             timeout=120, env=dict(env, TTSD_SPOOL=str(spool)))
    assert spooled.returncode == 0, spooled.stderr
    audio = spooled.stdout.strip().splitlines()[-1].removeprefix("audio: ")
    assert json.loads(spooled.stdout[: spooled.stdout.rindex("}") + 1])["voice"] == "en_US-joe-medium"
    assert Path(audio).read_bytes()[:4] == b"RIFF"

    out = tmp_path / "sentences"
    made = subprocess.run([sys.executable, str(examples / "synthesize.py"), "First sentence. Second sentence.",
                           str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sentence-00.wav", "sentence-01.wav"], made.stdout


def test_the_token_recipe_makes_a_token_the_daemon_takes(tmp_path: Path) -> None:
    """operating.md's line that makes a token file, run as written: the file is the owner's
    alone and holds a token --token-file accepts."""
    import stat

    from ttsd.cli.serve_args import read_token

    text = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if "openssl rand" in line).split("  #")[0].strip()
    _sh(line, dict(os.environ), tmp_path)
    made = tmp_path / "ttsd.token"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert len(read_token(made)) >= 16
