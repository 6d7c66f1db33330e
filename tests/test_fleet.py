"""A fleet's own mirror of ready, signed model folders: ``ttsd models publish`` on the build
machine, ``ttsd models get --mirror`` on every box, and a box's daemon with trusted keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from catalog_server import Mirror, serve, serve_dir
from conftest import plausible, save_tiny_vits
from daemon_util import start_daemon, wait_for
from test_catalog import get, invoke, nothing_in_models, one_line_error
from test_signing import folder_of_two, make_key

from ttsd.errors import CatalogError
from ttsd.fetch.prebuilt import INDEX_FILE, parse_index
from ttsd.manifest import SIGNATURE, pack, verify
from ttsd.signing import sign

pytest.importorskip("model_signing", reason="the signing extra (model-signing) is not installed")


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    with serve() as m:
        yield m


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Path]:
    key, pub = make_key(tmp_path / "secret", "fleet")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "fleet.pem").write_bytes(pub.read_bytes())
    return {"key": key, "trusted": trusted, "published": tmp_path / "published"}


def publish(folder: Path, where: Path) -> None:
    """``folder`` published to ``where``, the index signed with the fleet key beside it (a box with
    --trusted-keys takes only a signed index)."""
    key = where.parent / "secret" / "fleet.key"
    result = invoke("models", "publish", str(folder), str(where), *(("--sign-key", str(key)) if key.exists() else ()))
    assert result.exit_code == 0, result.output


def tamper_on_mirror(where: Path, name: str, version: str, edit, **pack_args: object) -> None:  # type: ignore[no-untyped-def]
    """What someone with write access to the mirror (not the key) does to a published folder:
    change it, then rewrite its manifest and the index to match, so every checksum passes and
    only the signature can tell. (``publish`` itself refuses such a folder.)"""
    folder = where / "ttsd" / name / version
    edit(folder)
    pack(folder, name=name, version=version, **pack_args)  # type: ignore[arg-type]
    pin_manifest(where, name, version)


def pin_manifest(where: Path, name: str, version: str) -> None:
    """The mirror's index rewritten to pin the folder's manifest as it now is."""
    import hashlib

    folder = where / "ttsd" / name / version
    index = json.loads((where / INDEX_FILE).read_text())
    manifest = (folder / "ttsd.json").read_bytes()
    pinned = {"sha256": hashlib.sha256(manifest).hexdigest(), "size": len(manifest)}
    index["voices"][name]["versions"][version]["manifest"].update(pinned)
    if index["voices"][name].get("version") == version:  # what older ttsd releases read
        index["voices"][name]["manifest"].update(pinned)
    (where / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.slow
def test_a_box_gets_the_signed_folder_as_it_was_published(tmp_path: Path, mirror: Mirror,
                                                          fleet: dict[str, Path]) -> None:
    """1. Publish a signed v1; a box gets it byte for byte, signature included (checked against
    the trusted keys before it lands). 2. ``--upgrade`` with nothing newer changes nothing.
    3. A v2 the mirror serves with other bytes than its index pins is refused, nothing lands."""
    v1 = folder_of_two(tmp_path / "build" / "voice-1")
    sign(v1, fleet["key"])
    publish(v1, fleet["published"])
    serve_dir(mirror, fleet["published"])
    box = tmp_path / "box"
    result = get(mirror.url, box, "voice", "--trusted-keys", str(fleet["trusted"]))
    assert result.exit_code == 0, result.output
    landed = box / "models" / "voice-1"
    assert verify(landed).version == "1"
    assert sorted(p.name for p in landed.iterdir()) == sorted(p.name for p in v1.iterdir())
    assert (landed / SIGNATURE).read_bytes() == (v1 / SIGNATURE).read_bytes()

    result = get(mirror.url, box, "voice", "--upgrade")
    assert result.exit_code == 0 and "up to date" in result.stderr, result.output
    one_line_error(get(mirror.url, box, "voice"), 17, "--upgrade")

    v2 = folder_of_two(tmp_path / "build" / "voice-2", version="2")
    sign(v2, fleet["key"])
    publish(v2, fleet["published"])
    serve_dir(mirror, fleet["published"])
    mirror.files["ttsd/voice/2/sub/b.dat"] = b"x" * len(mirror.files["ttsd/voice/2/sub/b.dat"])
    one_line_error(get(mirror.url, box, "voice", "--upgrade"), 16, "sha256")
    assert sorted(p.name for p in (box / "models").iterdir()) == ["voice-1"]


@pytest.mark.slow
def test_with_trusted_keys_get_refuses_what_a_daemon_would(tmp_path: Path, mirror: Mirror,
                                                           fleet: dict[str, Path]) -> None:
    """An unsigned folder, or one changed after signing whose manifest and index were rewritten to
    match (so every checksum passes), never lands in the models dir of a box that trusts keys."""
    unsigned = folder_of_two(tmp_path / "build" / "voice-1")
    publish(unsigned, fleet["published"])
    serve_dir(mirror, fleet["published"])
    one_line_error(get(mirror.url, tmp_path / "a", "voice", "--trusted-keys", str(fleet["trusted"])), 18,
                   "not signed")
    nothing_in_models(tmp_path / "a")

    tampered = folder_of_two(tmp_path / "build" / "voice-2", version="2")
    sign(tampered, fleet["key"])
    publish(tampered, fleet["published"])
    tamper_on_mirror(fleet["published"], "voice", "2", lambda f: (f / "a.json").write_text('{"tone": 880}'),
                     engine="vits", sample_rate=8000)
    serve_dir(mirror, fleet["published"])
    # the index that names the rewritten manifest no longer matches its signature: caught there
    one_line_error(get(mirror.url, tmp_path / "b", "voice", "--trusted-keys", str(fleet["trusted"])), 18,
                   "its signature does not match its content")
    nothing_in_models(tmp_path / "b")
    (tampered / "a.json").write_text('{"tone": 880}')  # the same change made before publishing
    pack(tampered, name="voice", version="2", engine="vits", sample_rate=8000)
    for keys in ([], ["--trusted-keys", str(fleet["trusted"])]):  # caught with or without the keys
        result = invoke("models", "publish", str(tampered), str(tmp_path / "other"), *keys)
        assert result.exit_code == 18 and not (tmp_path / "other" / INDEX_FILE).exists(), result.output


@pytest.mark.parametrize("spoil, message", [
    (lambda e: e["versions"]["1"].update(path="../../etc"), "escapes the mirror"),
    (lambda e: e["versions"].update({"not-a-version": e["versions"]["1"]}), "invalid version"),
    (lambda e: e["versions"].update({"2\n": e["versions"]["1"]}), "no spaces or line breaks"),
    (lambda e: e["versions"]["1"]["manifest"].update(sha256="ab" * 16), "64 lower-case hex"),
    (lambda e: e["versions"]["1"]["manifest"].update(size=10 << 30), "'size' must be"),
    (lambda e: e["versions"]["1"].update(share=1.5), "outside 0 to 1"),
    (lambda e: e["versions"]["1"].update(share=-0.1), "outside 0 to 1"),
    (lambda e: e["versions"]["1"].update(share=float("nan")), "a number from 0 to 1"),
    (lambda e: e["versions"]["1"].update(share="half"), "a number from 0 to 1"),
    (lambda e: e["versions"]["1"].update(share=True), "a number from 0 to 1"),
    (lambda e: e["versions"].update({"1.0": {"withdrawn": True}}), "listed twice"),
    (lambda e: e["versions"].update({"2": {"withdrawn": 7}}), "true or a short reason"),
    (lambda e: e.update(versions=[e["versions"]["1"]]), "'versions' must be an object"),
])
def test_a_hostile_fleet_index_is_refused(tmp_path: Path, fleet: dict[str, Path], spoil, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = folder_of_two(tmp_path / "build" / "voice-1")
    publish(folder, fleet["published"])
    index = json.loads((fleet["published"] / INDEX_FILE).read_text())
    spoil(index["voices"]["voice"])
    with pytest.raises(CatalogError, match=message):
        parse_index(json.dumps(index).encode(), INDEX_FILE)


def test_a_manifest_on_the_mirror_with_a_digest_that_is_not_hex_is_refused(tmp_path: Path, mirror: Mirror,
                                                                            fleet: dict[str, Path]) -> None:
    """A fetch names a file's partial download by its digest: a '/' in one ended ``get`` in an
    internal error (exit 1) on every timer run. It is the mirror's fault, exit 15, and nothing lands."""
    folder = folder_of_two(tmp_path / "build" / "voice-1")
    publish(folder, fleet["published"])
    on_mirror = fleet["published"] / "ttsd" / "voice" / "1" / "ttsd.json"
    manifest = json.loads(on_mirror.read_text())
    manifest["files"]["a.json"]["sha256"] = "/" * 64
    on_mirror.write_text(json.dumps(manifest))
    pin_manifest(fleet["published"], "voice", "1")
    serve_dir(mirror, fleet["published"])
    one_line_error(get(mirror.url, tmp_path / "box", "voice"), 15, "64-hex 'sha256'")
    nothing_in_models(tmp_path / "box")


def test_links_planted_in_the_download_cache_are_not_followed(tmp_path: Path, mirror: Mirror,
                                                             fleet: dict[str, Path]) -> None:
    """A link in the place of a download's work folder, or of a folder inside it, had the fetch
    write the voice's files where the link pointed (and leave them there). Each is replaced by a
    folder of the cache's own; what they pointed at is not touched."""
    folder = folder_of_two(tmp_path / "build" / "voice-1")
    publish(folder, fleet["published"])
    serve_dir(mirror, fleet["published"])
    downloads = tmp_path / "box" / "cache" / "downloads"
    downloads.mkdir(parents=True)
    victims = [tmp_path / "victim", tmp_path / "victim-sub"]
    for victim in victims:
        victim.mkdir()
    (downloads / "voice@1").symlink_to(victims[0])
    (victims[0] / "sub").symlink_to(victims[1])  # met only if the first link were followed
    result = get(mirror.url, tmp_path / "box", "voice")
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "box" / "models" / "voice-1").version == "1"
    assert sorted(p.name for p in victims[0].iterdir()) == ["sub"] and list(victims[1].iterdir()) == []

    (downloads / "voice@2").mkdir()
    (downloads / "voice@2" / "sub").symlink_to(victims[1])
    v2 = folder_of_two(tmp_path / "build" / "voice-2", version="2")
    publish(v2, fleet["published"])
    serve_dir(mirror, fleet["published"])
    result = get(mirror.url, tmp_path / "box", "voice", "--upgrade")
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "box" / "models" / "voice-2").version == "2"
    assert list(victims[1].iterdir()) == []


def test_what_an_older_download_left_in_the_cache_does_not_stop_a_get(tmp_path: Path, mirror: Mirror,
                                                                       fleet: dict[str, Path]) -> None:
    """A broken-off download left a folder where the mirror's folder now has a file (every later
    get downloaded it, then failed to rename it there, exit 3, for good). The cache's own leftovers
    are cleared; a file directly in the downloads dir, where lock files live, is never removed."""
    from ttsd.fsutil import own_dir

    folder = tmp_path / "build" / "voice-1"
    folder.mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub").write_bytes(b"x" * 100)
    pack(folder, name="voice", version="1", engine="vits", sample_rate=8000)
    publish(folder, fleet["published"])
    serve_dir(mirror, fleet["published"])
    left = tmp_path / "box" / "cache" / "downloads" / "voice@1" / "sub"
    left.mkdir(parents=True)
    (left / "b.dat").write_bytes(b"y")
    result = get(mirror.url, tmp_path / "box", "voice")
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "box" / "models" / "voice-1").version == "1"

    base = tmp_path / "downloads"
    base.mkdir()
    (base / "other.lock").write_text("")
    with pytest.raises(FileExistsError):
        own_dir(base, "other.lock")  # a catalog key ending in .lock: another voice's lock stays
    assert (base / "other.lock").is_file()
    (base / "w").mkdir()
    (base / "w" / "file").write_text("")
    assert own_dir(base, "w/file/x").is_dir()  # inside a work folder: the cache's own, replaced


def test_publishing_the_same_version_with_other_content_is_refused(tmp_path: Path, fleet: dict[str, Path]) -> None:
    folder = folder_of_two(tmp_path / "build" / "voice-1")
    publish(folder, fleet["published"])
    publish(folder, fleet["published"])  # the same again: fine
    (folder / "a.json").write_text('{"tone": 220}')
    pack(folder, name="voice", version="1", engine="vits", sample_rate=8000)
    result = invoke("models", "publish", str(folder), str(fleet["published"]))
    assert result.exit_code == 3 and "already published with other content" in result.stderr, result.output


@pytest.mark.daemon
def test_two_boxes_upgrade_from_one_mirror_and_both_refuse_a_tampered_folder(
        tmp_path: Path, mirror: Mirror, fleet: dict[str, Path], cache_dir: Path) -> None:
    """Two daemons with their own dirs and the fleet's trusted key. 1. Each box gets v1 from the
    mirror and serves it. 2. A signed v2 is published; each box's ``get --upgrade`` (as its timer
    would run it) brings it, and both serve v2. 3. The mirror is tampered with: v3 was changed
    after signing and its manifest and index rewritten to match. The boxes' ``get`` (without
    trusted keys here, so the folder does land) lets it in, and both daemons refuse it for its
    signature and keep serving v2."""
    build = tmp_path / "build"

    def release(version: str, seed: int) -> Path:
        folder = save_tiny_vits(build / f"tiny-{version}", version=version, seed=seed, edit=plausible,
                                noise_scale_duration=0.0, pack_it=False)
        pack(folder, name="tiny", version=version, engine="vits", sample_rate=16000)
        sign(folder, fleet["key"])
        return folder

    publish(release("1", 0), fleet["published"])
    serve_dir(mirror, fleet["published"])
    boxes = [tmp_path / "box-a", tmp_path / "box-b"]
    daemons = []

    def box_get(box: Path) -> None:
        proc = subprocess.run([sys.executable, "-m", "ttsd", "models", "get", "tiny", "--upgrade", "--mirror",
                               mirror.url, "--models", str(box / "models"), "--cache", str(box / "cache")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    def serving(daemon, version: str) -> bool:  # type: ignore[no-untyped-def]
        return daemon.request("GET", "/v1/status").json()["voices"][0]["active"] == version

    try:
        for box in boxes:
            box_get(box)
            daemons.append(start_daemon(box, cache_dir, "--trusted-keys", str(fleet["trusted"]), "--no-seed",
                                        "--settle", "0.2", "--rescan-interval", "0.5", models=box / "models"))
        assert all(serving(d, "1") for d in daemons)

        publish(release("2", 1), fleet["published"])
        serve_dir(mirror, fleet["published"])
        for box, daemon in zip(boxes, daemons, strict=True):
            box_get(box)
            wait_for(lambda d=daemon: serving(d, "2"), timeout=60, what="v2 serving")

        publish(release("3", 2), fleet["published"])

        def flip_a_bit(folder: Path) -> None:
            weights = folder / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 1
            weights.write_bytes(data)

        tamper_on_mirror(fleet["published"], "tiny", "3", flip_a_bit, engine="vits", sample_rate=16000)
        serve_dir(mirror, fleet["published"])
        for box, daemon in zip(boxes, daemons, strict=True):
            box_get(box)

            def refused(d=daemon) -> bool:  # type: ignore[no-untyped-def]
                versions = d.request("GET", "/v1/status").json()["voices"][0]["versions"]
                return any(v["version"] == "3" and v["state"] == "refused" for v in versions)

            wait_for(refused, timeout=60, what="v3 refused")
            status = daemon.request("GET", "/v1/status").json()["voices"][0]
            v3_state = next(v for v in status["versions"] if v["version"] == "3")
            assert "model.safetensors differs from what was signed" in v3_state["reason"]
            assert status["active"] == "2"
            reply = daemon.post("/v1/synthesize", {"text": "Still two.", "voice": "tiny"})
            assert reply.status == 200 and reply.headers["x-ttsd-version"] == "2"
    finally:
        for daemon in daemons:
            daemon.stop()


def test_a_folder_with_an_empty_file_is_fetched_whole(tmp_path: Path, mirror: Mirror, fleet: dict[str, Path]) -> None:
    """A zero-byte file (an empty vocabulary, a placeholder) is fetched like any other: the
    download made no partial file for it, and get failed with exit 3 on a missing .part."""
    folder = tmp_path / "build" / "voice-1"
    folder.mkdir(parents=True)
    (folder / "a.json").write_text('{"tone": 440}')
    (folder / "empty.txt").write_bytes(b"")
    pack(folder, name="voice", version="1", engine="vits", sample_rate=8000)
    sign(folder, fleet["key"])
    publish(folder, fleet["published"])
    serve_dir(mirror, fleet["published"])
    old_umask = os.umask(0o027)
    try:
        result = get(mirror.url, tmp_path / "box", "voice", "--trusted-keys", str(fleet["trusted"]))
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    landed = tmp_path / "box" / "models" / "voice-1"
    assert (landed / "empty.txt").read_bytes() == b"" and verify(landed).version == "1"
    # readable by the daemon's group as any copied folder: the umask decides, not the private downloads
    assert {p.name: p.stat().st_mode & 0o777 for p in landed.iterdir()} == {
        name: 0o640 for name in ("a.json", "empty.txt", "ttsd.json", SIGNATURE)}
    assert landed.stat().st_mode & 0o777 == 0o750


def test_search_lists_a_fleet_mirrors_voices(tmp_path: Path, mirror: Mirror, fleet: dict[str, Path]) -> None:
    """A mirror made by publish holds ttsd-index.json, not voices.json: search lists its voices
    (name, version, signed), filters them by words, and a mirror with neither file is one line and
    exit 15."""
    signed = folder_of_two(tmp_path / "build" / "voice-2", version="2")
    sign(signed, fleet["key"])
    publish(signed, fleet["published"])
    other = tmp_path / "build" / "en_US-other-1"
    other.mkdir(parents=True)
    (other / "a.json").write_text("{}")
    pack(other, name="en_US-other", version="1", engine="vits", sample_rate=8000)
    publish(other, fleet["published"])
    serve_dir(mirror, fleet["published"])
    listed = invoke("models", "search", "--mirror", mirror.url, "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == [
        {"name": "en_US-other", "version": "1", "path": "ttsd/en_US-other/1", "share": 1.0, "withdrawn": None,
         "signed": False},
        {"name": "voice", "version": "2", "path": "ttsd/voice/2", "share": 1.0, "withdrawn": None, "signed": True},
    ]
    table = invoke("models", "search", "other", "--mirror", mirror.url)
    assert table.exit_code == 0 and "1 of 2 voices on the fleet mirror" in table.stdout, table.output
    # a version's share of boxes and a withdrawal show, a row per version
    v3 = folder_of_two(tmp_path / "build" / "voice-3", version="3")
    signed_by = ("--sign-key", str(fleet["key"]))
    assert invoke("models", "publish", str(v3), str(fleet["published"]), "--rollout", "0.05", *signed_by).exit_code == 0
    assert invoke("models", "withdraw", str(fleet["published"]), "voice", "2", "--reason", "clipped",
                  *signed_by).exit_code == 0
    serve_dir(mirror, fleet["published"])
    rows = json.loads(invoke("models", "search", "voice", "--mirror", mirror.url, "--json").stdout)
    assert [(r["version"], r["share"], r["withdrawn"]) for r in rows if r["name"] == "voice"] == [
        ("3", 0.05, None), ("2", 0.0, "clipped")]
    table = invoke("models", "search", "voice", "--mirror", mirror.url)
    assert "5%" in table.stdout and "withdrawn: clipped" in table.stdout, table.output
    assert json.loads(invoke("models", "search", "-l", "en-US", "--mirror", mirror.url, "--json").stdout)[0]["name"] \
        == "en_US-other"
    mirror.files.clear()
    one_line_error(invoke("models", "search", "--mirror", mirror.url), 15, "neither ttsd-index.json")


def test_a_copy_in_progress_is_never_moved_aside(tmp_path: Path, mirror: Mirror, fleet: dict[str, Path]) -> None:
    """A folder of the voice that would not serve is moved aside to make room (an unsigned seed),
    but not one that looks like a copy still in progress (files missing or short): someone is
    writing it. get says the place is taken, and the folder is left as it was."""
    v1 = folder_of_two(tmp_path / "build" / "voice-1")
    sign(v1, fleet["key"])
    publish(v1, fleet["published"])
    serve_dir(mirror, fleet["published"])
    box = tmp_path / "box"
    copying = box / "models" / "voice-1"
    copying.parent.mkdir(parents=True)
    shutil.copytree(v1, copying)
    (copying / "sub" / "b.dat").unlink()  # not there yet
    result = get(mirror.url, box, "voice", "--trusted-keys", str(fleet["trusted"]))
    assert result.exit_code == 3 and "already exists" in result.stderr, result.output
    assert sorted(p.name for p in (box / "models").iterdir()) == ["voice-1"]
    assert not (copying / "sub" / "b.dat").exists()


def test_a_link_where_the_new_version_goes_is_moved_aside(tmp_path: Path, mirror: Mirror,
                                                          fleet: dict[str, Path]) -> None:
    """The daemon refuses any link in the models dir: one named where get publishes (voice-1, to
    a folder elsewhere) was "already exists" once links stopped counting as refused folders. It
    is moved aside like a folder that would not serve; what it points to is untouched."""
    v1 = folder_of_two(tmp_path / "build" / "voice-1")
    sign(v1, fleet["key"])
    publish(v1, fleet["published"])
    serve_dir(mirror, fleet["published"])
    box = tmp_path / "box"
    (box / "models").mkdir(parents=True)
    elsewhere = shutil.copytree(v1, tmp_path / "elsewhere")
    (box / "models" / "voice-1").symlink_to(elsewhere)
    result = get(mirror.url, box, "voice", "--trusted-keys", str(fleet["trusted"]))
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (box / "models").iterdir())
    assert names[0].startswith(".voice-1.refused-") and names[1:] == ["voice-1"], names
    assert not (box / "models" / "voice-1").is_symlink() and (elsewhere / "ttsd.json").is_file()


def test_search_of_a_fleet_mirror_filters_by_language_and_takes_non_ascii_names(tmp_path: Path,
                                                                                 mirror: Mirror,
                                                                                 fleet: dict[str, Path]) -> None:
    """Names beyond ASCII are listed as they are; --language matches a Piper-style name's code or
    family (not any name that starts with the letters); the table shows who is signed; a broken
    index is one line and exit 15, not a fall back to voices.json."""
    for name in ("pt_PT-tugão-medium", "pt_BR-faber-medium", "enigma"):
        folder = tmp_path / "build" / f"{name}-1"
        folder.mkdir(parents=True)
        (folder / "a.json").write_text("{}")
        pack(folder, name=name, version="1", engine="vits", sample_rate=8000)
        if name == "pt_PT-tugão-medium":
            sign(folder, fleet["key"])
        publish(folder, fleet["published"])
    serve_dir(mirror, fleet["published"])

    def names(*args: str) -> list[str]:
        result = invoke("models", "search", *args, "--mirror", mirror.url, "--json")
        assert result.exit_code == 0, result.output
        return [row["name"] for row in json.loads(result.stdout)]

    assert names() == ["enigma", "pt_BR-faber-medium", "pt_PT-tugão-medium"]
    assert names("-l", "pt") == ["pt_BR-faber-medium", "pt_PT-tugão-medium"]
    assert names("-l", "pt-pt") == names("tugão") == ["pt_PT-tugão-medium"]
    assert names("-l", "en") == []  # "enigma" is no English voice
    for form in ((), ("--json",)):  # says what to drop, and why (on stderr: the JSON stays parseable)
        said = invoke("models", "search", "-l", "en", "--mirror", mirror.url, *form).stderr
        assert "without --language 'ttsd models search' lists them all (a fleet voice has a language only" in said
    table = invoke("models", "search", "-l", "pt_PT", "--mirror", mirror.url)
    assert table.exit_code == 0 and "1 of 3 voices on the fleet mirror" in table.stdout, table.output
    row = next(line for line in table.stdout.splitlines() if "tugão" in line)
    assert "yes" in row
    mirror.files[INDEX_FILE] = b'{"format": 1, "voices": {"a/b": {}}}'
    mirror.files["voices.json"] = b"{}"
    one_line_error(invoke("models", "search", "--mirror", mirror.url), 15, INDEX_FILE)


def test_a_download_broken_off_is_removed_once_the_mirror_moves_on(tmp_path: Path, mirror: Mirror,
                                                                   fleet: dict[str, Path]) -> None:
    """1. v1's download is cut off every time: get fails (exit 14) and keeps what it has to resume.
    2. The mirror publishes v2 before v1 ever arrives: the next get takes v2, and v1's download is
    removed (it stayed in the cache for good), as is one an older ttsd kept as ``NAME-VERSION``. A
    folder there that another voice of the mirror (``voice-1``, version 2), an older ttsd's
    download of another voice (``voice-2``, version 3, from another mirror sharing the cache) or a
    Piper download (``voice-medium``) could own is left alone."""
    from ttsd.fetch.prebuilt import work_folder

    assert work_folder("a", "1-2") != work_folder("a-1", "2")  # as NAME-VERSION both were a-1-2
    def release(version: str, name: str = "voice") -> Path:
        folder = tmp_path / "build" / f"{name}-{version}"
        folder.mkdir(parents=True)
        (folder / "noise.dat").write_bytes(os.urandom(200_000))
        pack(folder, name=name, version=version, engine="vits", sample_rate=8000)
        sign(folder, fleet["key"])
        publish(folder, fleet["published"])
        return folder

    release("2", name="voice-1")
    release("1")
    serve_dir(mirror, fleet["published"])
    (path,) = [p for p in mirror.files if p.endswith("voice/1/noise.dat")]
    mirror.cuts[path] = [10_000] * 20  # five connections a run: 50 kB of 200
    box = tmp_path / "box"
    downloads = box / "cache" / "downloads"
    one_line_error(get(mirror.url, box, "voice", "--trusted-keys", str(fleet["trusted"])), 14)
    assert any((downloads / "voice@1").rglob("*.part")), list(downloads.rglob("*"))
    for other in ("voice-1@2", "voice-medium"):
        (downloads / other).mkdir()
    # as an older ttsd named downloads: voice 0.5's, and voice-2 version 3's from another mirror
    # sharing the cache (its folder's name reads as voice 2-3)
    for name, version in (("voice", "0.5"), ("voice-2", "3")):
        pack_dir = downloads / f"{name}-{version}"
        pack_dir.mkdir()
        (pack_dir / "noise.dat").write_bytes(b"x")
        pack(pack_dir, name=name, version=version, engine="vits", sample_rate=8000)
    release("2")
    serve_dir(mirror, fleet["published"])
    result = get(mirror.url, box, "voice", "--upgrade", "--trusted-keys", str(fleet["trusted"]))
    assert result.exit_code == 0, result.output
    assert verify(box / "models" / "voice-2").version == "2"
    assert sorted(p.name for p in downloads.iterdir() if p.is_dir()) == ["voice-1@2", "voice-2-3", "voice-medium"], \
        list(downloads.iterdir())
