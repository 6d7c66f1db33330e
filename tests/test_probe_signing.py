"""Signed model folders and the fleet mirror, attacked: each test is an attack a security probe
tried. Five found holes that are now closed (get --trusted-keys falling back to an unsigned
conversion, a junk model.sig beside a good folder, negative manifest sizes, model.sig read twice,
RSA/Ed25519 keys crashing the key loader); the rest held from the start."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_server import Mirror, VoiceFiles, add_voice, serve, serve_dir
from conftest import fake_model
from test_catalog import get, nothing_in_models
from test_signing import check, folder_of_two, make_key, trusting_manager

from ttsd.errors import (
    CatalogError,
    ConfigError,
    ManifestError,
    ResourceError,
    SignatureError,
    VerifyError,
)
from ttsd.fetch.download import Mirror as DlMirror
from ttsd.fetch.prebuilt import INDEX_FILE, get_prebuilt, parse_index
from ttsd.manifest import MANIFEST, SIGNATURE, inspect, pack, parse_manifest, verify
from ttsd.signing import TrustedKeys, sign

pytest.importorskip("model_signing", reason="the signing extra (model-signing) is not installed")


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    with serve() as m:
        yield m


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    fleet, fleet_pub = make_key(tmp_path / "secret", "fleet")
    stranger, stranger_pub = make_key(tmp_path / "secret", "stranger")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(fleet_pub, trusted / "fleet.pem")
    return {"fleet": fleet, "stranger": stranger, "stranger_pub": stranger_pub, "trusted": trusted}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# == holes ======================================================================================

@pytest.mark.slow
def test_get_with_trusted_keys_never_lands_an_unsigned_piper_conversion(
        tmp_path: Path, mirror: Mirror, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror (hostile, or just one whose ttsd-index.json was deleted / is 404 on a MITM'd http
    link) serves only a Piper voices.json: the box converts it and publishes an unsigned folder in
    /models although the timer runs with TTSD_TRUSTED_KEYS. (A fake conversion stands in for torch.)"""
    import ttsd.voices

    def fake_import(onnx: Path, out: Path, *, name: str, version: str, **_: Any) -> Any:
        out.mkdir(parents=True)
        (out / "weights.safetensors").write_bytes(onnx.read_bytes()[:100])
        return pack(out, name=name, version=version, engine="vits", sample_rate=22050)

    monkeypatch.setattr(ttsd.voices, "import_piper", fake_import)
    voices: dict[str, Any] = {}
    key = "en_US-joe-medium"
    add_voice(mirror, voices, key, VoiceFiles(onnx=os.urandom(4000), config=b'{"audio": {"sample_rate": 22050}}',
                                              card=b"* License: CC0\n"))
    mirror.publish(voices)  # no ttsd-index.json: plain Piper mirror
    result = get(mirror.url, tmp_path, key, "--trusted-keys", str(keys["trusted"]))
    assert result.exit_code == 18, result.output  # fails today: exit 0, folder published unsigned
    nothing_in_models(tmp_path)


@pytest.mark.slow
def test_a_negative_size_cannot_defeat_the_free_space_check(
        tmp_path: Path, mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    big = os.urandom(8 << 20)
    files = {"big.safetensors": {"sha256": sha(big), "size": len(big)},
             "z.json": {"sha256": "0" * 64, "size": -(1 << 40)}}
    manifest = json.dumps({"format": 1, "name": "voice", "version": "1", "engine": "vits", "sample_rate": 8000,
                           "files": files}).encode()
    mirror.files.update({"ttsd/voice/1/ttsd.json": manifest, "ttsd/voice/1/big.safetensors": big})
    mirror.files[INDEX_FILE] = json.dumps({"format": 1, "voices": {"voice": {
        "version": "1", "path": "ttsd/voice/1", "manifest": {"size": len(manifest), "sha256": sha(manifest)}}}}
    ).encode()
    from ttsd.fetch import prebuilt

    class Usage:
        free = 20 << 20  # 2 * 8 MiB + 16 MiB would be needed for big.safetensors alone

    monkeypatch.setattr(prebuilt.shutil, "disk_usage", lambda _p: Usage())
    entry = parse_index(mirror.files[INDEX_FILE], INDEX_FILE)["voice"].newest()
    assert entry is not None
    with pytest.raises((ResourceError, CatalogError, ManifestError)):
        try:
            get_prebuilt(entry, models=tmp_path / "models", downloads=tmp_path / "dl",
                         mirror=DlMirror.parse(mirror.url, 10), upgrade=False, have=None)
        finally:
            assert mirror.fetched("ttsd/voice/1/big.safetensors") == [], "8 MiB fetched past the space check"


@pytest.mark.slow
def test_a_junk_signature_in_the_models_dir_cannot_brick_a_validly_signed_store_copy(
        tmp_path: Path, keys: dict[str, Path], fake_engines: None) -> None:
    """v1, signed by the fleet, serves from its store copy. Someone who can write /models puts junk
    in models/voice-1/model.sig, then removes it again. After a restart the store copy (bytes and
    signature both checked when it came in) should still serve; it is refused forever instead,
    since the junk was copied over the store's signature and a folder without one 'leaves the
    copy's alone'."""
    models = tmp_path / "models"
    v1 = fake_model(models, "voice", "1")
    sign(v1, keys["fleet"])
    manager = trusting_manager(tmp_path, keys["trusted"])
    manager.start()
    assert manager.snapshot()[0]["active"] == "1"
    manager.close()

    (v1 / SIGNATURE).write_text('{"not": "a bundle"}')
    restarted = trusting_manager(tmp_path, keys["trusted"])
    restarted.start()
    first = restarted.snapshot()[0]
    restarted.close()
    # already here the voice is dark: the junk replaced the store copy's signature
    assert first["active"] == "1", first["versions"]
    (v1 / SIGNATURE).unlink()  # the junk is gone from /models
    again = trusting_manager(tmp_path, keys["trusted"])
    again.start()
    try:
        voice = again.snapshot()[0]
        assert voice["active"] == "1", voice["versions"]
    finally:
        again.close()


def test_check_parses_the_bytes_it_bounded_not_the_path_again(
        tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulates the race (a swap between the two reads) with a hook on claimed_hint: model.sig
    becomes a symlink to a 50 MB file outside the folder. ttsd must not read it."""
    from ttsd import signing

    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    manifest = verify(folder)
    outside = tmp_path / "outside.sig"
    outside.write_bytes(b" " * (50 << 20) + (folder / SIGNATURE).read_bytes())
    real = signing.claimed_hint
    opened: list[str] = []

    def swap(data: bytes) -> str:
        (folder / SIGNATURE).unlink()
        (folder / SIGNATURE).symlink_to(outside)
        return real(data)

    real_read_text = Path.read_text

    def spy(self: Path, *a: Any, **k: Any) -> str:
        opened.append(os.path.realpath(self))
        return real_read_text(self, *a, **k)

    monkeypatch.setattr(signing, "claimed_hint", swap)
    monkeypatch.setattr(Path, "read_text", spy)
    try:
        TrustedKeys.load(keys["trusted"]).check(folder, manifest)
    except SignatureError:
        pass
    assert str(outside) not in opened, "followed model.sig's symlink and read 50 MB"


# == held =======================================================================================

def test_replayed_signature_from_another_version_or_voice_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    old = folder_of_two(tmp_path / "v1")
    sign(old, keys["fleet"])
    new = folder_of_two(tmp_path / "v2", version="2")  # same files, other ttsd.json
    shutil.copy(old / SIGNATURE, new / SIGNATURE)
    with pytest.raises(SignatureError, match="ttsd.json differs") as info:
        check(new, keys["trusted"])
    assert info.value.kind == "mismatch"


@pytest.mark.parametrize("spoil, message", [
    (lambda b: b["dsseEnvelope"].update(signatures=[]), "does not verify"),
    (lambda b: b["verificationMaterial"]["publicKey"].pop("hint"), "does not verify against any trusted key"),
    (lambda b: b["verificationMaterial"]["publicKey"].update(hint="A" * 64), "does not verify"),
])
def test_envelope_games_with_a_strangers_signature(tmp_path: Path, keys: dict[str, Path], spoil,  # type: ignore[no-untyped-def]
                                                   message: str) -> None:
    """Signed by the stranger; the hint removed / spoofed / signatures emptied: never accepted."""
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["stranger"])
    bundle = json.loads((folder / SIGNATURE).read_text())
    spoil(bundle)
    (folder / SIGNATURE).write_text(json.dumps(bundle))
    with pytest.raises(SignatureError):
        check(folder, keys["trusted"])


def test_trusted_hint_on_a_strangers_envelope_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    trusted_hint = json.loads((folder / SIGNATURE).read_text())["verificationMaterial"]["publicKey"]["hint"]
    sign(folder, keys["stranger"])
    bundle = json.loads((folder / SIGNATURE).read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = trusted_hint
    (folder / SIGNATURE).write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="does not verify against the trusted key fleet"):
        check(folder, keys["trusted"])


def test_deep_or_odd_model_sig_is_refused_cleanly(tmp_path: Path, keys: dict[str, Path]) -> None:
    folder = folder_of_two(tmp_path / "v1")
    for body in ("[" * 100_000 + "]" * 100_000, '{"verificationMaterial": {"publicKey": {"hint": 1}}}', "\xff"):
        (folder / SIGNATURE).write_text(body, errors="surrogateescape")
        with pytest.raises(SignatureError):
            check(folder, keys["trusted"])


@pytest.mark.parametrize("make", ["symlink", "fifo", "dir"])
def test_model_sig_not_a_regular_file_is_refused(tmp_path: Path, keys: dict[str, Path], make: str) -> None:
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    good = tmp_path / "good.sig"
    shutil.move(folder / SIGNATURE, good)
    if make == "symlink":
        (folder / SIGNATURE).symlink_to(good)
    elif make == "fifo":
        os.mkfifo(folder / SIGNATURE)
    else:
        (folder / SIGNATURE).mkdir()
        (folder / SIGNATURE / "x").write_text("x")
    with pytest.raises(VerifyError):
        inspect(folder)


@pytest.mark.parametrize("rel", ["../x", "./a.json", "/etc/passwd", "a//b", MANIFEST, SIGNATURE])
def test_manifest_paths_that_escape_or_collide_are_refused(rel: str) -> None:
    data = {"name": "voice", "version": "1", "engine": "vits", "sample_rate": 8000,
            "files": {rel: {"sha256": "0" * 64, "size": 1}}}
    with pytest.raises(ManifestError):
        parse_manifest(data)


@pytest.mark.parametrize("path", ["../x", "ttsd/../../x", "/abs", "ttsd\\..\\x", "%2e%2e/x", "a/./b"])
def test_index_paths_that_escape_are_refused(path: str) -> None:
    raw = json.dumps({"format": 1, "voices": {"voice": {"version": "1", "path": path,
                                                       "manifest": {"size": 10, "sha256": "0" * 64}}}})
    with pytest.raises(CatalogError):
        parse_index(raw.encode(), INDEX_FILE)


@pytest.mark.slow
def test_index_naming_another_voice_than_its_manifest_is_refused(tmp_path: Path, mirror: Mirror,
                                                                 keys: dict[str, Path]) -> None:
    folder = folder_of_two(tmp_path / "build" / "voice-1")
    sign(folder, keys["fleet"])
    from ttsd.fetch.index_signature import sign_index
    from ttsd.fetch.prebuilt import publish

    publish(folder, tmp_path / "pub")
    index = json.loads((tmp_path / "pub" / INDEX_FILE).read_text())
    index["voices"]["other"] = index["voices"].pop("voice")
    index = sign_index(index, keys["fleet"])  # the fleet itself signed that mistake
    serve_dir(mirror, tmp_path / "pub")
    mirror.files[INDEX_FILE] = json.dumps(index).encode()
    result = get(mirror.url, tmp_path / "box", "other", "--trusted-keys", str(keys["trusted"]))
    assert result.exit_code == 15 and "the index says other" in result.stderr, result.output
    nothing_in_models(tmp_path / "box")


def test_trusted_keys_may_be_links_to_files_but_nothing_else(tmp_path: Path, keys: dict[str, Path]) -> None:
    """The keys dir is the operator's config, and a mounted secret (Kubernetes) is links: a link
    to a key file loads; a link to a directory or a device is refused."""
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "fleet.pem").symlink_to(keys["trusted"] / "fleet.pem")
    assert [k["key"] for k in TrustedKeys.load(linked).describe()] == ["fleet"]
    (linked / "dir.pem").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="not a regular file"):
        TrustedKeys.load(linked)
    (linked / "dir.pem").unlink()
    (linked / "zero.pem").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        TrustedKeys.load(linked)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_trusted_keys_dir_with_a_non_ec_key_is_a_config_error(tmp_path: Path, kind: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ed25519.Ed25519PrivateKey.generate()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "k.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="not an elliptic-curve public key"):
        TrustedKeys.load(odd)
