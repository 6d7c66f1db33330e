"""Signed model folders: who made a folder, not just that it is complete.

A signature is ``model.sig`` inside the folder, in the OpenSSF model-signing format (PyPI
``model-signing``): a Sigstore bundle whose DSSE envelope signs an in-toto statement listing every
file of the folder with its sha256. ttsd reads and writes it with that library (the optional
``signing`` extra), never by hand, so ``model_signing sign key`` / ``verify key`` and ttsd agree:

* ``sign`` signs a folder with an elliptic-curve private key, as ``model_signing sign key`` does
  (the signature file itself left out of what is signed);
* ``TrustedKeys.check`` verifies a folder's signature against the operator's public keys and then
  asks more of it than the library does: the signed file list must be *exactly* the folder's
  (``ttsd.json`` and every file it lists; a signer's ignore list cannot leave one out), each with
  the sha256 the store has just verified the bytes against. So a verified folder is, byte for byte,
  what the key's holder signed.

Who calls what: the manager checks a store copy (private, hashed on the way in) right before it
loads it, from its loader thread; the CLI checks folders for ``ttsd models verify``. Failures are
``SignatureError`` with a ``kind`` (``unsigned``, ``unknown_key``, ``invalid``, ``mismatch``,
``unsupported``), a fault of the folder: it is refused and the active version keeps serving.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, SignatureError
from .manifest import (
    MANIFEST,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    Manifest,
    hash_fd,
    open_beneath,
)
from .safe_read import read_small

MAX_KEYS = 100  # public keys in a trusted-keys dir
MAX_KEY_BYTES = 64 * 1024
HINT_CHARS = 12  # of the key hint shown to people: sha256 of the public key's PEM, as model-signing records it

_MISSING = (
    "ttsd's signature support needs the model-signing library and pyOpenSSL: ttsd's signing extra, or "
    "pip install 'model-signing>=1.1,<2' pyopenssl"
)


def _library() -> Any:
    """The model-signing modules ttsd uses; ``ConfigError`` with the fix when they cannot be
    imported. The import error itself is part of the message: model-signing imports pyOpenSSL (and
    more) when it is imported, so an installed library can still fail to import, and "not
    installed" alone would send the operator looking in the wrong place."""
    try:
        from model_signing import hashing, signing
        from model_signing._signing import sign_ec_key, sign_sigstore_pb
    except ImportError as exc:
        raise ConfigError(f"{_MISSING} ({_first_line(exc)})") from exc
    return hashing, signing, sign_ec_key, sign_sigstore_pb


@dataclass(frozen=True)
class Signer:
    """Who signed a folder: the trusted key's file name (without ``.pem``; empty when the key is
    not one ttsd trusts) and the key hint from the signature."""

    key: str
    hint: str

    def __str__(self) -> str:
        short = self.hint[:HINT_CHARS] or "no hint"
        return f"{self.key} ({short})" if self.key else f"unverified, key {short}"


def key_hint(pem: bytes) -> str:
    """model-signing's key hint: the sha256 of the public key's PEM (SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(pem)
    raw = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(raw).hexdigest()


def read_signature(folder: Path) -> bytes | None:
    """The folder's ``model.sig`` bytes (opened without following a link, bounded), or None."""
    try:
        root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        fd = open_beneath(root, SIGNATURE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SignatureError("unsupported", f"{SIGNATURE} cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(root)
    try:
        data = os.read(fd, MAX_SIGNATURE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError("unsupported", f"{SIGNATURE} is larger than any signature")
    return data


def signature_digest(folder: Path) -> str:
    """sha256 of the folder's ``model.sig`` ("" when it has none or it cannot be read): tells the
    manager that a folder refused for its signature has a new one."""
    try:
        data = read_signature(folder)
    except (SignatureError, OSError):
        return ""
    return hashlib.sha256(data).hexdigest() if data is not None else ""


def claimed_hint(data: bytes) -> str:
    """The key hint a signature names (not verified): what ``ttsd models list`` shows for a signed
    folder when no keys are trusted. "" when the bundle has none or is not one."""
    try:
        hint = json.loads(data)["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return ""
    return hint.lower() if isinstance(hint, str) and len(hint) == 64 and _is_hex(hint) else ""


def describe(folder: Path) -> Signer | None:
    """What a folder's signature claims, unverified: None when it has no ``model.sig``."""
    try:
        data = read_signature(folder)
    except (SignatureError, OSError):
        return Signer("", "")
    return None if data is None else Signer("", claimed_hint(data))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


class TrustedKeys:
    """The public keys a daemon trusts (``--trusted-keys DIR``: PEM files, one key each), by hint."""

    def __init__(self, keys: dict[str, tuple[str, Any]], where: Path, pems: dict[str, bytes] | None = None) -> None:
        self.keys = keys  # hint -> (name, model-signing verifier)
        self.where = where
        self._pems = pems or {}  # hint -> the public key's PEM (a fleet index's signature: fetch.index_signature)

    def public_keys(self) -> dict[str, tuple[str, bytes]]:
        """hint -> (name, PEM) of every trusted key."""
        return {hint: (self.keys[hint][0], pem) for hint, pem in self._pems.items() if hint in self.keys}

    @classmethod
    def load(cls, directory: Path) -> TrustedKeys:
        """Every ``*.pem`` public key in ``directory``; ``ConfigError`` naming the first file that
        is not one, or when there is none (a daemon that trusts no key could load nothing)."""
        _, _, sign_ec_key, _ = _library()
        if not directory.is_dir():
            raise ConfigError(f"--trusted-keys {directory}: not a directory")
        keys: dict[str, tuple[str, Any]] = {}
        pems: dict[str, bytes] = {}
        files = sorted(p for p in directory.iterdir() if p.suffix == ".pem" and not p.name.startswith("."))
        if len(files) > MAX_KEYS:
            raise ConfigError(f"--trusted-keys {directory}: more than {MAX_KEYS} keys")
        for path in files:
            try:  # links are followed here: the dir is the operator's (a mounted secret is links)
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise ConfigError(f"--trusted-keys: {path} is not a regular file")
                    pem = os.read(fd, MAX_KEY_BYTES + 1)
                finally:
                    os.close(fd)
                if len(pem) > MAX_KEY_BYTES:
                    raise ConfigError(f"--trusted-keys: {path} is too large for a public key")
                hint = key_hint(pem)
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric import ec

                if not isinstance(serialization.load_pem_public_key(pem), ec.EllipticCurvePublicKey):
                    raise ConfigError(f"--trusted-keys: {path} is not an elliptic-curve public key (P-256/384/521)")
                verifier = _verifier(sign_ec_key, pem)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"--trusted-keys: {path} is not a supported public key (PEM, elliptic curve P-256/384/521): {exc}"
                ) from exc
            keys[hint] = (path.stem, verifier)
            pems[hint] = pem
        if not keys:
            raise ConfigError(f"--trusted-keys {directory}: no public keys (*.pem) in it")
        return cls(keys, directory, pems)

    def check(self, folder: Path, manifest: Manifest) -> Signer:
        """Verify ``folder``'s signature against the trusted keys and that it covers exactly the
        folder's files with the digests in ``manifest`` (which the caller has verified the bytes
        against). Returns the signer; ``SignatureError`` saying why not."""
        _, _, _, sign_sigstore_pb = _library()
        data = read_signature(folder)
        if data is None:
            raise SignatureError(
                "unsigned",
                f"not signed (no {SIGNATURE}), and this daemon only loads folders signed by a key in {self.where}",
            )
        hint = claimed_hint(data)
        if hint and hint not in self.keys:
            raise SignatureError(
                "unknown_key",
                f"signed by a key that is not trusted (key {hint[:HINT_CHARS]}; "
                f"trusted: {', '.join(n for n, _ in self.keys.values())})",
            )
        try:
            bundle = _bundle(sign_sigstore_pb, data)
        except Exception as exc:
            raise SignatureError("invalid", f"{SIGNATURE} is not a model-signing bundle ({_first_line(exc)})") from exc
        candidates = [self.keys[hint]] if hint else list(self.keys.values())
        for name, verifier in candidates:
            try:
                signed = verifier.verify(bundle)
            except Exception:  # InvalidSignature, ValueError, malformed envelopes
                continue
            _check_coverage(folder, manifest, signed)
            return Signer(name, hint or _hint_of(name, self.keys))
        raise SignatureError(
            "invalid",
            "the signature does not verify against "
            + (f"the trusted key {candidates[0][0]}" if hint else "any trusted key"),
        )

    def describe(self) -> list[dict[str, str]]:
        return [{"key": name, "hint": hint[:HINT_CHARS]} for hint, (name, _) in sorted(self.keys.items())]


def _verifier(sign_ec_key: Any, pem: bytes) -> Any:
    """The library's verifier for the key bytes already read (it reads a path)."""
    with tempfile.TemporaryDirectory(prefix="ttsd-key-") as private:
        copy = Path(private) / "key.pem"
        copy.write_bytes(pem)
        return sign_ec_key.Verifier(copy)


def _bundle(sign_sigstore_pb: Any, data: bytes) -> Any:
    """The library's bundle from the bytes already read and bounded (the library reads a path: it
    gets a private copy, so a file swapped in the folder after the read is never parsed)."""
    with tempfile.TemporaryDirectory(prefix="ttsd-sig-") as private:
        copy = Path(private) / SIGNATURE
        copy.write_bytes(data)
        return sign_sigstore_pb.Signature.read(copy)


def check_coverage(folder: Path, manifest: Manifest) -> Signer | None:
    """What ``publish`` can check with no key at hand: that the folder's signature, if it has one,
    still lists exactly the folder's files as they are now (a ``ttsd.json`` edited after signing
    is caught here, not on every box that fetches it). The signature itself is not verified: that
    takes a trusted key (``TrustedKeys.check``). None when the folder is unsigned."""
    data = read_signature(folder)
    if data is None:
        return None
    _library()  # the payload's reading is the library's
    from model_signing._signing.signing import dsse_payload_to_manifest

    try:
        envelope = json.loads(data)["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True))
        signed = dsse_payload_to_manifest(statement)
    except Exception as exc:  # malformed JSON, base64 or statement: the library raises what it likes
        raise SignatureError("invalid", f"{SIGNATURE} is not a model-signing bundle ({_first_line(exc)})") from exc
    _check_coverage(folder, manifest, signed)
    return Signer("", claimed_hint(data))


def _hint_of(name: str, keys: dict[str, tuple[str, Any]]) -> str:
    return next((hint for hint, (n, _) in keys.items() if n == name), "")


def _check_coverage(folder: Path, manifest: Manifest, signed: Any) -> None:
    """The signed statement lists exactly the folder's files, with the digests it has now."""
    method = signed.serialization_type.get("method")
    if method != "files":
        raise SignatureError(
            "unsupported", f"signed with {method!r} hashing; ttsd checks per-file signatures (model_signing's default)"
        )
    digests: dict[str, str] = {}
    for descriptor in signed.resource_descriptors():
        if descriptor.digest.algorithm != "sha256":
            raise SignatureError(
                "unsupported",
                f"signed with {descriptor.digest.algorithm} digests; ttsd checks sha256 (model_signing's default)",
            )
        digests[str(descriptor.identifier)] = descriptor.digest.digest_hex.lower()
    expected = {rel: entry.sha256 for rel, entry in manifest.files.items()}
    expected[MANIFEST] = _sha256_beneath(folder, MANIFEST)
    unsigned, absent = sorted(set(expected) - set(digests)), sorted(set(digests) - set(expected))
    changed = [rel for rel in sorted(expected) if rel in digests and digests[rel] != expected[rel]]
    if unsigned:
        raise SignatureError("mismatch", f"{unsigned[0]} is not covered by the signature")
    if absent:
        raise SignatureError("mismatch", f"{absent[0]} was signed but is not in the folder")
    if changed:
        raise SignatureError("mismatch", f"{changed[0]} differs from what was signed")


def _sha256_beneath(folder: Path, rel: str) -> str:
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = open_beneath(root, rel)
    finally:
        os.close(root)
    try:
        return hash_fd(fd, os.fstat(fd).st_size)[1]
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def signer_config(private_key: Path, password: str | None = None) -> Any:
    """model_signing's signing config for ``private_key``, or a ``ConfigError`` saying why the key
    cannot sign (unreadable, not a regular file, not an EC key, a wrong or missing password):
    called before anything is written, so a bad key changes nothing."""
    _, signing, _, _ = _library()
    try:
        pem = read_small(private_key, MAX_KEY_BYTES)  # a file or a pipe (<(gpg -d ...)), never a device
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(pem, password=password.encode() if password else None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):  # the library failed on others with an AttributeError
            raise ValueError(f"a {type(key).__name__.lstrip('_')}, not an elliptic-curve key")
        # model_signing reads a path: the key it reads is the one read here, from memory (a pipe
        # cannot be read twice, and a decrypted key should not touch the disk)
        held = os.memfd_create("ttsd-signing-key", os.MFD_CLOEXEC)
        try:
            os.write(held, pem)
            return signing.Config().use_elliptic_key_signer(
                private_key=Path(f"/proc/self/fd/{held}"), password=password.encode() if password else None
            )
        finally:
            os.close(held)
    except (OSError, ValueError, TypeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise ConfigError(
            f"{private_key}: not a usable private key (PEM, elliptic curve "
            f"P-256/384/521; a password-protected key needs TTSD_SIGN_KEY_PASSWORD): {detail}"
        ) from exc


def sign(folder: Path, private_key: Path, password: str | None = None, *, config: Any = None) -> Signer:
    """Sign ``folder`` (which the caller has verified against its manifest) with an elliptic-curve
    private key, writing ``folder/model.sig`` as ``model_signing sign key`` would: every file but
    the signature itself, sha256 per file. The signature is written beside the folder first and
    renamed in, so the folder never holds half a signature. ``config``: ``signer_config``'s, made
    before (the key read once: a key through a pipe cannot be read again)."""
    hashing, _, _, _ = _library()
    config = config or signer_config(private_key, password)
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE]))
    tmp = folder.parent / f".{folder.name}.{SIGNATURE}.{os.getpid()}.tmp"
    try:
        config.sign(folder, tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
            data = written.read(MAX_SIGNATURE_BYTES + 1)
        os.replace(tmp, folder / SIGNATURE)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Signer("", claimed_hint(data))
