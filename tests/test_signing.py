"""Signed model folders: ttsd and the OpenSSF ``model_signing`` tool accept each other's signatures,
and with trusted keys only folders signed by one of them, over exactly their files, ever load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fake_model, plausible, save_tiny_vits
from daemon_util import start_daemon, wait_for
from fake_engine import FakeEngine

from ttsd.errors import ConfigError, ConflictError, ManifestError, SignatureError, VerifyError
from ttsd.manifest import SIGNATURE, inspect, pack, parse_manifest, verify
from ttsd.serving.manager import ModelManager
from ttsd.serving.source import LocalFolderSource
from ttsd.serving.versions import Policy
from ttsd.signing import TrustedKeys, describe, sign

pytest.importorskip("model_signing", reason="the signing extra (model-signing) is not installed")
MODEL_SIGNING = shutil.which("model_signing", path=str(Path(sys.executable).parent))


def make_key(where: Path, name: str, curve: str = "secp256r1") -> tuple[Path, Path]:
    """A fresh elliptic-curve key pair as PEM files: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(getattr(ec, curve.upper())())
    private, public = where / f"{name}.key", where / f"{name}.pem"
    where.mkdir(parents=True, exist_ok=True)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two signers ("fleet" trusted, "stranger" not) and a trusted-keys dir holding fleet's public key."""
    fleet, fleet_pub = make_key(tmp_path / "secret", "fleet")
    stranger, _ = make_key(tmp_path / "secret", "stranger")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(fleet_pub, trusted / "fleet.pem")
    return {"fleet": fleet, "fleet_pub": fleet_pub, "stranger": stranger, "trusted": trusted}


def folder_of_two(where: Path, version: str = "1") -> Path:
    where.mkdir(parents=True)
    (where / "a.json").write_text('{"tone": 440}')
    (where / "sub").mkdir()
    (where / "sub" / "b.dat").write_bytes(bytes(range(256)) * 8)
    pack(where, name="voice", version=version, engine="vits", sample_rate=8000)
    return where


def check(folder: Path, trusted: Path) -> str:
    return str(TrustedKeys.load(trusted).check(folder, verify(folder)))


@pytest.mark.daemon
@pytest.mark.skipif(MODEL_SIGNING is None, reason="the model_signing command is not installed")
def test_ttsd_and_the_model_signing_tool_accept_each_others_signatures(tmp_path: Path,
                                                                       keys: dict[str, Path]) -> None:
    """1. ttsd signs; ``model_signing verify key`` accepts it. 2. ``model_signing sign key`` signs;
    ttsd accepts it and names the trusted key. 3. Both refuse the other's key."""
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    ok = subprocess.run([MODEL_SIGNING, "verify", "key", str(folder), "--signature", str(folder / SIGNATURE),
                         "--public_key", str(keys["fleet_pub"])], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert check(folder, keys["trusted"]).startswith("fleet (")

    (folder / SIGNATURE).unlink()
    made = subprocess.run([MODEL_SIGNING, "sign", "key", str(folder), "--signature", str(folder / SIGNATURE),
                           "--private_key", str(keys["stranger"])], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    with pytest.raises(SignatureError, match="not trusted") as info:
        check(folder, keys["trusted"])
    assert info.value.kind == "unknown_key"
    (folder / SIGNATURE).unlink()
    made = subprocess.run([MODEL_SIGNING, "sign", "key", str(folder), "--signature", str(folder / SIGNATURE),
                           "--private_key", str(keys["fleet"])], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    assert check(folder, keys["trusted"]).startswith("fleet (")
    assert describe(folder) is not None and describe(folder).hint  # type: ignore[union-attr]


def _byte_changed(folder: Path) -> None:
    data = bytearray((folder / "sub" / "b.dat").read_bytes())
    data[100] ^= 1
    (folder / "sub" / "b.dat").write_bytes(data)


def _file_added(folder: Path) -> None:
    (folder / "sub" / "extra.txt").write_text("not signed")


@pytest.mark.parametrize("tamper, repack, kind, message", [
    (lambda f: (f / SIGNATURE).unlink(), False, "unsigned", "not signed"),
    (_byte_changed, True, "mismatch", "sub/b.dat differs from what was signed"),
    (_file_added, True, "mismatch", "sub/extra.txt is not covered by the signature"),
    (lambda f: (f / SIGNATURE).write_text("garbage"), False, "invalid", "not a model-signing bundle"),
    (lambda f: (f / SIGNATURE).write_text('{"verificationMaterial": {}, "dsseEnvelope": {}}'), False,
     "invalid", "not a model-signing bundle"),
])
def test_a_folder_not_exactly_as_signed_is_refused_with_the_reason(tmp_path: Path, keys: dict[str, Path],
                                                                  tamper, repack: bool, kind: str,  # type: ignore[no-untyped-def]
                                                                  message: str) -> None:
    """A tampered folder whose manifest was rewritten to match (so the checksums pass) is caught
    by the signature alone."""
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    tamper(folder)
    if repack:
        pack(folder, name="voice", version="1", engine="vits", sample_rate=8000)
    with pytest.raises(SignatureError, match=message) as info:
        check(folder, keys["trusted"])
    assert info.value.kind == kind


def test_a_signature_that_does_not_verify_is_invalid(tmp_path: Path, keys: dict[str, Path]) -> None:
    """The envelope's signature bytes changed, the key hint still names the trusted key."""
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    bundle = json.loads((folder / SIGNATURE).read_text())
    sig = bundle["dsseEnvelope"]["signatures"][0]
    sig["sig"] = ("A" if sig["sig"][0] != "A" else "B") + sig["sig"][1:]
    (folder / SIGNATURE).write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="does not verify against the trusted key fleet") as info:
        check(folder, keys["trusted"])
    assert info.value.kind == "invalid"


def test_a_signature_leaving_a_file_out_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A signer's ignore list cannot leave a file unsigned: the signed list must be the folder's."""
    if MODEL_SIGNING is None:
        pytest.skip("the model_signing command is not installed")
    folder = folder_of_two(tmp_path / "v1")
    made = subprocess.run([MODEL_SIGNING, "sign", "key", str(folder), "--signature", str(folder / SIGNATURE),
                           "--private_key", str(keys["fleet"]), "--ignore-paths", str(folder / "a.json")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    with pytest.raises(SignatureError, match="a.json is not covered by the signature"):
        check(folder, keys["trusted"])


def test_the_signature_is_the_one_file_beyond_the_list(tmp_path: Path, keys: dict[str, Path]) -> None:
    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    inspect(folder)  # model.sig is not "extra"
    (folder / SIGNATURE).write_bytes(b" " * (2 << 20))
    with pytest.raises(VerifyError, match="larger than any signature"):
        inspect(folder)
    manifest = json.loads((folder / "ttsd.json").read_text())
    manifest["files"][SIGNATURE] = {"sha256": "0" * 64, "size": 1}
    with pytest.raises(ManifestError, match="cannot be listed"):
        parse_manifest(manifest)


def test_trusted_keys_must_be_usable_public_keys(tmp_path: Path, keys: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no public keys"):
        TrustedKeys.load(empty)
    with pytest.raises(ConfigError, match="not a directory"):
        TrustedKeys.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="junk.pem is not a supported public key"):
        TrustedKeys.load(bad)
    shutil.copy(keys["fleet"], bad / "junk.pem")  # a private key where a public one belongs
    with pytest.raises(ConfigError, match="not a supported public key"):
        TrustedKeys.load(bad)


def trusting_manager(tmp_path: Path, trusted: Path) -> ModelManager:
    source = LocalFolderSource(tmp_path / "models", settle=0.0, incomplete_timeout=60.0)
    return ModelManager(source, state_dir=tmp_path / "state", policy=Policy(settle=0.0),
                        trust=TrustedKeys.load(trusted))


@pytest.mark.slow
def test_with_trusted_keys_only_signed_versions_load_and_the_active_keeps_serving(
        tmp_path: Path, keys: dict[str, Path], fake_engines: None) -> None:
    """1. A signed v1 serves, its signer shown. 2. An unsigned v2 is refused (never loaded) and v1
    serves on. 3. v2 signed by a stranger: refused again, as an unknown key. 4. v2 signed by the
    fleet key in place: judged again, and it serves. 5. After a restart with the key gone from the
    trusted dir, nothing signed by it loads. 6. With the key back, a restart serves v2 again: a
    refusal for the signature is not kept across restarts, since the keys may change with them."""
    models = tmp_path / "models"
    sign(fake_model(models, "voice", "1"), keys["fleet"])
    manager = trusting_manager(tmp_path, keys["trusted"])
    manager.start()
    voice = manager.snapshot()[0]
    assert voice["active"] == "1" and voice["versions"][0]["signer"].startswith("fleet (")

    v2 = fake_model(models, "voice", "2")
    loads = FakeEngine.loads
    manager.reconcile()
    versions = {v["version"]: v for v in manager.snapshot()[0]["versions"]}
    assert manager.snapshot()[0]["active"] == "1"
    assert versions["2"]["state"] == "refused" and "signature: not signed" in versions["2"]["reason"]
    assert FakeEngine.loads == loads  # refused before it was loaded
    manager.reconcile()
    assert FakeEngine.loads == loads  # and not looked at again while unchanged

    sign(v2, keys["stranger"])
    manager.reconcile()
    versions = {v["version"]: v for v in manager.snapshot()[0]["versions"]}
    assert versions["2"]["state"] == "refused" and "not trusted" in versions["2"]["reason"]
    assert manager.snapshot()[0]["active"] == "1"

    sign(v2, keys["fleet"])
    manager.reconcile()
    assert manager.snapshot()[0]["active"] == "2"
    with manager.acquire("voice") as lease:
        assert lease.voice.version == "2"
    manager.close()

    _, other_pub = make_key(tmp_path / "secret", "other")
    shutil.copy(other_pub, keys["trusted"] / "fleet.pem")  # the fleet key is no longer trusted
    restarted = trusting_manager(tmp_path, keys["trusted"])
    restarted.start()
    assert restarted.snapshot()[0]["active"] is None
    assert all(v["state"] == "refused" for v in restarted.snapshot()[0]["versions"])
    restarted.close()

    shutil.copy(keys["fleet_pub"], keys["trusted"] / "fleet.pem")  # trusted again: the refusals were
    again = trusting_manager(tmp_path, keys["trusted"])            # the keys', not the folders'
    again.start()
    assert again.snapshot()[0]["active"] == "2"
    again.close()


@pytest.mark.daemon
def test_a_daemon_with_trusted_keys_serves_a_folder_signed_by_the_tool_and_refuses_others(
        tmp_path: Path, keys: dict[str, Path], cache_dir: Path) -> None:
    """The real daemon: a tiny VITS voice signed by ``model_signing sign key`` serves; a v2 of it
    whose weights were changed after signing (manifest rewritten to match) is refused with the
    reason, counted in /metrics, and v1 keeps serving."""
    if MODEL_SIGNING is None:
        pytest.skip("the model_signing command is not installed")
    models = tmp_path / "models"
    v1 = save_tiny_vits(models / "tiny-1", version="1", edit=plausible, noise_scale_duration=0.0)
    made = subprocess.run([MODEL_SIGNING, "sign", "key", str(v1), "--signature", str(v1 / SIGNATURE),
                           "--private_key", str(keys["fleet"])], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    daemon = start_daemon(tmp_path, cache_dir, "--trusted-keys", str(keys["trusted"]), "--no-seed",
                          "--settle", "0.2", "--rescan-interval", "0.5", models=models)
    try:
        reply = daemon.post("/v1/synthesize", {"text": "Hello.", "voice": "tiny"})
        assert reply.status == 200 and reply.headers["x-ttsd-version"] == "1"

        staged = tmp_path / "staging" / "tiny-2"
        save_tiny_vits(staged, version="2", seed=1, edit=plausible, noise_scale_duration=0.0)
        sign(staged, keys["fleet"])
        weights = staged / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(data)
        pack(staged, name="tiny", version="2", engine="vits", sample_rate=16000)
        staged.rename(models / "tiny-2")

        def refused() -> bool:
            versions = {v["version"]: v for v in daemon.request("GET", "/v1/status").json()["voices"][0]["versions"]}
            return versions.get("2", {}).get("state") == "refused"

        wait_for(refused, timeout=60, what="v2 refused")
        status = daemon.request("GET", "/v1/status").json()["voices"][0]
        v2 = next(v for v in status["versions"] if v["version"] == "2")
        assert "model.safetensors differs from what was signed" in v2["reason"]
        assert status["active"] == "1"
        assert daemon.metric("ttsd_signature_failures_total", voice="tiny", reason="mismatch") == 1
        reply = daemon.post("/v1/synthesize", {"text": "Still here.", "voice": "tiny"})
        assert reply.status == 200 and reply.headers["x-ttsd-version"] == "1"
    finally:
        daemon.stop()


@pytest.mark.slow
def test_the_cli_signs_verifies_and_lists_signers(tmp_path: Path, keys: dict[str, Path],
                                                 cli_env: dict[str, str]) -> None:
    """``ttsd models sign``, ``verify --trusted-keys`` (one line and exit 18 when it fails) and
    ``list`` with the signer column, without a daemon."""
    from test_cli import assert_one_line_error, run

    models = tmp_path / "models"
    folder = folder_of_two(models / "voice-1")
    said = run(["models", "verify", str(folder)], cli_env)
    assert said.returncode == 0 and (said.stdout + said.stderr).decode().rstrip().endswith("unsigned)")
    signed = run(["models", "sign", str(folder), "--key", str(keys["fleet"])], cli_env)
    assert signed.returncode == 0 and b"model.sig: signed (key " in signed.stdout + signed.stderr
    ok = run(["models", "verify", str(folder), "--trusted-keys", str(keys["trusted"])], cli_env)
    assert ok.returncode == 0 and b"signed by fleet (" in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    listed = run(["models", "list", "--models", str(models), "--json", "--socket", str(tmp_path / "none.sock")],
                 cli_env)
    assert json.loads(listed.stdout)[0]["signer"].startswith("unverified, key ")

    run(["models", "sign", str(folder), "--key", str(keys["stranger"])], cli_env)
    assert_one_line_error(run(["models", "verify", str(folder), "--trusted-keys", str(keys["trusted"])], cli_env),
                          18, "signature: signed by a key that is not trusted")
    assert_one_line_error(run(["models", "sign", str(folder), "--key", str(tmp_path / "nokey.pem")], cli_env),
                          3, "not a usable private key")
    _file_added(folder)  # not in the manifest: the folder is refused before any signing
    assert_one_line_error(run(["models", "sign", str(folder), "--key", str(keys["fleet"])], cli_env),
                          6, "extra: sub/extra.txt")


@pytest.mark.slow
def test_a_key_removed_from_the_trusted_dir_stops_loading_at_once(tmp_path: Path, keys: dict[str, Path],
                                                                   fake_engines: None) -> None:
    """The docs say a key change counts "at the next load": the dir is read at each load, not once.
    1. v1 and v2 signed by the fleet key; v2 serves (keep 0: v1 is not loaded). 2. The fleet key
    is replaced in the trusted dir, the daemon not restarted. 3. v3, signed by the old fleet key,
    is refused at its load. 4. Activating v1 means a load: refused as untrusted, nothing changes."""
    models = tmp_path / "models"
    sign(fake_model(models, "voice", "1"), keys["fleet"])
    manager = ModelManager(LocalFolderSource(models, settle=0.0), state_dir=tmp_path / "state",
                           policy=Policy(settle=0.0, keep=0), trust=TrustedKeys.load(keys["trusted"]),
                           spawn=lambda fn: fn())
    manager.start()
    sign(fake_model(models, "voice", "2"), keys["fleet"])
    manager.reconcile()
    assert manager.snapshot()[0]["active"] == "2"

    _, other_pub = make_key(tmp_path / "secret", "other")
    shutil.copy(other_pub, keys["trusted"] / "fleet.pem")
    sign(fake_model(models, "voice", "3"), keys["fleet"])
    manager.reconcile()
    versions = {v["version"]: v for v in manager.snapshot()[0]["versions"]}
    assert manager.snapshot()[0]["active"] == "2"
    assert versions["3"]["state"] == "refused" and "not trusted" in versions["3"]["reason"]
    assert versions["1"]["state"] == "available"  # keep=0: not loaded
    loads = FakeEngine.loads
    with pytest.raises(ConflictError, match="not trusted"):
        manager.activate("voice", "1")
    assert manager.snapshot()[0]["active"] == "2" and FakeEngine.loads == loads
    manager.close()


def test_publish_refuses_a_folder_its_signature_no_longer_covers(tmp_path: Path, keys: dict[str, Path]) -> None:
    """``ttsd.json`` edited after signing (the checksums still pass): publish says so with exit 18
    and leaves the mirror as it was, since every box would refuse the folder; signed again, it is
    published. No key is needed for this check: it is the file list, not the signature's maker."""
    from click.testing import CliRunner

    from ttsd.cli import main

    folder = folder_of_two(tmp_path / "v1")
    sign(folder, keys["fleet"])
    manifest = json.loads((folder / "ttsd.json").read_text())
    manifest["license"] = "edited after signing"
    (folder / "ttsd.json").write_text(json.dumps(manifest))
    verify(folder)  # the folder itself is whole: only its signature is stale
    mirror = tmp_path / "mirror"
    runner = CliRunner()
    refused = runner.invoke(main, ["models", "publish", str(folder), str(mirror)])
    assert refused.exit_code == 18, refused.output
    assert "ttsd.json differs from what was signed" in refused.output
    assert not (mirror / "ttsd-index.json").exists() and not (mirror / "ttsd").exists()

    sign(folder, keys["fleet"])
    published = runner.invoke(main, ["models", "publish", str(folder), str(mirror)])
    assert published.exit_code == 0 and "voice 1, signed" in published.output, published.output


def test_a_signing_library_that_cannot_be_imported_is_named_with_its_error(
        tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """model-signing imports pyOpenSSL when it is imported: installed without it, the library
    fails to import, and the message must carry that error, not only "install model-signing"."""
    monkeypatch.setitem(sys.modules, "OpenSSL", None)  # as on a box where pyOpenSSL is missing
    for name in [m for m in sys.modules if m.startswith("model_signing")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError) as info:
        TrustedKeys.load(keys["trusted"])
    assert "signing extra, or pip install 'model-signing>=1.1,<2' pyopenssl" in str(info.value)
    assert "(import of OpenSSL halted" in str(info.value), info.value  # the error itself, not just advice


@pytest.mark.parametrize("signer", [None, "stranger"])
def test_under_the_memory_policy_an_unsigned_folder_never_unloads_the_serving_version(
        tmp_path: Path, keys: dict[str, Path], fake_engines: None, signer: str | None) -> None:
    """--swap-policy memory with --trusted-keys: the new version's signature is checked before the
    serving version is unloaded. It was checked after, at load, so an unsigned (or stranger-signed)
    folder unloaded v1, was refused, and v1 loaded again: requests got 503 meanwhile, and 404 for
    a moment after the refusal."""
    models = tmp_path / "models"
    sign(fake_model(models, "voice", "1"), keys["fleet"])
    manager = ModelManager(LocalFolderSource(models, settle=0.0), state_dir=tmp_path / "state",
                           policy=Policy(settle=0.0, swap="memory"), trust=TrustedKeys.load(keys["trusted"]))
    manager.start()
    loads = FakeEngine.loads
    bad = fake_model(models, "voice", "2")
    if signer is not None:
        sign(bad, keys[signer])
    manager.reconcile()
    voice = manager.snapshot()[0]
    states = {v["version"]: v["state"] for v in voice["versions"]}
    assert voice["active"] == "1" and states["2"] == "refused" and FakeEngine.loads == loads, states
    with manager.acquire("voice") as lease:
        assert lease.voice.version == "1"
    manager.close()


def test_a_password_protected_key_signs_and_a_bad_key_changes_nothing(tmp_path: Path, keys: dict[str, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """1. A key encrypted with a password signs with TTSD_SIGN_KEY_PASSWORD (it never did: the
    password reached the key reader as text). Without the password, or with a wrong one, exit 3.
    2. ``models pack --sign-key`` with a key that cannot sign is refused before ttsd.json is
    rewritten (it was rewritten, then the old signature no longer matched it). 3. A FIFO given as
    the key is refused at once, not waited on."""
    from click.testing import CliRunner
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ttsd.cli import main

    locked = tmp_path / "secret" / "locked.key"
    key = serialization.load_pem_private_key(keys["fleet"].read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"s3cret pass")))
    folder = folder_of_two(tmp_path / "v1")
    runner = CliRunner()
    for password in (None, "wrong"):
        if password is None:
            monkeypatch.delenv("TTSD_SIGN_KEY_PASSWORD", raising=False)
        else:
            monkeypatch.setenv("TTSD_SIGN_KEY_PASSWORD", password)
        refused = runner.invoke(main, ["models", "sign", str(folder), "--key", str(locked)])
        assert refused.exit_code == 3 and "not a usable private key" in refused.output, refused.output
        assert not (folder / "model.sig").exists()
    monkeypatch.setenv("TTSD_SIGN_KEY_PASSWORD", "s3cret pass")
    signed = runner.invoke(main, ["models", "sign", str(folder), "--key", str(locked)])
    assert signed.exit_code == 0, signed.output
    assert check(folder, keys["trusted"]).startswith("fleet (")

    before = (folder / "ttsd.json").read_bytes()
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    for bad in (tmp_path / "missing.key", fifo, keys["fleet_pub"]):
        refused = runner.invoke(main, ["models", "pack", str(folder), "--version", "2", "--sign-key", str(bad)])
        assert refused.exit_code == 3 and "not a usable private key" in refused.output, (bad, refused.output)
        assert (folder / "ttsd.json").read_bytes() == before, bad
    assert check(folder, keys["trusted"]).startswith("fleet (")


def test_a_key_through_a_pipe_signs(tmp_path: Path, keys: dict[str, Path]) -> None:
    """``--key <(gpg -d fleet.key.gpg)``: the key comes through a pipe, read once (model_signing
    is handed it from memory, not the path, which it would read again and find empty)."""
    import threading

    from click.testing import CliRunner

    from ttsd.cli import main

    folder = folder_of_two(tmp_path / "v1")
    for command in (["models", "sign", str(folder), "--key"],
                    # pack checks the key before it writes ttsd.json, then signs with what it read
                    ["models", "pack", str(folder), "--version", "2", "--sign-key"]):
        read_end, write_end = os.pipe()
        feeder = threading.Thread(target=lambda w=write_end: (os.write(w, keys["fleet"].read_bytes()), os.close(w)))
        feeder.start()
        try:
            signed = CliRunner().invoke(main, [*command, f"/dev/fd/{read_end}"])
        finally:
            feeder.join(5)
            os.close(read_end)
        assert signed.exit_code == 0, (command, signed.output)
        assert check(folder, keys["trusted"]).startswith("fleet (")
    assert json.loads((folder / "ttsd.json").read_text())["version"] == "2"


def test_a_key_of_another_kind_is_one_line_and_changes_nothing(tmp_path: Path, keys: dict[str, Path]) -> None:
    """An RSA or Ed25519 key: ``models sign`` and ``pack --sign-key`` ended in an internal error
    (the library's AttributeError, exit 1); ``publish --sign-key`` refused it only after copying
    the folder into the mirror; an RSA public key among the trusted ones was named with Python's
    words. Each is one line, exit 3, and nothing is written."""
    from click.testing import CliRunner
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from ttsd.cli import main

    runner = CliRunner()
    folder = folder_of_two(tmp_path / "v1")
    before = (folder / "ttsd.json").read_bytes()
    mirror = tmp_path / "mirror"
    for kind, key in (("rsa", rsa.generate_private_key(65537, 2048)), ("ed25519", ed25519.Ed25519PrivateKey.generate())):
        path = tmp_path / f"{kind}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        for args in (["models", "sign", str(folder), "--key", str(path)],
                     ["models", "pack", str(folder), "--version", "2", "--sign-key", str(path)],
                     ["models", "publish", str(folder), str(mirror), "--sign-key", str(path)]):
            refused = runner.invoke(main, args)
            assert refused.exit_code == 3 and "elliptic-curve" in refused.output, (kind, args, refused.output)
            assert "AttributeError" not in refused.output and "internal error" not in refused.output
        assert (folder / "ttsd.json").read_bytes() == before and not (folder / "model.sig").exists()
        assert not list(mirror.rglob("ttsd.json")), list(mirror.rglob("*"))
    trusted = tmp_path / "trusted-rsa"
    trusted.mkdir()
    (trusted / "rsa.pem").write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="rsa.pem is not an elliptic-curve public key"):
        TrustedKeys.load(trusted)
