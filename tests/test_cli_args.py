"""``ttsd``'s argument errors and exit codes, in-process with click's ``CliRunner``: one line on
stderr, no traceback, the documented code. Nothing here may start a daemon or speak: the
``tripwires`` fixture makes both fail loudly (what a real process shows is in ``test_cli.py``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import ttsd.daemon
import ttsd.speak
from ttsd.cli import main


@pytest.fixture(autouse=True)
def tripwires(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record (and refuse) any attempt to build a daemon or open a voice."""
    tripped: list[str] = []

    def trip(what: str) -> Any:
        def refuse(*_a: Any, **_k: Any) -> None:
            tripped.append(what)
            raise AssertionError(f"an argument error test reached {what}")
        return refuse

    monkeypatch.setattr(ttsd.daemon.Daemon, "__init__", trip("Daemon()"))
    monkeypatch.setattr(ttsd.speak, "open_engine", trip("open_engine()"))
    monkeypatch.setattr(ttsd.speak, "resolve_model", trip("resolve_model()"))
    yield tripped
    assert tripped == []


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """``serve`` configures logging (root handlers, levels) before it checks its flags; put the
    test process's logging back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("aiohttp.access", "watchdog", "transformers")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def serve_args(tmp_path: Path) -> list[str]:
    """``serve`` with every path inside the test's folder."""
    return ["serve", "--models", str(tmp_path / "models"), "--state", str(tmp_path / "state"),
            "--cache", str(tmp_path / "cache"), "--socket", str(tmp_path / "ttsd.sock")]


# -- click's own errors: exit 2 ------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "--bogus"),
    (["nonsense"], "No such command 'nonsense'"),
    (["say", "hi"], "Missing option '-o'"),
    (["say", "hi", "-o", "x.wav", "--bogus"], "--bogus"),
    (["say", "hi", "-o", "x.wav", "--speed", "9"], "'--speed'"),
    (["say", "hi", "-o", "x.wav", "--seed", "-1"], "'--seed'"),  # was exit 4, as a request's error
    (["serve", "--box-id", "bad/id"], "'--box-id'"),  # was exit 3: restarted ten times over
    (["models", "get", "joe", "--version", "1+hotfix"], "'--version'"),  # was exit 5, a manifest's
    (["serve", "--workers", "0"], "'--workers'"),
    (["serve", "--swap-policy", "fast"], "'--swap-policy'"),
    (["rollback", "--bogus"], "--bogus"),
    (["activate", "joe"], "Missing argument 'VERSION'"),
    (["models", "pack", "folder"], "Missing option '--version'"),
    # NaN and infinity passed click's ranges, then failed inside the command (exit 1) or were taken
    (["say", "hi", "-o", "x.wav", "--speed", "nan"], "'nan' is not a finite number"),
    (["say", "hi", "-o", "x.wav", "--noise-scale", "nan"], "'--noise-scale'"),
    (["status", "--watch", "--interval", "inf"], "'inf' is not a finite number"),
    (["models", "search", "--timeout", "nan"], "'--timeout'"),
    (["serve", "--grace", "nan"], "'--grace'"),
    (["serve", "--max-audio-seconds", "inf"], "'--max-audio-seconds'"),
    (["models", "rollout", "mirror", "joe", "2", "nan"], "'nan' is not a finite number"),
    # an empty --to was a plain rollback; an empty --voice a bare "Not Found"
    (["rollback", "--to", ""], "--to: an empty version"),
    (["rollback", "--voice", " "], "--voice: an empty voice name"),
])
def test_usage_errors_exit_2_with_clicks_message(args: list[str], fragment: str) -> None:
    """ttsd's own one line (not click's usage block), with click's words and where to look."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "--help')" in lines[0] and "Traceback" not in result.output


# -- ttsd's own checks: one line and the error's exit code ----------------------------------------------
@pytest.mark.parametrize("flags, fragment", [
    (["--listen", "nonsense"], "--listen 'nonsense': expected HOST:PORT"),
    (["--listen", "127.0.0.1:99999"], "--listen '127.0.0.1:99999': expected HOST:PORT"),
    (["--listen", "0.0.0.0:8080"], "--listen 0.0.0.0 is reachable from other machines: give --token-file too"),
    (["--listen", "[::]:8080"], "--listen :: is reachable from other machines"),
    (["--canary", "2"], "--canary '2': expected a share between 0 and 1"),
    (["--wyoming", "10200"], "--wyoming '10200': expected tcp://HOST:PORT or unix://PATH"),
    (["--wyoming", "tcp://localhost"], "expected tcp://HOST:PORT"),
    (["--wyoming", "tcp://localhost:99999"], "expected tcp://HOST:PORT"),
    (["--wyoming-zeroconf", "box"], "--wyoming-zeroconf announces a TCP service"),
    (["--wyoming", "unix:///tmp/w.sock", "--wyoming-zeroconf"], "--wyoming-zeroconf announces a TCP service"),
    (["--wyoming", "tcp://127.0.0.1:10200", "--wyoming-zeroconf", "a.b"], "--wyoming-zeroconf 'a.b'"),
    (["--canary", "joe=half"], "--canary 'joe=half'"),
    (["--memory-budget", "lots"], "--memory-budget 'lots': expected a size such as 1.5G"),
])
def test_bad_serve_flag_values_are_one_line_and_exit_2(serve_args: list[str], flags: list[str], fragment: str,
                                                      tmp_path: Path) -> None:
    """A value that can never be right is a bad command line, exit 2, which the example unit does
    not restart (it exited 3, restarted ten times over, failing the same way each time)."""
    result = invoke(*serve_args, *flags)
    one_line_error(result, 2, fragment, "serve --help')")
    assert not (tmp_path / "models").exists() and not (tmp_path / "state").exists()  # refused before any work


@pytest.mark.parametrize("flags, fragment", [
    (["--token-file", "/nonexistent/token"], "cannot read --token-file /nonexistent/token"),
    (["--token-file", "/dev/zero"], "--token-file /dev/zero: not a regular file or a pipe"),  # was MemoryError
])
def test_a_token_file_that_cannot_serve_is_one_line_and_exit_3(serve_args: list[str], flags: list[str],
                                                               fragment: str, tmp_path: Path) -> None:
    """A file, not the command line: it may be mended (or appear) before the next start."""
    result = invoke(*serve_args, *flags)
    one_line_error(result, 3, fragment)
    assert not (tmp_path / "models").exists() and not (tmp_path / "state").exists()


def test_say_refuses_an_unknown_suffix_and_model_with_daemon(tmp_path: Path) -> None:
    result = invoke("say", "hi", "-o", str(tmp_path / "x.m4a"))
    one_line_error(result, 3, "unknown audio format '.m4a': use one of .wav, .flac, .ogg, .mp3, .opus, .aac")
    result = invoke("say", "hi", "-o", str(tmp_path / "x.wav"), "--model", str(tmp_path), "--daemon")
    # a command line's mistake: exit 2, naming --help, as docs/cli.md's table has it
    one_line_error(result, 2, "--model loads a folder in-process; it cannot be combined with --daemon",
                   "say --help')")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["rollback"], ["rollback", "--voice", "joe"],
                                  ["activate", "joe", "2"], ["say", "hi", "-o", "x.wav", "--daemon"]])
def test_commands_that_need_the_daemon_exit_9_without_one(tmp_path: Path, args: list[str]) -> None:
    sock = tmp_path / "nobody-here.sock"
    result = invoke(*args, "--socket", str(sock))
    one_line_error(result, 9, f"no daemon answers on {sock}")


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


ALL_COMMANDS = [(), *_commands(main)]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "ttsd")
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {' '.join(command)}".rstrip() + " ")
    assert "-h, --help" in result.output


def test_the_help_test_sees_every_command() -> None:
    assert {" ".join(c) for c in ALL_COMMANDS if c} >= {
        "say", "serve", "status", "rollback", "activate", "models", "models pack", "models verify", "models list",
        "models import-piper", "models builtin"}


def test_pack_needs_a_name_only_for_a_folder_without_a_manifest(tmp_path: Path) -> None:
    """``pack COPY --version 2`` keeps the copy's name, licence and settings; a folder with no
    ``ttsd.json`` (or an unreadable one) needs ``--name``: one line, exit 3."""
    folder = tmp_path / "voice"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"\0" * 64)
    runner = CliRunner()
    first = runner.invoke(main, ["models", "pack", str(folder), "--version", "1", "--sample-rate", "8000"])
    assert first.exit_code == 3 and "has no ttsd.json: give --name" in first.output, first.output
    made = runner.invoke(main, ["models", "pack", str(folder), "--name", "v", "--version", "1", "--sample-rate",
                                "8000", "--license", "CC0", "--warmup", "Hello.", "--precision", "fp32"])
    assert made.exit_code == 0, made.output
    again = runner.invoke(main, ["models", "pack", str(folder), "--version", "2", "--description", "second"])
    assert again.exit_code == 0, again.output
    import json

    manifest = json.loads((folder / "ttsd.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["sample_rate"], manifest["license"]) == ("v", "2", 8000, "CC0")
    assert manifest["warmup"] == ["Hello."] and manifest["precision"] == "fp32" and manifest["description"] == "second"
    (folder / "ttsd.json").write_text("{broken")
    broken = runner.invoke(main, ["models", "pack", str(folder), "--version", "3"])
    assert broken.exit_code == 3 and "give --name" in broken.output, broken.output


def test_serve_help_shows_where_things_go_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """--help names the defaults a user would get for the state, socket and cache (resolved for
    whoever runs it), HOST:PORT for the listeners, and what --log-level does."""
    import importlib

    import ttsd.cli.serve as serve_module

    monkeypatch.setenv("TTSD_STATE", "/srv/state-here")
    monkeypatch.setenv("TTSD_SOCKET", "/srv/run/here.sock")
    monkeypatch.setenv("TTSD_CACHE", "/srv/cache-here")
    fresh = importlib.reload(serve_module)  # the help text is resolved when the module loads
    try:
        text = " ".join(CliRunner().invoke(fresh.serve, ["--help"]).output.split())
    finally:
        monkeypatch.undo()
        importlib.reload(serve_module)
    for shown in ("default here: /srv/state-here", "default here: /srv/run/here.sock",
                  "default here: /srv/cache-here", "--listen HOST:PORT", "--metrics-listen HOST:PORT",
                  "Least severe records logged"):
        assert shown in text, shown


def test_a_token_file_or_text_on_stdin_is_read_within_bounds(serve_args: list[str], tmp_path: Path) -> None:
    """A FIFO as --token-file with no writer is an error at once (the command waited forever); one
    with a writer (``--token-file <(pass show ttsd)``) gives its token. Text on stdin past what one
    request may carry is refused after that much is read (``yes | ttsd say -`` read until memory
    ran out)."""
    import io
    import os
    import threading

    from ttsd.cli.serve_args import read_token

    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    one_line_error(invoke(*serve_args, "--token-file", str(fifo)), 3, "the token must be at least 16")

    def writer() -> None:
        with open(fifo, "w") as out:
            out.write("a-token-of-24-characters\n")

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.1)  # the writer is waiting in open() for a reader
    assert read_token(fifo) == "a-token-of-24-characters"
    thread.join(5)

    class Endless(io.RawIOBase):
        read_so_far = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            buffer[:] = b"y" * len(buffer)
            Endless.read_so_far += len(buffer)
            return len(buffer)

    result = CliRunner().invoke(main, ["say", "-", "-o", str(tmp_path / "x.wav")], input=io.BufferedReader(Endless()))
    one_line_error(result, 4, "standard input is over 1048576 bytes")
    assert Endless.read_so_far < 4 << 20


@pytest.mark.parametrize("answer", [b"<html>not ttsd</html>", b'{"unexpected": true}'])
def test_a_foreign_answer_on_the_socket_is_one_line_and_writes_nothing(tmp_path: Path, answer: bytes) -> None:
    """Another program (or a ttsd of another version) answers on the socket: 200 to everything, its
    own body. ``status``, ``rollback`` and ``say`` say so (exit 9) instead of an internal error, and
    ``say`` writes no file (it wrote the page as audio, then failed on the missing length)."""
    import http.server
    import socketserver
    import threading

    class Foreign(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if answer.startswith(b"{") else "text/html")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = _answer

        def log_message(self, *_args: object) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def get_request(self):  # type: ignore[no-untyped-def]
            request, _ = super().get_request()
            return request, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port)

    sock = tmp_path / "foreign.sock"
    with Server(str(sock), Foreign) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            one_line_error(invoke("status", "--socket", str(sock)), 9, "is not ttsd's")
            one_line_error(invoke("status", "--json", "--socket", str(sock)), 9, "is not ttsd's")
            one_line_error(invoke("rollback", "--voice", "joe", "--socket", str(sock)), 9, "is not ttsd's")
            out = tmp_path / "x.wav"
            one_line_error(invoke("say", "hi", "-o", str(out), "--daemon", "--socket", str(sock)), 9, "is not ttsd's")
            assert not out.exists() and list(tmp_path.iterdir()) == [sock]
        finally:
            server.shutdown()


@pytest.mark.parametrize("output, code, fragment", [
    ("", 2, "'-o': needs a file name"),
    ("/nonexistent/dir/x.wav", 3, "no directory /nonexistent/dir"),
    ("/proc/ttsd-x.wav", 3, "cannot write /proc/ttsd-x.wav"),
])
def test_say_refuses_an_output_it_cannot_write_before_it_speaks(output: str, code: int, fragment: str) -> None:
    """Before any voice loads (the tripwires): a typo in -o cost a whole synthesis, then exit 3."""
    one_line_error(invoke("say", "hi", "-o", output, "--no-daemon"), code, fragment)


def test_models_list_without_a_daemon_names_a_missing_dir_and_fails_verification(tmp_path: Path,
                                                                                 fake_engines: None) -> None:
    """``models list --models DIR`` with no such dir printed an empty table and exit 0; with
    ``--verify`` a folder that does not match its manifest is listed with its reason and the command
    exits 6, so ``ttsd models list --verify && ...`` stops."""
    import json

    from conftest import fake_model

    none = ["--socket", str(tmp_path / "none.sock")]
    one_line_error(invoke("models", "list", "--models", str(tmp_path / "nowhere"), *none), 3, "no models dir")
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    fake_model(models, "voice", "2")
    good = invoke("models", "list", "--models", str(models), "--verify", "--json", *none)
    assert good.exit_code == 0 and {r["state"] for r in json.loads(good.stdout)} == {"verified"}, good.output
    (models / "voice-2" / "fake.json").write_text('{"changed": true}')
    bad = invoke("models", "list", "--models", str(models), "--verify", "--json", *none)
    assert bad.exit_code == 6, bad.output
    assert sorted(r["state"] for r in json.loads(bad.stdout)) == ["refused", "verified"]
    assert "1 of 2 folders cannot serve" in bad.stderr
    assert invoke("models", "list", "--models", str(models), *none).exit_code == 0  # no --verify: listed only
    # a folder that matches its manifest but names an engine that is not installed: refused, as
    # 'ttsd models verify' and the daemon refuse it; and each row names its folder
    (models / "voice-2" / "fake.json").write_text("{}")
    other = fake_model(models, "voice", "3")
    manifest = json.loads((other / "ttsd.json").read_text())
    (other / "ttsd.json").write_text(json.dumps({**manifest, "engine": "onnx"}))
    bad = invoke("models", "list", "--models", str(models), "--verify", "--json", *none)
    assert bad.exit_code == 6, bad.output
    rows = {r["folder"]: r for r in json.loads(bad.stdout)}
    assert rows["voice-3"]["state"] == "refused" and "engine 'onnx' is not installed" in rows["voice-3"]["reason"]
    assert rows["voice-2"]["state"] == "verified", rows
    one_line_error(invoke("models", "verify", str(other)), 5, f"{other}: engine 'onnx' is not installed")
    # a link is refused as the daemon refuses it, its target never read (no signer made up for it)
    (other / "ttsd.json").write_text(json.dumps(manifest))
    (models / "voice-4").symlink_to(other)
    listed = invoke("models", "list", "--models", str(models), "--json", *none)
    rows = {r["folder"]: r for r in json.loads(listed.stdout)}
    assert (rows["voice-4"]["state"], rows["voice-4"]["signer"], rows["voice-4"]["version"]) == ("refused", "", "-")
    assert "is a symlink" in rows["voice-4"]["reason"], rows


def test_models_list_verify_and_another_models_dir_read_the_disk_while_a_daemon_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a daemon answering, ``models list --verify`` printed the daemon's table and exited 0,
    checking nothing (damage done to the models dir after the drop-in was never seen), and
    ``--models DIR`` listed the daemon's dir instead of DIR. Now --verify reads every folder of the
    daemon's models dir on disk (exit 6 on a bad one), and another dir is read from disk."""
    import json

    from conftest import fake_model

    from ttsd import client

    served, other = tmp_path / "served", tmp_path / "other"
    fake_model(served, "voice", "1")
    fake_model(other, "elsewhere", "1")
    status = {"pid": 4242, "models": str(served), "folders": [],
              "voices": [{"name": "voice", "versions": [{"version": "1", "state": "active", "reason": None}]}]}
    monkeypatch.setattr(client.Client, "available", lambda self: True)
    monkeypatch.setattr(client.Client, "status", lambda self: status)
    monkeypatch.delenv("TTSD_MODELS", raising=False)

    listed = invoke("models", "list", "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["state"] == "active", listed.output
    (served / "voice-1" / "fake.json").write_text('{"damaged": 1}')
    bad = invoke("models", "list", "--verify", "--json")
    assert bad.exit_code == 6 and json.loads(bad.stdout)[0]["state"] == "refused", bad.output
    assert invoke("models", "list", "--verify", "--models", str(served)).exit_code == 6
    elsewhere = invoke("models", "list", "--models", str(other), "--json")
    assert elsewhere.exit_code == 0 and [r["voice"] for r in json.loads(elsewhere.stdout)] == ["elsewhere"]
    status["models"] = "models"  # a daemon that names it relative to where it started (older ttsd)
    one_line_error(invoke("models", "list", "--verify"), 3, "give --models DIR")


def test_a_mirror_url_with_a_newline_is_refused_as_such() -> None:
    """urlsplit drops tabs and newlines, so ``--mirror $'http://a\\nb'`` went to host "ab" (exit 14,
    "cannot reach"): it is a bad URL, exit 3."""
    one_line_error(invoke("models", "search", "--mirror", "http://a\nb/"), 3, "no spaces or control characters")


def test_pack_of_a_folder_that_does_not_exist_says_so() -> None:
    """Not "has no ttsd.json: give --name" (and not click's own check: the docs' recipes are parsed
    without their folders, tests/test_docs.py)."""
    one_line_error(invoke("models", "pack", "/nonexistent/folder", "--version", "1"), 3, "no such directory")


@pytest.mark.parametrize("raised, code, said", [
    (PermissionError(13, "Permission denied", "/srv/x", None, "/srv/y"), 3, "error: Permission denied: /srv/x -> /srv/y"),
    (OSError(28, "No space left on device", "/srv/x"), 12, "error: No space left on device: /srv/x"),
    (BrokenPipeError(32, "Broken pipe"), 12, "error: writing stdout failed: its reader went away"),
    (TimeoutError(), 1, "internal error: TimeoutError"),  # no errno: not the system's, a bug
])
def test_an_os_error_no_command_handled_is_one_line_with_the_systems_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: OSError, code: int, said: str) -> None:
    import ttsd.models_dir

    def fail(*_a: object) -> None:
        raise raised

    monkeypatch.setattr(ttsd.models_dir, "scan", fail)
    (tmp_path / "models").mkdir()
    result = invoke("models", "list", "--models", str(tmp_path / "models"), "--socket", str(tmp_path / "none.sock"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith(said), result.output


def test_o_names_an_open_descriptor_and_a_link_into_a_missing_dir(tmp_path: Path) -> None:
    """``-o /dev/fd/N`` (``/dev/stdout`` as a shell opened it, ``>> log``) is written into at its
    place: what was there stays, and what is written after follows (resolving the link replaced the
    file). A link into a dir that does not exist is refused before any synthesis."""
    import os

    from ttsd.cli.common import write_output
    from ttsd.cli.common import check_output
    from ttsd.errors import ConfigError

    log = tmp_path / "log.txt"
    log.write_bytes(b"before\n")
    with open(log, "ab") as appended:
        check_output(f"/dev/fd/{appended.fileno()}")
        write_output(f"/dev/fd/{appended.fileno()}", b"AUDIO")
        appended.write(b"\nafter\n")
    assert log.read_bytes() == b"before\nAUDIO\nafter\n"
    with pytest.raises(ConfigError, match="Bad file descriptor"):
        check_output("/dev/fd/987")
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "nodir" / "x.wav")
    with pytest.raises(ConfigError, match="no directory"):
        check_output(str(tmp_path / "dangling.wav"))
    readonly = tmp_path / "ro.wav"
    readonly.write_bytes(b"old")
    os.chmod(readonly, 0o444)
    check_output(str(readonly))  # replaced by rename, as the write does: the dir is what must be writable


def test_a_daemon_that_does_not_answer_is_not_called_absent(tmp_path: Path) -> None:
    """A socket something listens on without answering (a daemon stopped with SIGSTOP, or
    wedged): "start one with 'ttsd serve'" told the operator to start a second daemon."""
    import socket

    sock = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sock))
    silent.listen(8)
    try:
        one_line_error(invoke("status", "--socket", str(sock)), 9, f"the daemon on {sock} does not answer")
    finally:
        silent.close()


@pytest.mark.parametrize("args", [[], ["models"]])
def test_a_command_with_nothing_after_it_prints_its_help_not_a_squashed_line(args: list[str]) -> None:
    """``ttsd`` or ``ttsd models`` alone, the first thing a newcomer types, printed the whole help
    squashed into one ``error:`` line. It prints the help as ``--help`` lays it out (exit 2, as
    click has it: there was no command to run)."""
    result = invoke(*args)
    assert result.exit_code == 2
    assert not result.stderr.startswith("error:") and "Commands:" in result.stderr
    assert len(result.stderr.splitlines()) > 5, result.stderr


def test_models_list_shows_a_folders_terminal_escapes_escaped(tmp_path: Path, fake_engines: None) -> None:
    """A folder named with ESC[2J (clear screen), a colour, a line break or a bidi override was
    printed raw by ``models list``: the screen cleared, rows broke, a fake line could be shown.
    Each is escaped; the JSON form holds the name as it is."""
    import json

    from conftest import fake_model

    models = tmp_path / "models"
    nasty = "v-\x1b[2J\x1b[31mred\nfake line\u202eevil"
    folder = fake_model(models, "voice", "1")
    folder.rename(models / nasty)
    none = ["--socket", str(tmp_path / "none.sock")]
    table = invoke("models", "list", "--models", str(models), *none)
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout and "\\x1b[2J" in table.stdout
    assert not any(line.startswith("fake line") for line in table.stdout.splitlines())
    listed = invoke("models", "list", "--models", str(models), "--json", *none)
    assert [row["folder"] for row in json.loads(listed.stdout)] == [nasty]
