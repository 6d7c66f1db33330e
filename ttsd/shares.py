"""Where a key stands for a version: the one rule behind gray release by user (a daemon's canary
takes the users whose point is below its share) and staged rollout across a fleet (a mirror's
version goes to the boxes whose point is below its share).

The point is sha256 of (voice, version, key) mapped into [0, 1): the same on every box and after
restarts (not Python's salted ``hash``), so a larger share keeps every key that was in, and the
version is part of it, so each version picks its own users or boxes (the same ones are not always
the first to get something new)."""

from __future__ import annotations

import hashlib


def point(voice: str, version: str, key: str) -> float:
    """``key``'s point in [0, 1) for ``version`` of ``voice`` (give the version normalised, as
    ``ttsd.manifest.norm`` spells it, so ``1.0`` and ``1`` are one version)."""
    text = "\0".join((voice, version, key))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def within(share: float, voice: str, version: str, key: str) -> bool:
    """Whether ``key`` is in ``share`` of ``version``: all of them at 1, none at 0."""
    return share >= 1.0 or (share > 0.0 and point(voice, version, key) < share)
