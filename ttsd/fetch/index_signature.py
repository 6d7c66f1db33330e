"""A fleet mirror's index signed with the fleet key, so that what it says beyond the folders (which
version goes to which share of boxes, which version is withdrawn) comes from the fleet too.

Folders are signed (``model.sig``), so a mirror's writer could never make a box with
``--trusted-keys`` load a folder the fleet did not sign. Shares and withdrawals are the index's own
words: unsigned, such a writer could withdraw a version and send every box back to an older
(signed) one. So ``publish``, ``rollout`` and ``withdraw`` sign the index they write when given
``--sign-key`` (the fleet's elliptic-curve private key, as ``ttsd models sign`` takes it), and a box
with ``--trusted-keys`` takes an index only when one of them signed it: one that is unsigned, or
signed by another key, or whose signature does not match its content, is refused
(``SignatureError``, exit 18) and nothing on the box changes. (Unsigned indexes without shares or
withdrawals were taken, their folders being signed: then one who could write the mirror, or sit on
its plain-HTTP path, removed a signed index's signature, put a withdrawn version back and gave a
staged one to every box.)

The signature is a top-level field of the index itself, ``"signature": {"key": HINT, "value":
BASE64}``: ECDSA with SHA-256 over the canonical JSON of every other field (sorted keys, no
spaces), ``HINT`` the sha256 of the public key's PEM as model-signing names keys. One file, so a
poll of an unchanged mirror is still one request answered 304. What a signature cannot stop: a
mirror that keeps serving an older signed index holds boxes back (it cannot withdraw anything the
fleet did not).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SignatureError
from .fleet_index import FleetVoice

FIELD = "signature"
MAX_SIGNATURE_CHARS = 1024


def payload(data: dict[str, Any]) -> bytes:
    """What is signed: the index without its signature, as canonical JSON."""
    rest = {k: v for k, v in data.items() if k != FIELD}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_index(data: dict[str, Any], private_key: Path | Any) -> dict[str, Any]:
    """``data`` with its signature by ``private_key`` (PEM; a password from TTSD_SIGN_KEY_PASSWORD),
    or by the key ``load_fleet_key`` read from it."""
    key = load_fleet_key(private_key) if isinstance(private_key, Path) else private_key
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ..signing import key_hint

    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    value = key.sign(payload(data), ec.ECDSA(hashes.SHA256()))
    return {**data, FIELD: {"key": key_hint(public), "value": base64.b64encode(value).decode("ascii")}}


def load_fleet_key(private_key: Path) -> Any:
    """The fleet's private key read from ``private_key`` (once: it may be a pipe), or a
    ``ConfigError`` saying why it cannot sign an index, before anything is written."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as exc:  # the signing extra brings it
        needs = "ttsd's signing extra (or pip install 'model-signing>=1.1,<2' pyopenssl)"
        raise ConfigError(f"signing the index needs {needs}: {exc}") from exc

    from ..safe_read import read_small
    from ..signing import MAX_KEY_BYTES

    password = os.environ.get("TTSD_SIGN_KEY_PASSWORD")
    try:
        key = serialization.load_pem_private_key(
            read_small(private_key, MAX_KEY_BYTES), password=password.encode() if password else None
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{private_key}: not a usable private key: {str(exc).splitlines()[0][:150]}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{private_key}: the fleet key must be an elliptic-curve key (P-256/384/521)")
    return key


def is_signed(data: object) -> bool:
    return isinstance(data, dict) and FIELD in data


def needs_signature(voices: dict[str, FleetVoice]) -> bool:
    """Whether the index says anything beyond its folders: a share below 1, or a withdrawal."""
    return any(v.withdrawn or any(p.share < 1.0 for p in v.versions) for v in voices.values())


def check_index(raw: bytes, voices: dict[str, FleetVoice], trust: Any, source: str) -> str:
    """For a box that trusts ``trust`` (``TrustedKeys``): the name of the key that signed the index;
    ``SignatureError`` otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = json.loads(raw)  # parse_index read it already: it is an object
    signature = data.get(FIELD)
    if signature is None:
        what = "gives shares or withdrawals but " if needs_signature(voices) else ""
        raise SignatureError(
            "unsigned",
            f"{source} {what}is not signed; a box with --trusted-keys takes an index only when a trusted "
            "key signed it (ttsd models publish, rollout or withdraw with --sign-key): nothing changed here",
        )
    if (
        not isinstance(signature, dict)
        or not isinstance(signature.get("key"), str)
        or not isinstance(signature.get("value"), str)
        or len(signature["value"]) > MAX_SIGNATURE_CHARS
    ):
        raise SignatureError("malformed", f"{source}: its signature is not a key and a value")
    known = trust.public_keys().get(signature["key"])
    if known is None:
        raise SignatureError("untrusted", f"{source} is signed by a key this box does not trust: nothing changed here")
    name, pem = known
    try:
        value = base64.b64decode(signature["value"], validate=True)
        public = serialization.load_pem_public_key(pem)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(value, payload(data), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, AssertionError):
        raise SignatureError(
            "invalid", f"{source}: its signature does not match its content: nothing changed here"
        ) from None
    return str(name)
