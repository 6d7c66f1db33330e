"""What ``/v1/voices``, ``/v1/status``, ``ttsd models list`` and Wyoming's describe show of each
voice: read under the table's lock in one pass, so a listing is consistent while versions come and
go (the event loop calls this; nothing here blocks on slow work)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..manifest import norm
from .serving_map import ServingMap
from .table import VersionTable
from .versions import ModelVersion, order

_PIPER_LANGUAGE = re.compile(r"^([a-z]{2,3}_[A-Z]{2})-")


def voices(
    table: VersionTable,
    serving: ServingMap,
    residency: Callable[[str, ModelVersion | None], dict[str, Any]],
    previous: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Every voice with its active version, canary, facts and versions. ``previous``: each
    voice's stack of earlier active versions (the serving state's), from which ``rollback_to``
    names the version a plain ``ttsd rollback`` goes back to (None: it has none to go to): the
    active version itself while a canary runs (the rollback ends the canary)."""
    previous = previous or {}
    with table.locked():
        default = serving.default_name()
        listed = []
        for name in table.names():
            active, canary = table.by_key(serving.active(name)), table.by_key(serving.canary(name))
            listed.append(
                {
                    "name": name,
                    "default": name == default,
                    "active": active.version if active else None,
                    "canary": canary.version if canary else None,
                    "rollback_to": active.version
                    if active and canary
                    else _rollback_to(table, name, active, previous.get(name, ())),
                    "sample_rate": active.manifest.sample_rate if active and active.manifest else None,
                    **_voice_facts(active),
                    **residency(name, active),
                    "versions": [m.describe(serving.in_flight(m.key)) for m in sorted(table.of(name), key=order)],
                }
            )
        return listed


def _rollback_to(table: VersionTable, name: str, active: ModelVersion | None, stack: Sequence[str]) -> str | None:
    """The newest entry of ``stack`` that is not the active version and is still known: where
    ``ttsd rollback`` without ``--to`` goes (``actions.Control._rollback_pair``'s choice)."""
    if active is None:
        return None
    for version in reversed(stack):
        if norm(version) != norm(active.version):
            target = table.get(name, version)
            return target.version if target is not None and target is not active else None
    return None


def _voice_facts(active: ModelVersion | None) -> dict[str, Any]:
    """What a client choosing a voice wants to know of its active version: languages (the
    manifest's ``languages``, else a Piper-style name such as ``en_US-joe-medium``), speakers (the
    engine's), description and licence (the manifest's)."""
    manifest = active.manifest if active else None
    languages: list[str] = []
    if manifest is not None:
        given = manifest.extra.get("languages", manifest.extra.get("language"))
        if isinstance(given, str):
            languages = [given]
        elif isinstance(given, list):
            languages = [str(g) for g in given if isinstance(g, str)][:20]
        elif match := _PIPER_LANGUAGE.match(manifest.name):
            languages = [match.group(1)]
    speakers: list[str] = []
    precision = None  # the number format the loaded engine computes in (fp32 / bf16), if it says
    kernels: dict[str, Any] = {}  # the kernel path per class of product it chose on this box, if it says
    if active is not None and active.engine is not None:
        try:
            info = active.engine.info()
            speakers = sorted(str(s) for s in info.get("speakers", {}))[:1000]
            precision = info.get("precision")
            chosen = info.get("kernels")
            kernels = chosen if isinstance(chosen, dict) else {}
        except Exception:  # facts for a listing: never let them fail it
            speakers = []
    return {
        "languages": languages,
        "speakers": speakers,
        "precision": precision,
        "kernels": kernels,
        "description": manifest.description if manifest else "",
        "license": manifest.license if manifest else "",
    }
