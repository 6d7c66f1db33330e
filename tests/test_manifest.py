"""The manifest refuses every way a model folder can differ from what it claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttsd.errors import ManifestError, VerifyError
from ttsd.manifest import MANIFEST, pack, read_manifest, verify


def make_folder(root: Path) -> Path:
    folder = root / "voice"
    folder.mkdir()
    (folder / "config.json").write_text('{"sampling_rate": 16000}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("hi")
    pack(folder, name="demo", version="1.2", engine="vits", sample_rate=16000, warmup=("Hi.",))
    return folder


def problems(folder: Path) -> list[str]:
    with pytest.raises(VerifyError) as info:
        verify(folder)
    return [str(p) for p in info.value.problems]


def test_pack_then_verify_round_trip(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    manifest = verify(folder)
    assert manifest.name == "demo" and manifest.version == "1.2" and manifest.warmup == ("Hi.",)
    assert set(manifest.files) == {"config.json", "model.safetensors", "sub/extra.txt"}
    data = json.loads((folder / MANIFEST).read_text())
    assert data["files"]["model.safetensors"]["size"] == 100
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_changed_byte_is_caught_even_with_same_size(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")
    assert problems(folder) == ["changed: model.safetensors (sha256 differs from manifest)"]


def test_truncated_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 50)
    assert problems(folder) == ["changed: model.safetensors (size 50, manifest says 100)"]


def test_missing_and_extra_files_are_all_named(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "config.json").unlink()
    (folder / "notes.txt").write_text("x")
    assert problems(folder) == ["extra: notes.txt (not listed in ttsd.json)", "missing: config.json"]


def test_a_directory_where_a_file_is_listed_is_no_copy_in_progress(tmp_path: Path) -> None:
    """It was reported missing, so the daemon waited out --incomplete-timeout for the copy to end
    (and then gave another reason); it is refused as what it is at once."""
    folder = make_folder(tmp_path)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(VerifyError) as info:
        verify(folder)
    assert [str(p) for p in info.value.problems] == ["unsafe: config.json (a directory, not a file)"]
    assert not info.value.looks_incomplete()


def test_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    outside = tmp_path / "secret"
    outside.write_text('{"sampling_rate": 16000}')
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    assert problems(folder) == ["unsafe: config.json (symlink)"]


def test_pickle_weights_are_refused_by_verify_and_pack(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    # said once: it was also listed as an extra file, and `ttsd models verify` counted "1 more"
    assert problems(folder) == ["pickle weights: pytorch_model.bin (only safetensors are loaded)"]
    with pytest.raises(VerifyError, match="pickle weight file"):
        pack(folder, name="demo", version="2", engine="vits", sample_rate=16000)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"name": "x"}', "missing required field 'version'"),
        ('{"name": "x", "version": "one", "engine": "vits", "sample_rate": 1, "files": {"a": {}}}', "invalid version"),
        ('{"name": "../x", "version": "1", "engine": "vits", "sample_rate": 1, "files": {}}', "invalid voice name"),
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": 1, "files": {}}', "lists no files"),
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": "fast", "files": {}}', "'sample_rate' must be a int"),
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": 1, '
         '"files": {"../etc/passwd": {"sha256": "' + "0" * 64 + '", "size": 1}}}', "not a plain path"),
        # a fetch names its partial file by the digest: a '/' in it once ended `models get` in a traceback
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": 1, '
         '"files": {"a": {"sha256": "' + "/" * 64 + '", "size": 1}}}', "needs a 64-hex 'sha256'"),
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": 1, '
         '"files": {"a": {"sha256": "' + "0" * 63 + 'g", "size": 1}}}', "needs a 64-hex 'sha256'"),
        # a path both a file and a folder: a fetch removed the file it had checked to make the folder
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": 1, "files": {'
         '"a/b": {"sha256": "' + "0" * 64 + '", "size": 1}, "a/b/c": {"sha256": "' + "0" * 64 + '", "size": 1}}}',
         "'a/b' is listed as a file and as a folder"),
        ('{"name": "x", "version": "1", "engine": "vits", "sample_rate": 1, '
         '"files": {"ttsd.json/x": {"sha256": "' + "0" * 64 + '", "size": 1}}}', "'ttsd.json' is listed as a file"),
    ],
)
def test_bad_manifests_get_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no ttsd.json"):
        verify(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_the_manifest_follows_the_umask_like_the_folder_s_other_files(tmp_path: Path, umask: int, mode: int) -> None:
    """pack wrote ttsd.json 0600 whatever the umask, while the data files were 0644: a daemon
    running as its own user (the shipped unit) could not read a folder an admin packed as root."""
    import os

    folder = tmp_path / "voice"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    old = os.umask(umask)
    try:
        pack(folder, name="v", version="1", engine="vits", sample_rate=8000)
    finally:
        os.umask(old)
    assert (folder / "ttsd.json").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("version", ["5+hotfix1", "1!2", "2.0+local.7"])
def test_a_version_no_mirror_path_can_name_is_refused(version: str) -> None:
    """``5+hotfix1`` passed pack, sign and publish; every box then refused the mirror's whole
    index (its path segment is no plain one), for every voice, until it was edited by hand."""
    from ttsd.manifest import check_version

    with pytest.raises(ManifestError, match="no local part"):
        check_version(version)
    assert check_version("2.0rc1") == "2.0rc1"


def test_a_voice_name_has_a_length_limit() -> None:
    """A name of 20,000 characters made every metric line of its voice that long, for good."""
    from ttsd.manifest import MAX_NAME, check_name

    assert check_name("v" * MAX_NAME)
    with pytest.raises(ManifestError, match="at most 100"):
        check_name("v" * (MAX_NAME + 1))
