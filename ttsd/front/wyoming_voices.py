"""What Wyoming's ``describe`` says of ttsd's voices, and which voice a request that names only a
language gets.

Home Assistant shows a voice's ``description`` as its name in the voice picker, so it is short, as
wyoming-piper's: ``joe (medium)`` for a Piper-style name (``lang_REGION-name-quality``), the voice's
name as is otherwise. The active version goes in the voice's ``version`` field. The attribution is
the voice's: its licence (the manifest's ``license``) and where it came from (the ``URL:`` of the
MODEL_CARD kept beside the weights by ``ttsd models get``, else a URL in the licence); a voice that
says neither gets ttsd's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker

from .. import __version__
from ..errors import RequestError, UnknownVoiceError
from .backend import Backend

ATTRIBUTION = Attribution(name="ttsd", url="")
PIPER_QUALITIES = ("x_low", "low", "medium", "high")
_PIPER_NAME = re.compile(r"^[a-z]{2,3}_[A-Z]{2}-([^-]+)-(" + "|".join(PIPER_QUALITIES) + r")$")
_URL = re.compile(r"https?://[^\s<>\"'()\[\]]+")
_CARD_URL = re.compile(r"^[ \t]*[*-]?[ \t]*URL[ \t]*:[ \t]*(https?://\S+)", re.IGNORECASE | re.MULTILINE)
MODEL_CARD = "MODEL_CARD"
MAX_CARD_BYTES = 64 << 10  # a Piper MODEL_CARD is well under 1 KB
MAX_LANGUAGE = 35  # BCP 47 tags are at most 35 characters in practice
_card_urls: dict[str, str] = {}  # a version's folder -> its MODEL_CARD's URL ("" for none): folders never change


def info(backend: Backend) -> Info:
    """What ``describe`` answers: one TTS program with every voice that has an active version."""
    voices = []
    for voice in backend.voices():
        if not voice.get("active"):
            continue
        voices.append(
            TtsVoice(
                name=voice["name"],
                description=short_name(voice["name"]),
                attribution=attribution(voice),
                installed=True,
                version=str(voice["active"]),
                languages=list(voice.get("languages") or []),
                speakers=[TtsVoiceSpeaker(name=s) for s in voice.get("speakers") or []] or None,
            )
        )
    program = TtsProgram(
        name="ttsd",
        description="ttsd text-to-speech daemon",
        attribution=ATTRIBUTION,
        installed=True,
        version=__version__,
        voices=sorted(voices, key=lambda v: v.name),
        supports_synthesize_streaming=True,
    )
    return Info(tts=[program])


def short_name(name: str) -> str:
    """``en_US-joe-medium`` -> ``joe (medium)``, ``de_DE-thorsten_emotional-medium`` ->
    ``thorsten emotional (medium)``, as wyoming-piper names its voices; any other name as is."""
    match = _PIPER_NAME.match(name)
    if match is None:
        return name
    return f"{match.group(1).replace('_', ' ')} ({match.group(2)})"


def attribution(voice: dict[str, Any]) -> Attribution:
    """The voice's licence and where it came from; ttsd's when it says neither."""
    licence = " ".join(str(voice.get("license") or "").split())[:200]
    if licence.lower().startswith("unknown"):  # "unknown (the MODEL_CARD names none)", from models get
        licence = ""
    url = _card_url(voice)
    if not url and (found := _URL.search(licence)):
        url = found.group(0)
    if not licence and not url:
        return ATTRIBUTION
    return Attribution(name=licence or "see the voice's model card", url=url)


def _card_url(voice: dict[str, Any]) -> str:
    """The first ``URL:`` line of the MODEL_CARD in the active version's folder, read once per
    folder (a published folder never changes: a new version is a new folder)."""
    folder = next(
        (v.get("source") for v in voice.get("versions") or [] if v.get("version") == voice.get("active")), None
    )
    if not folder:
        return ""
    if folder not in _card_urls:
        try:
            with open(Path(folder) / MODEL_CARD, "rb") as card:
                text = card.read(MAX_CARD_BYTES).decode("utf-8", errors="replace")
        except OSError:
            text = ""
        found = _CARD_URL.search(text)
        url = found.group(1) if found else ""
        if len(_card_urls) >= 1024:
            _card_urls.clear()
        _card_urls[folder] = "".join(c for c in url if c.isprintable())[:500]
    return _card_urls[folder]


def choose_voice(voices: list[dict[str, Any]], language: Any) -> str:
    """The voice a request that names only ``language`` gets: one whose languages include it
    (``en_US``; ``en-us`` alike), else one of the same language in another region (``en`` or
    ``en_GB`` gets ``en_US``), the default voice first, then by name. Never another language's
    voice: none is ``UnknownVoiceError``. A voice whose languages are not known is never chosen."""
    if not isinstance(language, str) or not language.strip() or len(language) > MAX_LANGUAGE:
        raise RequestError(f"voice language must be a language code of at most {MAX_LANGUAGE} characters")
    wanted = _tag(language)
    serving = sorted((v for v in voices if v.get("active")), key=lambda v: (not v.get("default"), v["name"]))
    for same in (lambda tag: tag == wanted, lambda tag: tag[0] == wanted[0]):
        for voice in serving:
            if any(same(_tag(given)) for given in voice.get("languages") or []):
                return str(voice["name"])
    spoken = sorted({str(lang) for v in serving for lang in v.get("languages") or []})
    shown = language if language.isprintable() else repr(language)
    raise UnknownVoiceError(f"no voice speaks {shown} (languages served: {', '.join(spoken) or 'none known'})")


def _tag(language: str) -> tuple[str, ...]:
    """``en_US``, ``en-us``, ``EN_us`` -> ``("en", "us")``."""
    return tuple(part for part in language.strip().lower().replace("-", "_").split("_") if part) or ("",)
