"""A box's identity in a fleet (``ttsd.fetch.box``): what a staged rollout picks boxes by. Given,
derived from the machine id (never the raw id), or made once and kept; the kept file is hostile
input. ``ttsd serve --box-id`` and the ``ttsd_box_info`` metric."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import ttsd.daemon
from ttsd.cli import main
from ttsd.config import ServeConfig
from ttsd.errors import ConfigError
from ttsd.fetch.box import APP_ID, KEEP_FILE, box_id, check_box_id
from ttsd.metrics import Metrics

MACHINE = "4f1c2a9be07d4c3e9a51d6b8c2e0f7a3"
OTHER = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def keep(tmp_path: Path) -> Path:
    return tmp_path / "state"


def machine_file(tmp_path: Path, text: str, name: str = "machine-id") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def no_machine(tmp_path: Path) -> list[Path]:
    return [tmp_path / "no-machine-id", tmp_path / "no-dbus-machine-id"]


# -- given -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["box-07", "eu.west_3", "A", "x" * 64, "0"])
def test_a_given_id_is_used_as_is_and_nothing_is_written(tmp_path: Path, keep: Path, given: str) -> None:
    machine = machine_file(tmp_path, MACHINE + "\n")
    assert box_id(given, keep_in=keep, machine_ids=[machine]) == given
    assert not keep.exists()


@pytest.mark.parametrize("bad", ["", "x" * 65, "box 7", "box/7", "../x", "bøx", "a\n", "a:b", "a\0b", 'a"b'])
def test_a_bad_given_id_is_refused_with_a_clear_config_error(keep: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"--box-id .*: a box id is 1 to 64 letters, digits") as refused:
        box_id(bad, keep_in=keep)
    assert refused.value.exit_code == 3
    assert not keep.exists()
    assert check_box_id("ok-1", "TTSD_BOX_ID") == "ok-1"


# -- derived from the machine id -------------------------------------------------------------------
def test_the_machine_id_is_hashed_never_published(tmp_path: Path, keep: Path) -> None:
    """1. The id is 16 hex digits. 2. Neither the machine id nor any 8-digit piece of it appears in
    it. 3. It is systemd's app-specific id for ttsd's key, cut to 16 digits (what
    ``systemd-id128 machine-id --app-specific=APP_ID`` prints). 4. Nothing is written."""
    derived = box_id(None, keep_in=keep, machine_ids=[machine_file(tmp_path, MACHINE + "\n")])
    assert re.fullmatch(r"[0-9a-f]{16}", derived)
    assert all(MACHINE[i : i + 8] not in derived for i in range(len(MACHINE) - 7))
    systemd = bytearray(hmac.new(bytes.fromhex(MACHINE), bytes.fromhex(APP_ID), hashlib.sha256).digest()[:16])
    systemd[6], systemd[8] = (systemd[6] & 0x0F) | 0x40, (systemd[8] & 0x3F) | 0x80
    assert derived == systemd.hex()[:16]
    assert not keep.exists()


def test_the_derived_id_is_stable_and_differs_between_machines(tmp_path: Path, keep: Path) -> None:
    one = machine_file(tmp_path, MACHINE + "\n", "one")
    other = machine_file(tmp_path, OTHER + "\n", "other")
    first = box_id(None, keep_in=keep, machine_ids=[one])
    assert box_id(None, keep_in=keep, machine_ids=[one]) == first
    assert box_id(None, keep_in=tmp_path / "elsewhere", machine_ids=[one]) == first  # not from the dir
    assert box_id(None, keep_in=keep, machine_ids=[other]) != first
    upper = machine_file(tmp_path, MACHINE.upper(), "upper")  # no newline, upper case: the same id
    assert box_id(None, keep_in=keep, machine_ids=[upper]) == first


@pytest.mark.parametrize("unusable", ["", "\n", "uninitialized\n", "0" * 32 + "\n", MACHINE[:31] + "\n",
                                      MACHINE + "00\n", "zz" + MACHINE[2:] + "\n", "x" * 10_000])
def test_an_unusable_machine_id_falls_through_to_the_next_then_the_kept_id(tmp_path: Path, keep: Path,
                                                                           unusable: str) -> None:
    """An image not booted yet has an empty /etc/machine-id, a first boot ``uninitialized``: the
    dbus copy is used, else an id is kept."""
    first = machine_file(tmp_path, unusable, "etc")
    dbus = machine_file(tmp_path, MACHINE + "\n", "dbus")
    from_dbus = box_id(None, keep_in=keep, machine_ids=[dbus])
    assert box_id(None, keep_in=keep, machine_ids=[first, dbus]) == from_dbus
    kept = box_id(None, keep_in=keep, machine_ids=[first])
    assert kept != from_dbus and (keep / KEEP_FILE).read_text() == kept + "\n"


def test_a_machine_id_that_is_not_a_file_is_skipped(tmp_path: Path, keep: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # a FIFO with no writer: must not block
    kept = box_id(None, keep_in=keep, machine_ids=[tmp_path / "dir", tmp_path / "fifo"])
    assert (keep / KEEP_FILE).read_text() == kept + "\n"


# -- made once and kept ------------------------------------------------------------------------------
def test_without_a_machine_id_a_random_id_is_kept_0600_and_reused(tmp_path: Path, keep: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """1. No machine id: a random 16-digit id, written to keep/box-id, mode 0600 (the dir made if
    missing), logged once. 2. The next call reads it back, logs nothing. 3. Another dir makes
    another id."""
    with caplog.at_level(logging.INFO, logger="ttsd.box"):
        first = box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    path = keep / KEEP_FILE
    assert path.read_text() == first + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [r.getMessage() for r in caplog.records] == [
        f"this box has no machine id: made box id {first}, kept in {path}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ttsd.box"):
        assert box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path)) == first
    assert caplog.records == []
    assert sorted(os.listdir(keep)) == [KEEP_FILE]  # no temp files left behind
    assert box_id(None, keep_in=tmp_path / "other", machine_ids=no_machine(tmp_path)) != first


def test_an_id_an_operator_wrote_into_the_file_is_used(tmp_path: Path, keep: Path) -> None:
    keep.mkdir()
    (keep / KEEP_FILE).write_text("rack4-box12\n")
    assert box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path)) == "rack4-box12"


def test_a_symlinked_keep_file_is_replaced_never_followed(tmp_path: Path, keep: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """1. box-id is a link to a file holding a valid id (someone else's file). 2. That id is not
    used; a warning says why. 3. The link is replaced by a regular 0600 file with a new id, and the
    file it pointed at is untouched."""
    keep.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("planted-id\n")
    (keep / KEEP_FILE).symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="ttsd.box"):
        made = box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path))
    assert made != "planted-id" and re.fullmatch(r"[0-9a-f]{16}", made)
    assert "is not trusted (a symbolic link)" in caplog.text
    path = keep / KEEP_FILE
    assert not path.is_symlink() and stat.S_ISREG(path.lstat().st_mode) and path.read_text() == made + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert target.read_text() == "planted-id\n"
    assert box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path)) == made


def test_a_dangling_symlink_is_replaced_and_its_target_never_created(tmp_path: Path, keep: Path) -> None:
    keep.mkdir()
    (keep / KEEP_FILE).symlink_to(tmp_path / "would-be-created")
    made = box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path))
    assert not (tmp_path / "would-be-created").exists()
    assert (keep / KEEP_FILE).read_text() == made + "\n"


@pytest.mark.parametrize("garbage, why", [
    (b"not an id at all\n", "not a box id"),
    (b"", "not a box id"),
    (b"x" * 65, "not a box id"),
    (b"\xff\xfe id", "not ASCII text"),
    (b"a" * 4096, "4096 bytes, not an id"),
    (b"ok\0id", "not a box id"),
])
def test_a_garbage_keep_file_is_not_trusted(tmp_path: Path, keep: Path, caplog: pytest.LogCaptureFixture,
                                            garbage: bytes, why: str) -> None:
    keep.mkdir()
    (keep / KEEP_FILE).write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="ttsd.box"):
        made = box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    assert f"is not trusted ({why})" in caplog.text
    assert (keep / KEEP_FILE).read_text() == made + "\n"


def test_a_fifo_in_place_of_the_keep_file_is_replaced_without_blocking(tmp_path: Path, keep: Path) -> None:
    keep.mkdir()
    os.mkfifo(keep / KEEP_FILE)
    made = box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path))
    assert (keep / KEEP_FILE).read_text() == made + "\n"


def test_an_id_that_cannot_be_kept_is_a_config_error(tmp_path: Path, keep: Path) -> None:
    """A directory in the file's place cannot be replaced: the id would change at every start, so
    the daemon (or get) stops with a line that says to give --box-id."""
    (keep / KEEP_FILE).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"cannot keep a box id in .*box-id: .*give one with --box-id"):
        box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path))


def test_two_processes_making_the_first_id_at_once_agree(tmp_path: Path, keep: Path) -> None:
    """Two voices' timers start together on a box with no machine id: whichever publishes first,
    both come away with the id that is kept."""
    keep.mkdir()
    results: list[str] = []
    start = threading.Barrier(8)

    def make() -> None:
        start.wait()
        results.append(box_id(None, keep_in=keep, machine_ids=no_machine(tmp_path)))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and (keep / KEEP_FILE).read_text() == results[0] + "\n"


# -- the daemon: flag and metric ----------------------------------------------------------------------
def test_the_metric_carries_the_box_id() -> None:
    metrics = Metrics.create()
    assert 'ttsd_box_info{' not in metrics.render().decode()  # nothing until the daemon knows it
    metrics.identify("rack4-box12")
    metrics.identify("rack4-box12")
    text = metrics.render().decode()
    assert text.count('ttsd_box_info{box="rack4-box12"} 1.0') == 1
    assert "# TYPE ttsd_box_info gauge" in text
    assert "ttsd_build_info{" in text  # beside it, unchanged


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ServeConfig]]:
    """``serve`` runs up to the daemon; the daemon only records its config."""
    configs: list[ServeConfig] = []

    class Recorder:
        def __init__(self, config: ServeConfig, *_a: Any, **_k: Any) -> None:
            configs.append(config)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(ttsd.daemon, "Daemon", Recorder)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield configs
    root.handlers[:] = handlers  # serve configures logging
    root.setLevel(level)


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    paths = ["--models", str(tmp_path / "models"), "--state", str(tmp_path / "state"),
             "--cache", str(tmp_path / "cache"), "--socket", str(tmp_path / "ttsd.sock")]
    return CliRunner().invoke(main, ["serve", *paths, *args], env=env or {})


def test_serve_takes_the_box_id_from_the_flag_or_the_environment(tmp_path: Path,
                                                                 captured: list[ServeConfig]) -> None:
    assert serve(tmp_path, "--box-id", "box-7").exit_code == 0
    assert serve(tmp_path, env={"TTSD_BOX_ID": "box-8"}).exit_code == 0
    assert serve(tmp_path, "--box-id", "box-9", env={"TTSD_BOX_ID": "box-8"}).exit_code == 0
    assert serve(tmp_path).exit_code == 0
    assert [c.box_id for c in captured] == ["box-7", "box-8", "box-9", None]


@pytest.mark.parametrize("args, env, shown", [
    (["--box-id", "box 7"], {}, "--box-id 'box 7'"),
    ([], {"TTSD_BOX_ID": "x" * 65}, "--box-id 'xxx"),
])
def test_serve_refuses_a_bad_box_id_in_one_line_before_any_work(tmp_path: Path, captured: list[ServeConfig],
                                                                args: list[str], env: dict[str, str],
                                                                shown: str) -> None:
    result = serve(tmp_path, *args, env=env)
    assert result.exit_code == 2, result.output  # a bad flag: the example unit does not restart it
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and shown in lines[0], result.stderr
    assert "a box id is 1 to 64 letters" in lines[0] and "Traceback" not in result.output
    assert captured == [] and not (tmp_path / "state").exists()


def test_serve_help_shows_the_box_id_option() -> None:
    text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert "--box-id ID" in text and "TTSD_BOX_ID" in text and "ttsd_box_info" in text
    assert "/etc/machine-id, which is never shown" in text
