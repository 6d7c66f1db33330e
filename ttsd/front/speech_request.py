"""Synthesis requests as plain data, parsed from JSON the same way for HTTP and the spool."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RequestError, UnknownVoiceError
from ..formats import FILE_FORMATS
from ..options import SynthesisOptions

FORMATS_ALL = (*FILE_FORMATS, "pcm")
# Formats that can go out as the voice makes them: raw PCM, WAV with a header for a stream of
# unknown length, and the three whose encoders emit self-contained pages/frames (Ogg Opus, ADTS
# AAC, MP3 frames through PyAV: see ttsd.encoding). ogg (Vorbis) and flac are only written whole,
# by libsndfile (whose FLAC writer seeks back on close to finish its header); why flac is not
# streamed through FFmpeg instead is in ttsd.encoding's docstring.
STREAM_FORMATS = ("wav", "pcm", "opus", "aac", "mp3")
# OpenAI's stream_format: "audio" (the default) sends the audio itself, "sse" server-sent events
# carrying it in base64 (see ``ttsd.front.http_api``).
OPENAI_STREAM_FORMATS = ("audio", "sse")
# The voices OpenAI's API defines: clients always send one; they mean "the default voice" here.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"}


@dataclass(frozen=True)
class SynthRequest:
    text: str
    voice: str | None = None
    version: str | None = None
    format: str = "wav"
    stream: bool = False
    options: SynthesisOptions = field(default_factory=SynthesisOptions)
    user: str | None = None  # the gray-release key: picks the version during a canary
    sse: bool = False  # OpenAI's stream_format "sse": the audio as speech.audio.delta events


class FieldError(RequestError):
    """A ``RequestError`` about one field of the body, named in OpenAI's error ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """A request body or spool file as JSON; ``RequestError`` for anything that is not plain JSON
    (bad UTF-8, NaN/Infinity, nesting deep enough to exhaust the parser)."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_int=_whole)
    except RecursionError:
        raise RequestError("body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number too long
        raise RequestError(f"body is not valid JSON ({exc})") from None


MAX_DIGITS = 40  # of a whole number in a request: a seed (2**64) has 20


def _whole(text: str) -> int:
    """A whole number in a request, refused past ``MAX_DIGITS`` (Python's own refusal, past 4,300,
    told the client to call sys.set_int_max_str_digits())."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"a number of {len(text.lstrip('-'))} digits; at most {MAX_DIGITS}")
    return int(text)


def _field(data: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(dict.fromkeys("number" if k in (int, float) else k.__name__ for k in kinds))
        raise RequestError(f"field {key!r} must be a {names}")
    return value


def _number_or(data: dict[str, Any], key: str, default: float) -> float:
    value = _number(data, key)
    return default if value is None else value


def _number(data: dict[str, Any], key: str, default: float | None = None) -> float | None:
    """A finite JSON number as a float (an integer too large for a float is refused, not a 500)."""
    value = _field(data, key, (int, float))
    if value is None:
        return default
    try:
        number = float(value)
    except OverflowError:
        raise RequestError(f"field {key!r} is out of range") from None
    if not math.isfinite(number):
        raise RequestError(f"field {key!r} must be a finite number")
    return number


def parse_speaker(value: Any) -> int | str | None:
    """A speaker is a name or a non-negative index; an index may come as a string of ASCII digits."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError("field 'speaker' must be a name or a number")
    if isinstance(value, str):
        if not value or len(value) > 200:
            raise RequestError("field 'speaker' must be a name of 1 to 200 characters or a number")
        if value.isascii() and value.isdigit():
            value = int(value)
    if isinstance(value, int) and not 0 <= value < 1 << 31:
        raise RequestError(f"speaker number {value} is out of range")
    return value


MAX_USER = 256  # kept as sent up to this; longer ones are hashed
MAX_BODY_USER = 4096  # past this a "user" is no id but a payload
USER_HEADER = "X-Ttsd-User"


def parse_user(value: Any, where: str = "field 'user'") -> str | None:
    """A user key (the ``"user"`` field or the ``X-Ttsd-User`` header): printable characters, kept
    as sent up to 256 (it is hashed for gray release, never shown in a metric); a longer one (OpenAI
    clients may send long end-user ids) stands as its sha256, so the same id is still the same user.
    None when absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > MAX_BODY_USER:
        raise RequestError(f"{where} must be a user key of 1 to {MAX_BODY_USER} printable characters")
    if len(value) > MAX_USER:
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


def with_user_header(req: SynthRequest, values: list[str]) -> SynthRequest:
    """``req`` with the user key of its ``X-Ttsd-User`` header(s). A header that disagrees with the
    body's ``"user"`` is refused rather than one silently winning: the two usually come from
    different hands (a gateway and the client), and hearing the wrong version is hard to notice."""
    if not values:
        return req
    if len(set(values)) > 1:
        raise RequestError(f"header {USER_HEADER} is given more than once with different values")
    user = parse_user(values[0], f"header {USER_HEADER}")
    if req.user is not None and req.user != user:
        raise RequestError(f"field 'user' and header {USER_HEADER} name different users; send one, or the same in both")
    return replace(req, user=user)


_NATIVE = {
    "text",
    "voice",
    "version",
    "format",
    "stream",
    "speed",
    "speaker",
    "noise_scale",
    "noise_w",
    "seed",
    "sentence_pause",
    "user",
}


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
        raise RequestError(f"streaming needs format {', '.join(STREAM_FORMATS)}, not {fmt}")
    version = data.get("version")
    if version is not None and (not isinstance(version, (str, int)) or isinstance(version, bool)):
        raise RequestError("field 'version' must be a string")
    version = _version(str(version)) if version is not None else None
    voice = _field(data, "voice", (str,))
    if voice is not None and not (0 < len(voice) <= 200 and voice.isprintable()):
        raise RequestError("field 'voice' must be a voice name")
    options = SynthesisOptions(
        speed=_number_or(data, "speed", 1.0),
        speaker=parse_speaker(data.get("speaker")),
        noise_scale=_number(data, "noise_scale"),
        noise_scale_duration=_number(data, "noise_w"),
        seed=_field(data, "seed", (int,)),
        sentence_pause=_number_or(data, "sentence_pause", 0.2),
    ).checked()
    return SynthRequest(
        text=text,
        voice=voice,
        version=version,
        format=fmt,
        stream=stream,
        options=options,
        user=parse_user(data.get("user")),
    )


def _version(value: str) -> str:
    """A version as a request names it (body field or ``X-Ttsd-Version`` header)."""
    if not value or len(value) > 64 or not value.isprintable():
        raise RequestError("version must be a short version string such as 1 or 2.1")
    return value


def parse_version_header(value: str) -> str:
    return _version(value.strip())


def parse_openai(data: Any, known_voices: set[str], serving: set[str] | None = None) -> SynthRequest:
    """``POST /v1/audio/speech`` (OpenAI's TTS API): ``model``, ``input``, ``voice``,
    ``response_format``, ``speed``, ``stream_format``, ``stream`` and ``user`` (OpenAI's end-user
    ID, which its clients may send though the speech API does not define it: here the gray-release
    key). ``voice`` (or ``model``) selects a ttsd voice when it names one; OpenAI's own voice names
    mean the default voice. Any other voice is a 404 ``unknown_voice``, as on ttsd's own route,
    listing the voices that serve (``serving``; default: all known).

    ``stream`` (as Kokoro-FastAPI takes it; OpenAI's API has no such field) is true unless sent as
    false: the reply then streams wherever its format can (the front end decides, since that
    depends on what is installed); false asks for the whole file. ``stream_format`` ``"sse"``
    always streams, so it cannot be combined with ``"stream": false``. Other fields OpenAI
    clients send (``instructions``) are ignored."""
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    if "input" not in data:
        raise FieldError("field 'input' is required", "input")
    text = _field(data, "input", (str,))
    voice = _field(data, "voice", (str,))
    model = _field(data, "model", (str,))
    chosen: str | None = None
    for candidate in (voice, model):
        if candidate and candidate in known_voices:
            chosen = candidate
            break
    if chosen is None and voice and voice.lower() not in OPENAI_VOICES:
        listed = sorted(known_voices if serving is None else serving)
        raise UnknownVoiceError(f"unknown voice {voice!r} (voices: {', '.join(listed) or 'none'})")
    fmt = _field(data, "response_format", (str,), "mp3").lower()
    if fmt not in FORMATS_ALL:
        raise FieldError(f"response_format {fmt!r} is not supported (use {', '.join(FORMATS_ALL)})", "response_format")
    stream_format = _field(data, "stream_format", (str,), "audio")
    if stream_format not in OPENAI_STREAM_FORMATS:
        raise FieldError(
            f"stream_format {stream_format!r} is not supported (use {' or '.join(OPENAI_STREAM_FORMATS)})",
            "stream_format",
        )
    stream = _field(data, "stream", (bool,), True)
    sse = stream_format == "sse"
    if sse and not stream:
        raise FieldError("stream_format 'sse' always streams: leave out 'stream': false, or ask for 'audio'", "stream")
    speed = _number_or(data, "speed", 1.0)
    return SynthRequest(
        text=text,
        voice=chosen,
        format=fmt,
        stream=stream,
        sse=sse,
        user=parse_user(data.get("user")),
        options=SynthesisOptions(speed=speed).checked(),
    )
