"""Synthesis requests as plain data, parsed from JSON the same way for HTTP and the spool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engines.base import SynthesisOptions
from .errors import RequestError
from .formats import FORMATS

FORMATS_ALL = (*FORMATS, "pcm")
STREAM_FORMATS = ("wav", "pcm")
# The voices OpenAI's API defines: clients always send one; they mean "the default voice" here.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"}


@dataclass(frozen=True)
class SynthRequest:
    text: str
    voice: str | None = None
    version: str | None = None
    format: str = "wav"
    stream: bool = False
    options: SynthesisOptions = SynthesisOptions()


def _field(data: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("number" if k in (int, float) else k.__name__ for k in kinds)
        raise RequestError(f"field {key!r} must be a {names}")
    return value


_NATIVE = {"text", "voice", "version", "format", "stream", "speed", "speaker", "noise_scale", "noise_w",
           "seed", "sentence_pause"}


def parse_request(data: Any) -> SynthRequest:
    """``POST /v1/synthesize`` body (and spool ``ID.json``) -> ``SynthRequest``."""
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(data) - _NATIVE)
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)} (known: {', '.join(sorted(_NATIVE))})")
    if "text" not in data:
        raise RequestError("field 'text' is required")
    text = _field(data, "text", (str,))
    fmt = _field(data, "format", (str,), "wav").lower()
    if fmt not in FORMATS_ALL:
        raise RequestError(f"format {fmt!r} is not supported (use {', '.join(FORMATS_ALL)})")
    stream = _field(data, "stream", (bool,), False)
    if stream and fmt not in STREAM_FORMATS:
        raise RequestError(f"streaming needs format wav or pcm, not {fmt}")
    version = data.get("version")
    if version is not None and not isinstance(version, (str, int)):
        raise RequestError("field 'version' must be a string")
    speaker = data.get("speaker")
    if speaker is not None and (not isinstance(speaker, (str, int)) or isinstance(speaker, bool)):
        raise RequestError("field 'speaker' must be a name or a number")
    options = SynthesisOptions(
        speed=float(_field(data, "speed", (int, float), 1.0)),
        speaker=speaker,
        noise_scale=_field(data, "noise_scale", (int, float)),
        noise_scale_duration=_field(data, "noise_w", (int, float)),
        seed=_field(data, "seed", (int,)),
        sentence_pause=float(_field(data, "sentence_pause", (int, float), 0.2)),
    ).checked()
    return SynthRequest(text=text, voice=_field(data, "voice", (str,)),
                        version=str(version) if version is not None else None,
                        format=fmt, stream=stream, options=options)


def parse_openai(data: Any, known_voices: set[str]) -> SynthRequest:
    """``POST /v1/audio/speech`` (OpenAI's TTS API): ``model``, ``input``, ``voice``,
    ``response_format``, ``speed``. ``voice`` (or ``model``) selects a ttsd voice when it names one;
    OpenAI's own voice names mean the default voice."""
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    if "input" not in data:
        raise RequestError("field 'input' is required")
    text = _field(data, "input", (str,))
    voice = _field(data, "voice", (str,))
    model = _field(data, "model", (str,))
    chosen: str | None = None
    for candidate in (voice, model):
        if candidate and candidate in known_voices:
            chosen = candidate
            break
    if chosen is None and voice and voice.lower() not in OPENAI_VOICES:
        raise RequestError(f"unknown voice {voice!r} (voices: {', '.join(sorted(known_voices)) or 'none'})")
    fmt = _field(data, "response_format", (str,), "mp3").lower()
    if fmt not in FORMATS_ALL:
        raise RequestError(f"response_format {fmt!r} is not supported (use {', '.join(FORMATS_ALL)})")
    speed = float(_field(data, "speed", (int, float), 1.0))
    return SynthRequest(text=text, voice=chosen, format=fmt, options=SynthesisOptions(speed=speed).checked())
