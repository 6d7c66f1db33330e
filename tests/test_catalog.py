"""The Piper voice catalog without converting anything: ``voices.json`` checked field by field,
the HTTP side (bounds, resume, cuts, wrong bytes, unreachable mirrors) against a mirror the test
serves, ``ttsd models search``, and every way ``ttsd models get`` fails before a conversion, each
one line with its own exit code and nothing left in the models dir.

What only a conversion or a daemon shows is in ``test_models_get.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_server import Mirror, VoiceFiles, add_voice, md5, serve
from click.testing import CliRunner, Result
from conftest import fake_model

from ttsd.cli import main
from ttsd.errors import CatalogError, ChecksumError, ConfigError, NetworkError
from ttsd.fetch import download as dl
from ttsd.fetch.index import (
    CatalogFile,
    check_remote_path,
    check_voice_key,
    parse_catalog,
)

SMALL = VoiceFiles(onnx=os.urandom(300_000), config=b'{"audio": {"sample_rate": 22050}}',
                   card=b"# Model card\n\n## Dataset\n\n* License: CC0\n")
KEY = "en_US-test-medium"


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    with serve() as m:
        yield m


def catalog(mirror: Mirror, **more: VoiceFiles) -> dict[str, Any]:
    voices: dict[str, Any] = {}
    add_voice(mirror, voices, KEY, SMALL)
    add_voice(mirror, voices, "de_DE-kurz-low", SMALL, language=("de_DE", "German", "Germany"), quality="low")
    add_voice(mirror, voices, "fr_FR-longue-x_low", SMALL, language=("fr_FR", "French", "France"), quality="x_low")
    mirror.publish(voices)
    return voices


def onnx_path(voices: dict[str, Any], key: str = KEY) -> str:
    return next(p for p in voices[key]["files"] if p.endswith(".onnx"))


# -- the catalog, checked ------------------------------------------------------------------------

@pytest.mark.slow
def test_an_entry_in_the_real_layout_is_read() -> None:
    with serve() as m:
        voices = catalog(m)
    cat = parse_catalog(json.dumps(voices).encode(), "voices.json")
    assert sorted(cat.voices) == ["de_DE-kurz-low", KEY, "fr_FR-longue-x_low"] and not cat.invalid
    voice = cat.find(KEY)
    assert voice.onnx.path == "en/en_US/test/medium/en_US-test-medium.onnx"
    assert voice.config.path == f"{voice.onnx.path}.json" and voice.model_card is not None
    assert voice.onnx.size == len(SMALL.onnx) and voice.onnx.md5 == md5(SMALL.onnx)
    assert [v.key for v in cat.search("german")] == ["de_DE-kurz-low"]
    assert [v.key for v in cat.search(language="fr")] == ["fr_FR-longue-x_low"]
    assert [v.key for v in cat.search("medium", language="en-us")] == [KEY]


@pytest.mark.parametrize("path", [
    "../../etc/passwd.onnx", "/etc/passwd.onnx", "en/../../x.onnx", "en/./x.onnx", "en//x.onnx",
    "http://evil.example/x.onnx", "file:///etc/x.onnx", "en\\..\\x.onnx", "en/%2e%2e/x.onnx",
    "en/x.onnx?y=1", "en/x.onnx#y", "en/x y.onnx", "en/x\n.onnx", "",
])
def test_a_file_path_that_could_leave_the_mirror_is_refused(path: str) -> None:
    with pytest.raises(CatalogError):
        check_remote_path(path)
    entry = {"key": KEY, "name": "test", "quality": "medium", "num_speakers": 1,
             "language": {"code": "en_US", "family": "en", "region": "US", "name_native": "English",
                          "name_english": "English", "country_english": "United States"},
             "files": {path: {"size_bytes": 1, "md5_digest": "0" * 32},
                       "en/x.onnx": {"size_bytes": 1, "md5_digest": "0" * 32},
                       "en/x.onnx.json": {"size_bytes": 1, "md5_digest": "0" * 32}}}
    cat = parse_catalog(json.dumps({KEY: entry}).encode(), "voices.json")
    assert KEY in cat.invalid and not cat.voices
    with pytest.raises(CatalogError, match="refused"):
        cat.find(KEY)


def test_plain_paths_pass() -> None:
    assert check_remote_path("de/de_DE/thorsten_emotional/medium/MODEL_CARD")
    assert check_remote_path("ca/ca_ES/upc_ona/x_low/ca_ES-upc_ona-x_low.onnx.json")


@pytest.mark.parametrize("key", ["../x", ".hidden", "a/b", "x.partial", "-voice", "a" * 101, "", 7, None])
def test_keys_that_cannot_name_a_folder_are_refused(key: object) -> None:
    with pytest.raises(CatalogError):
        check_voice_key(key)


@pytest.mark.slow
@pytest.mark.parametrize("spoil, fragment", [
    (lambda e: e.update(key="other"), "differs"),
    (lambda e: e["files"].clear(), "'files'"),
    (lambda e: next(iter(e["files"].values())).update(size_bytes=-1), "size_bytes"),
    (lambda e: next(iter(e["files"].values())).update(size_bytes=True), "size_bytes"),
    (lambda e: next(iter(e["files"].values())).update(size_bytes=1 << 40), "size_bytes"),
    (lambda e: next(iter(e["files"].values())).update(md5_digest="xyz"), "md5_digest"),
    (lambda e: e["language"].update(code="en US; rm"), "language code"),
    (lambda e: e["language"].update(name_english="x" * 500), "name_english"),
    (lambda e: e.update(num_speakers="many"), "num_speakers"),
    (lambda e: e.update(aliases=["../x"]), "invalid voice key"),
    (lambda e: e.update(language=[]), "'language'"),
])
def test_every_field_is_checked(spoil: Any, fragment: str) -> None:
    with serve() as m:
        voices = catalog(m)
    spoil(voices[KEY])
    cat = parse_catalog(json.dumps(voices).encode(), "voices.json")
    assert KEY not in cat.voices and fragment in cat.invalid[KEY], cat.invalid
    assert len(cat.voices) == 2  # one bad entry hides no other


@pytest.mark.parametrize("raw, fragment", [
    (b"[]", "JSON object"), (b"{", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (json.dumps({f"v{i}": {} for i in range(6000)}).encode(), "more than 5000"),
])
def test_a_malformed_catalog_is_refused(raw: bytes, fragment: str) -> None:
    with pytest.raises(CatalogError, match=fragment):
        parse_catalog(raw, "voices.json")


# -- the HTTP side ------------------------------------------------------------------------------

def test_mirror_urls_are_checked() -> None:
    assert dl.Mirror.parse(None).base == dl.DEFAULT_MIRROR
    assert dl.Mirror.parse("http://box.lan:8080/piper").base == "http://box.lan:8080/piper/"
    for bad in ("ftp://x/", "file:///srv/piper/", "http:///x", "https://user:pw@x/", "http://x/?a=1",
                "http://x:port/", "x/y"):
        with pytest.raises(ConfigError):
            dl.Mirror.parse(bad)


def fast(mirror: Mirror, **kw: Any) -> dl.Mirror:
    return dl.Mirror(mirror.url, timeout=kw.pop("timeout", 10.0), backoff=0.01, **kw)


def the_file(mirror: Mirror, voices: dict[str, Any]) -> CatalogFile:
    path = onnx_path(voices)
    info = voices[KEY]["files"][path]
    return CatalogFile(path, info["size_bytes"], info["md5_digest"])


@pytest.mark.slow
def test_a_cut_connection_goes_on_where_it_stopped(mirror: Mirror, tmp_path: Path) -> None:
    """1. The mirror cuts the first two connections after 100,000 bytes each. 2. One download call
    connects three times, asking for bytes=100000- and bytes=200000-. 3. The file is whole, and no
    byte was fetched twice."""
    file = the_file(mirror, catalog(mirror))
    mirror.cuts[file.path] = [100_000, 100_000]
    seen: list[int] = []
    dl.download(fast(mirror), file, tmp_path / "v.onnx", seen.append)
    assert (tmp_path / "v.onnx").read_bytes() == SMALL.onnx
    assert mirror.fetched(file.path) == [None, "bytes=100000-", "bytes=200000-"]
    assert seen[-1] == len(SMALL.onnx) and seen == sorted(seen)
    assert [p.name for p in tmp_path.iterdir()] == ["v.onnx"]


@pytest.mark.slow
def test_a_download_cut_too_often_is_kept_for_the_next_run(mirror: Mirror, tmp_path: Path) -> None:
    """1. Every connection is cut after 50,000 bytes; after 2 connections the call gives up with a
    NetworkError that says how much is kept. 2. The next call goes on from byte 100,000."""
    file = the_file(mirror, catalog(mirror))
    mirror.cuts[file.path] = [50_000] * 2
    with pytest.raises(NetworkError, match="100000 of 300000 bytes kept"):
        dl.download(fast(mirror, attempts=2), file, tmp_path / "v.onnx")
    assert dl.present_bytes(tmp_path / "v.onnx", file) == 100_000
    dl.download(fast(mirror), file, tmp_path / "v.onnx")
    assert mirror.fetched(file.path)[-1] == "bytes=100000-"
    assert (tmp_path / "v.onnx").read_bytes() == SMALL.onnx


@pytest.mark.slow
def test_partial_bytes_of_an_older_catalog_are_not_continued(mirror: Mirror, tmp_path: Path) -> None:
    file = the_file(mirror, catalog(mirror))
    (tmp_path / f".v.onnx.{'0' * 32}.part").write_bytes(b"old" * 1000)
    dl.download(fast(mirror), file, tmp_path / "v.onnx")
    assert mirror.fetched(file.path) == [None]
    assert [p.name for p in tmp_path.iterdir()] == ["v.onnx"]


@pytest.mark.slow
def test_wrong_md5_is_refused_and_thrown_away(mirror: Mirror, tmp_path: Path) -> None:
    file = the_file(mirror, catalog(mirror))
    mirror.files[file.path] = bytes(len(SMALL.onnx))  # same size, other bytes
    with pytest.raises(ChecksumError, match="md5"):
        dl.download(fast(mirror), file, tmp_path / "v.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_file_is_made_on_the_spot_and_checked(mirror: Mirror, tmp_path: Path) -> None:
    """A zero-byte file (a fleet folder may list one) needs no request, but must still have the
    listed digest: download() made no partial file for it, and get exited 3 on a missing .part."""
    dl.download(fast(mirror), CatalogFile("en/empty.txt", 0, md5(b"")), tmp_path / "empty.txt")
    assert (tmp_path / "empty.txt").read_bytes() == b"" and mirror.requests == []
    with pytest.raises(ChecksumError, match="md5 d41d8cd98f00b204e9800998ecf8427e differs"):
        dl.download(fast(mirror), CatalogFile("en/other.txt", 0, md5(b"x")), tmp_path / "other.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"] and mirror.requests == []


@pytest.mark.slow
@pytest.mark.parametrize("announced", [True, False])
def test_a_file_larger_than_the_catalog_says_is_cut_off(mirror: Mirror, tmp_path: Path, announced: bool) -> None:
    """Announced (Content-Length): refused before a byte is read. Not announced: read up to one
    byte past the catalog's size, then refused; never more."""
    file = the_file(mirror, catalog(mirror))
    mirror.files[file.path] = SMALL.onnx + bytes(5_000_000)
    if not announced:
        mirror.no_length.add(file.path)
    seen: list[int] = []
    with pytest.raises(ChecksumError, match="larger than the catalog's 300000 bytes"):
        dl.download(fast(mirror), file, tmp_path / "v.onnx", seen.append)
    assert max(seen, default=0) <= file.size
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["announced", "unannounced", "unannounced, a 416 without its length"])
def test_a_file_smaller_than_the_catalog_says_is_refused(mirror: Mirror, tmp_path: Path, how: str) -> None:
    """Announced (Content-Length): refused at once. Not announced, the short body looks like a
    connection cut off: the next try asks for the rest, the mirror answers 416 (no such byte);
    once may be a glitch (started over), twice is the mirror's file being short (exit 16), not a
    network to try again later (exit 14, which a timer would have repeated for good). Nothing is
    kept."""
    file = the_file(mirror, catalog(mirror))
    mirror.files[file.path] = SMALL.onnx[:1000]
    if how != "announced":
        mirror.no_length.add(file.path)
    if how.endswith("length"):
        mirror.bare_416.add(file.path)
    message = "ends before byte 1000, twice" if how.endswith("length") else "1000 bytes, the catalog says 300000"
    with pytest.raises(ChecksumError, match=message):
        dl.download(fast(mirror), file, tmp_path / "v.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_mirror_that_refuses_a_good_range_once_is_asked_again(mirror: Mirror, tmp_path: Path) -> None:
    """A download cut off, then a 416 with a wrong length to the Range that goes on (a CDN has
    answered so with its error page's length): not taken for a short file at once; the download
    starts over and completes."""
    file = the_file(mirror, catalog(mirror))
    mirror.cuts[file.path] = [100_000]
    mirror.glitches[file.path] = 1
    dl.download(fast(mirror), file, tmp_path / "v.onnx")
    assert (tmp_path / "v.onnx").read_bytes() == mirror.files[file.path]
    assert mirror.fetched(file.path) == [None, "bytes=100000-", None], mirror.fetched(file.path)


@pytest.mark.slow
def test_http_errors_say_whose_they_are(mirror: Mirror, tmp_path: Path) -> None:
    file = the_file(mirror, catalog(mirror))
    del mirror.files[file.path]
    with pytest.raises(CatalogError, match="not on the mirror .HTTP 404"):
        dl.download(fast(mirror), file, tmp_path / "v.onnx")
    mirror.statuses[file.path] = 503
    with pytest.raises(NetworkError, match="HTTP 503"):
        dl.download(fast(mirror), file, tmp_path / "v.onnx")


@pytest.mark.slow
def test_an_unreachable_or_silent_mirror_is_a_network_error(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(NetworkError, match="cannot reach 127.0.0.1.*refused"):
        dl.fetch_small(dl.Mirror(f"http://127.0.0.1:{port}/"), "voices.json", 100)
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        mirror = dl.Mirror(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.5)
        with pytest.raises(NetworkError, match="timed out"):
            dl.fetch_small(mirror, "voices.json", 100)


@pytest.mark.slow
def test_a_catalog_past_its_bound_is_refused(mirror: Mirror) -> None:
    mirror.files["voices.json"] = b" " * 2000
    with pytest.raises(CatalogError, match="2000 bytes, more than the 1000 allowed"):
        dl.fetch_small(fast(mirror), "voices.json", 1000)
    mirror.no_length.add("voices.json")
    with pytest.raises(CatalogError, match="more than the 1000 bytes allowed"):
        dl.fetch_small(fast(mirror), "voices.json", 1000)


# -- the commands, in-process -------------------------------------------------------------------

def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]  # after the progress lines, if any
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.slow
def test_search_lists_filters_and_prints_json(mirror: Mirror) -> None:
    catalog(mirror)
    result = invoke("models", "search", "--mirror", mirror.url)
    assert result.exit_code == 0, result.output
    assert "3 of 3 voices" in result.stdout
    for key in (KEY, "de_DE-kurz-low", "fr_FR-longue-x_low"):
        assert key in result.stdout
    result = invoke("models", "search", "German", "--mirror", mirror.url)
    assert "de_DE-kurz-low" in result.stdout and KEY not in result.stdout
    result = invoke("models", "search", "--language", "fr_FR", "--json", "--mirror", mirror.url)
    found = json.loads(result.stdout)
    assert [v["key"] for v in found] == ["fr_FR-longue-x_low"]
    assert found[0]["language"]["name_english"] == "French" and found[0]["size_bytes"] > 300_000
    for form in ((), ("--json",)):  # the hint on stderr in both forms: stdout stays JSON
        result = invoke("models", "search", "klingon", "--mirror", mirror.url, *form)
        assert "no voice matches; without words" in result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.slow
def test_search_reads_TTSD_MIRROR_and_names_refused_entries(mirror: Mirror) -> None:
    voices = catalog(mirror)
    voices["evil"] = dict(voices[KEY], key="evil", files={"../../x.onnx": {"size_bytes": 1, "md5_digest": "0" * 32}})
    mirror.publish(voices)
    result = CliRunner().invoke(main, ["models", "search"], env={"TTSD_MIRROR": mirror.url})
    assert result.exit_code == 0 and "3 of 3 voices" in result.stdout
    assert "warning: 1 catalog entries refused, e.g. 'evil': file path" in result.stderr


def get(mirror_url: str, tmp_path: Path, *args: str) -> Result:
    return invoke("models", "get", *args, "--mirror", mirror_url, "--models", str(tmp_path / "models"),
                  "--cache", str(tmp_path / "cache"), "--timeout", "10")


def nothing_in_models(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert not models.exists() or sorted(p.name for p in models.iterdir()) == [], list(models.iterdir())


@pytest.mark.slow
def test_get_a_voice_not_in_the_catalog(mirror: Mirror, tmp_path: Path) -> None:
    catalog(mirror)
    one_line_error(get(mirror.url, tmp_path, "en_US-tset-medium"), 15, "no voice en_US-tset-medium",
                   f"did you mean {KEY}")
    nothing_in_models(tmp_path)


@pytest.mark.slow
def test_get_with_a_wrong_md5(mirror: Mirror, tmp_path: Path) -> None:
    voices = catalog(mirror)
    mirror.files[onnx_path(voices)] = bytes(len(SMALL.onnx))
    one_line_error(get(mirror.url, tmp_path, KEY), 16, "md5", "differs from the catalog")
    nothing_in_models(tmp_path)
    assert not list((tmp_path / "cache" / "downloads" / KEY).glob("*.onnx*"))  # thrown away, not kept


@pytest.mark.slow
def test_get_with_a_wrong_size(mirror: Mirror, tmp_path: Path) -> None:
    voices = catalog(mirror)
    voices[KEY]["files"][onnx_path(voices)]["size_bytes"] -= 1
    mirror.publish(voices)
    one_line_error(get(mirror.url, tmp_path, KEY), 16, "larger than the catalog's 299999 bytes")
    nothing_in_models(tmp_path)


@pytest.mark.slow
def test_get_a_file_the_mirror_does_not_have(mirror: Mirror, tmp_path: Path) -> None:
    voices = catalog(mirror)
    del mirror.files[onnx_path(voices) + ".json"]
    one_line_error(get(mirror.url, tmp_path, KEY), 15, "HTTP 404")
    nothing_in_models(tmp_path)


@pytest.mark.slow
def test_get_an_entry_whose_path_escapes_the_mirror(mirror: Mirror, tmp_path: Path) -> None:
    """1. The catalog points the voice's .onnx at ``../secret.onnx``, above the mirror.
    2. ``get`` refuses the entry with the reason, and never asks for that path."""
    voices = catalog(mirror)
    files = voices[KEY]["files"]
    path = onnx_path(voices)
    info, config = files.pop(path), files.pop(f"{path}.json")
    files.update({"../secret.onnx": info, "../secret.onnx.json": config})
    mirror.publish(voices)
    one_line_error(get(mirror.url, tmp_path, KEY), 15, "'../secret.onnx' escapes the mirror")
    assert [path for path, _ in mirror.requests] == ["ttsd-index.json", "voices.json"]  # no fleet index here
    nothing_in_models(tmp_path)


@pytest.mark.slow
def test_get_a_voice_already_there_needs_upgrade(mirror: Mirror, tmp_path: Path) -> None:
    catalog(mirror)
    fake_model(tmp_path / "models", KEY, "1")
    one_line_error(get(mirror.url, tmp_path, KEY), 17, "already in", "version 1", "--upgrade")
    assert [path for path, _ in mirror.requests] == ["ttsd-index.json", "voices.json"]  # no fleet index here
    one_line_error(get(mirror.url, tmp_path, KEY, "--upgrade", "--version", "1"), 3, "not newer than version 1")


@pytest.mark.slow
def test_get_with_too_little_disk_space(mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The space check, before any download (a real full disk: ``test_models_get.py``)."""
    import shutil
    from collections import namedtuple

    catalog(mirror)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1 << 20))
    one_line_error(get(mirror.url, tmp_path, KEY), 12, "1 MiB free")
    assert [path for path, _ in mirror.requests] == ["ttsd-index.json", "voices.json"]  # no fleet index here


def test_get_without_network_is_one_line_and_its_own_exit_code(tmp_path: Path) -> None:
    """A real process, as a user sees it: no traceback, one line, exit 14, nothing written."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = dict(os.environ, TTSD_MIRROR=f"http://127.0.0.1:{port}/piper/", TTSD_MODELS=str(tmp_path / "models"),
               TTSD_CACHE=str(tmp_path / "cache"))
    for args in (["models", "get", KEY], ["models", "search"]):
        proc = subprocess.run([sys.executable, "-m", "ttsd", *args], env=env, capture_output=True, timeout=120,
                              check=False)
        err = proc.stderr.decode()
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 14, err
        assert "Traceback" not in err and len(lines) == 1 + (args[1] == "get"), err  # get says what it reads
        assert lines[-1].startswith("error: cannot reach 127.0.0.1") and "refused" in lines[-1], err
    nothing_in_models(tmp_path)


@pytest.mark.parametrize("card, licence", [
    ("# Model card for joe (medium)\n\n## Dataset\n\n* URL: https://x\n* License: CC0\n", "CC0"),
    ("## Dataset\n* License: CC BY 4.0  \n", "CC BY 4.0"),
    ("licence:   See URL\n", "See URL"),
    ("# Model card\n\nNo licence given here.\n", ""),
    ("* License: \x1b[31mred\x07\n", "[31mred"),
])
def test_the_licence_line_of_a_model_card(card: str, licence: str) -> None:
    from ttsd.fetch.get import card_license

    assert card_license(card) == licence


@pytest.mark.slow
def test_a_catalog_dripping_in_is_given_up(tmp_path: Path) -> None:
    """A mirror that answers, then sends a byte now and then (each read within the timeout)
    cannot hold a fetch longer than 4 timeouts."""
    import threading
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def drip() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
                for _ in range(40):
                    time.sleep(0.1)
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        return

        threading.Thread(target=drip, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(NetworkError, match="still not read"):
            dl.fetch_small(dl.Mirror(f"http://127.0.0.1:{server.getsockname()[1]}/", timeout=0.3), "voices.json", 1000)
        assert time.monotonic() - start < 2.5
