"""What ``/v1/voices``, ``/v1/status``, ``ttsd models list`` and Wyoming's describe show of each
voice: read under the table's lock in one pass, so a listing is consistent while versions come and
go (the event loop calls this; nothing here blocks on slow work)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .serving_map import ServingMap
from .table import VersionTable
from .versions import ModelVersion, order

_PIPER_LANGUAGE = re.compile(r"^([a-z]{2,3}_[A-Z]{2})-")


def voices(
    table: VersionTable, serving: ServingMap, residency: Callable[[str, ModelVersion | None], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every voice with its active version, canary, facts and versions."""
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
                    "sample_rate": active.manifest.sample_rate if active and active.manifest else None,
                    **_voice_facts(active),
                    **residency(name, active),
                    "versions": [m.describe(serving.in_flight(m.key)) for m in sorted(table.of(name), key=order)],
                }
            )
        return listed


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
    if active is not None and active.engine is not None:
        try:
            info = active.engine.info()
            speakers = sorted(str(s) for s in info.get("speakers", {}))[:1000]
            precision = info.get("precision")
        except Exception:  # facts for a listing: never let them fail it
            speakers = []
    return {
        "languages": languages,
        "speakers": speakers,
        "precision": precision,
        "description": manifest.description if manifest else "",
        "license": manifest.license if manifest else "",
    }
