"""The Piper voice catalog: ``voices.json`` parsed, every field checked, and searched.

The catalog is remote data, so nothing in it is used before it is checked: a voice key becomes a
folder name (NFC; letters of any script, digits, ``_ . -``; never a separator, control or bidi
character), a file path becomes a URL under the mirror (plain segments only: no ``..``, no
absolute path, no scheme, no ``%``, ``?``, ``#`` or ``\\``), display fields lose what could fool
a terminal (``display_text``), sizes are bounded per kind of file and md5 digests are 32 hex
digits. An entry that fails is left out of the catalog with its reason (``Catalog.invalid``), so
one bad entry does not hide the others and ``get`` of that voice says what is wrong with it.

The layout (Hugging Face ``rhasspy/piper-voices``), one entry per voice::

    "en_US-lessac-medium": {"key": "en_US-lessac-medium", "name": "lessac",
      "language": {"code": "en_US", "family": "en", "region": "US", "name_native": "English",
                   "name_english": "English", "country_english": "United States"},
      "quality": "medium", "num_speakers": 1, "speaker_id_map": {}, "aliases": [],
      "files": {"en/en_US/lessac/medium/en_US-lessac-medium.onnx": {"size_bytes": 63201294,
                                                                    "md5_digest": "…"},
                "en/en_US/lessac/medium/en_US-lessac-medium.onnx.json": {…},
                "en/en_US/lessac/medium/MODEL_CARD": {…}}}
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from ..errors import CatalogError

CATALOG_FILE = "voices.json"
MAX_CATALOG_BYTES = 16 << 20  # the real one is ~1.5 MB
MAX_VOICES = 5000
MAX_FILES_PER_VOICE = 50
MAX_ONNX_BYTES = 1 << 30  # the largest Piper voices are ~120 MB
MAX_TEXT_FILE_BYTES = 4 << 20  # .onnx.json (phoneme and speaker maps), MODEL_CARD
MAX_SPEAKERS = 10_000
MAX_PATH_CHARS = 300
MAX_TEXT_CHARS = 100  # language names, quality, voice name
MODEL_CARD = "MODEL_CARD"

MAX_KEY_CHARS = 100
# a key names folders and files with more around it (``KEY-VERSION``, ``.KEY.onnx.json.<sha256>.part``,
# ``.KEY-VERSION.xxxxxxxx.partial``): at most 150 bytes of UTF-8 keeps each within a 255-byte file name
MAX_KEY_BYTES = 150
_SEGMENT = re.compile(r"[\w.-]+")  # \w: Unicode letters and digits, and _
_MD5 = re.compile(r"[0-9a-f]{32}")
_CODE = re.compile(r"[A-Za-z0-9_-]{1,20}")
# letters that show as nothing (Hangul fillers): two keys differing by one would look the same
_INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
# format characters kept in display text: they join letters (Persian, Indic scripts), move nothing
_JOINERS = frozenset("\u200c\u200d")


def _key_char(c: str) -> bool:
    """Whether ``c`` may be in a voice key: a letter or digit of any script (as ``manifest.check_name``
    takes a voice name: ``str.isalnum``, so no combining mark NFC leaves on its own), ``_ . -``."""
    return c in "_.-" or (unicodedata.category(c)[0] in "LN" and c.isalnum() and c not in _INVISIBLE_LETTERS)


def shown_key(key: object) -> str:
    """A key as it may be put in a message: as it is when it is a valid key, else escaped
    (``ascii``: terminal escapes, bidi overrides and line breaks show as ``\\x1b``, ``\\u202e``, …)."""
    if isinstance(key, str):
        try:
            return check_voice_key(key)
        except CatalogError:
            pass
    return _escaped(key)


def _escaped(value: object) -> str:
    shown = ascii(value)
    return shown if len(shown) <= 80 else shown[:70] + "..."


def check_voice_key(key: object) -> str:
    """A catalog key, in NFC (``pt_PT-tugão-medium`` whichever way its ``ã`` was encoded), which
    names a folder in the models dir and a manifest: letters (any script) and digits, ``_``, ``.``
    and ``-``, starting with a letter or digit, at most 100 characters and 150 bytes of UTF-8. So no
    path separator, no ``.``/``..``, no control or format character (bidi overrides and isolates,
    U+200E/U+200F, zero-width joiners), no space, no combining mark left uncomposed, no invisible
    letter. ``CatalogError`` names the key as given, escaped (``ascii``), and the first character
    refused, never as text that could reorder or hide what a terminal shows."""
    if not isinstance(key, str):
        raise CatalogError(f"invalid voice key {_escaped(key)}: not a string")
    given, key = key, unicodedata.normalize("NFC", key)
    why = ""
    if not key:
        why = "empty"
    elif len(key) > MAX_KEY_CHARS or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        why = f"longer than {MAX_KEY_CHARS} characters or {MAX_KEY_BYTES} bytes of UTF-8"
    elif bad := next((c for c in key if not _key_char(c)), ""):
        why = f"{_char_name(bad)} is not allowed"
    elif unicodedata.category(key[0])[0] not in "LN":
        why = "it must start with a letter or digit"
    elif key.endswith(".partial"):
        why = "'.partial' names a folder still being written"
    if why:
        raise CatalogError(f"invalid voice key {_escaped(given)}: {why} (a key is letters, digits, '_', '.' and '-')")
    return key


def _char_name(c: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character named, never shown."""
    category = unicodedata.category(c)
    kind = {"Cc": "a control character", "Cs": "a lone surrogate", "Cn": "unassigned"}.get(category, category)
    return f"U+{ord(c):04X} ({unicodedata.name(c, kind)})"


def display_text(value: str) -> str:
    """Text from a catalog as it may be shown: NFC, with control and format characters (bidi marks,
    embeddings, overrides and isolates, terminal escapes, line breaks) taken out, so it reads as
    the words it holds and cannot move or recolour what a terminal shows; zero-width (non-)joiners
    stay, as they spell words. Other spaces become a space; what cannot be printed (unassigned,
    private use, a lone surrogate) is shown escaped (``\\ue000``)."""
    out = []
    for c in unicodedata.normalize("NFC", value):
        category = unicodedata.category(c)
        if c in _JOINERS or c.isprintable():
            out.append(c)
        elif category in ("Cc", "Cf"):
            continue
        elif category[0] == "Z":
            out.append(" ")
        else:
            out.append(ascii(c)[1:-1])
    return "".join(out)


def check_remote_path(rel: object) -> str:
    """A file path from the catalog, refused unless it is plain segments under the mirror."""
    if not isinstance(rel, str) or not 0 < len(rel) <= MAX_PATH_CHARS:
        raise CatalogError(f"file path {repr(rel)[:60]} is not a string of 1 to {MAX_PATH_CHARS} characters")
    if any(part in ("", ".", "..") or not _SEGMENT.fullmatch(part) for part in rel.split("/")):
        raise CatalogError(f"file path {rel!r} escapes the mirror or is not a plain relative path")
    return rel


@dataclass(frozen=True)
class CatalogFile:
    """One file of a voice: its path under the mirror, and what the catalog says it is (Piper's
    catalog gives an md5; a ttsd manifest on a fleet mirror gives a sha256, which wins)."""

    path: str
    size: int
    md5: str = ""
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def digest(self) -> tuple[str, str]:
        """(algorithm, hex digest) the download is checked against."""
        return ("sha256", self.sha256) if self.sha256 else ("md5", self.md5)


@dataclass(frozen=True)
class Language:
    code: str
    family: str
    region: str
    name_native: str
    name_english: str
    country_english: str


@dataclass(frozen=True)
class CatalogVoice:
    """A checked catalog entry: the three files ttsd uses and what is shown in a search."""

    key: str
    name: str
    language: Language
    quality: str
    num_speakers: int
    onnx: CatalogFile
    config: CatalogFile
    model_card: CatalogFile | None
    aliases: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[CatalogFile, ...]:
        return (self.onnx, self.config) + ((self.model_card,) if self.model_card else ())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> dict[str, str]:
        """{path: md5} of the files: what a model folder made from this entry records, so
        ``get --upgrade`` can tell that the catalog has nothing newer."""
        return {f.path: f.md5 for f in self.files}

    def matches(self, words: list[str], language: str | None) -> bool:
        if language is not None:
            wanted = language.replace("-", "_").lower()
            if wanted not in (self.language.code.lower(), self.language.family.lower()):
                return False
        lang = self.language
        haystack = " ".join(
            (
                self.key,
                self.name,
                lang.code,
                lang.name_native,
                lang.name_english,
                lang.country_english,
                self.quality,
                *self.aliases,
            )
        ).lower()
        return all(word.lower() in haystack for word in words)

    def to_json(self) -> dict[str, Any]:
        lang = self.language
        return {
            "key": self.key,
            "name": self.name,
            "quality": self.quality,
            "num_speakers": self.num_speakers,
            "language": {
                "code": lang.code,
                "family": lang.family,
                "region": lang.region,
                "name_native": lang.name_native,
                "name_english": lang.name_english,
                "country_english": lang.country_english,
            },
            "size_bytes": self.size,
            "files": {f.path: {"size_bytes": f.size, "md5_digest": f.md5} for f in self.files},
            "aliases": list(self.aliases),
        }


@dataclass(frozen=True)
class Catalog:
    """Every valid voice by key; ``invalid`` holds each refused entry's reason."""

    voices: dict[str, CatalogVoice]
    invalid: dict[str, str]
    source: str

    def find(self, name: str) -> CatalogVoice:
        """The voice with key (or alias) ``name``; ``CatalogError`` saying why not otherwise."""
        name = unicodedata.normalize("NFC", name)
        if name in self.voices:
            return self.voices[name]
        for voice in self.voices.values():
            if name in voice.aliases:
                return voice
        if name in self.invalid:
            raise CatalogError(f"{self.source}: the entry for {shown_key(name)} is refused: {self.invalid[name]}")
        close = difflib.get_close_matches(name, list(self.voices), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " ('ttsd models search' lists them)"
        raise CatalogError(f"{self.source}: no voice {shown_key(name)}{hint}")

    def search(self, text: str = "", language: str | None = None) -> list[CatalogVoice]:
        """Voices whose key, name, language or quality hold every word of ``text``, in key order;
        ``language`` is a code (``en_US``, ``en-us``) or a family (``en``)."""
        words = text.split()
        return [v for _, v in sorted(self.voices.items()) if v.matches(words, language)]


def _text(entry: dict[str, Any], field: str, where: str, pattern: re.Pattern[str] | None = None) -> str:
    """A display field: a string of at most ``MAX_TEXT_CHARS``, kept as ``display_text`` makes it.
    What a terminal could be fooled by is taken out, not refused: Piper's ``he_IL-saspeech-medium``
    has a U+200E in its ``name_native``, which once made the whole entry refused."""
    value = entry.get(field, "")
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
        raise CatalogError(f"{where}: '{field}' must be text of at most {MAX_TEXT_CHARS} characters")
    value = display_text(value)
    if pattern is not None and not pattern.fullmatch(value):
        raise CatalogError(f"{where}: '{field}' {value!r} is not a language code")
    return value


def _int(value: object, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CatalogError(f"{what} must be an integer from {low} to {high}")
    return value


def _file(rel: object, info: object, limit: int) -> CatalogFile:
    path = check_remote_path(rel)
    if not isinstance(info, dict):
        raise CatalogError(f"{path}: must be an object with 'size_bytes' and 'md5_digest'")
    size = _int(info.get("size_bytes"), 1, limit, f"{path}: 'size_bytes'")
    md5 = info.get("md5_digest")
    if not isinstance(md5, str) or not _MD5.fullmatch(md5.lower()):
        raise CatalogError(f"{path}: 'md5_digest' must be 32 hex digits")
    return CatalogFile(path, size, md5.lower())


def parse_voice(key: str, entry: object) -> CatalogVoice:
    """One catalog entry, checked field by field (``CatalogError`` with the first problem)."""
    key = check_voice_key(key)
    if not isinstance(entry, dict):
        raise CatalogError("must be an object")
    listed = entry.get("key")
    if not isinstance(listed, str) or unicodedata.normalize("NFC", listed) != key:
        raise CatalogError(f"its 'key' {repr(entry.get('key'))[:60]} differs from the name it is listed under")
    lang = entry.get("language")
    if not isinstance(lang, dict):
        raise CatalogError("'language' must be an object")
    language = Language(
        code=_text(lang, "code", "language", _CODE),
        family=_text(lang, "family", "language"),
        region=_text(lang, "region", "language"),
        name_native=_text(lang, "name_native", "language"),
        name_english=_text(lang, "name_english", "language"),
        country_english=_text(lang, "country_english", "language"),
    )
    num_speakers = _int(entry.get("num_speakers", 1), 1, MAX_SPEAKERS, "'num_speakers'")
    speakers = entry.get("speaker_id_map", {})
    if not isinstance(speakers, dict) or len(speakers) > MAX_SPEAKERS:
        raise CatalogError(f"'speaker_id_map' must be an object of at most {MAX_SPEAKERS} speakers")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or len(aliases) > 20:
        raise CatalogError("'aliases' must be a list of at most 20 keys")
    files = entry.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES_PER_VOICE:
        raise CatalogError(f"'files' must be an object of 1 to {MAX_FILES_PER_VOICE} files")
    for rel in files:  # every path is checked, the ones ttsd never fetches too: a hostile one
        check_remote_path(rel)  # means the entry cannot be trusted
    onnx = [rel for rel in files if rel.endswith(".onnx")]
    if len(onnx) != 1 or f"{onnx[0]}.json" not in files:
        raise CatalogError("'files' must list one .onnx and its .onnx.json")
    cards = [rel for rel in files if rel.rsplit("/", 1)[-1] == MODEL_CARD]
    if len(cards) > 1:
        raise CatalogError(f"'files' lists more than one {MODEL_CARD}")
    return CatalogVoice(
        key=key,
        name=_text(entry, "name", "voice"),
        language=language,
        quality=_text(entry, "quality", "voice"),
        num_speakers=num_speakers,
        onnx=_file(onnx[0], files[onnx[0]], MAX_ONNX_BYTES),
        config=_file(f"{onnx[0]}.json", files[f"{onnx[0]}.json"], MAX_TEXT_FILE_BYTES),
        model_card=_file(cards[0], files[cards[0]], MAX_TEXT_FILE_BYTES) if cards else None,
        aliases=tuple(check_voice_key(alias) for alias in aliases),
    )


def parse_catalog(raw: bytes, source: str) -> Catalog:
    """The catalog from the bytes of ``voices.json`` (already bounded by the fetch)."""
    if len(raw) > MAX_CATALOG_BYTES:
        raise CatalogError(f"{source}: larger than {MAX_CATALOG_BYTES >> 20} MiB")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CatalogError(f"{source}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: must be a JSON object of voices")
    if len(data) > MAX_VOICES:
        raise CatalogError(f"{source}: lists more than {MAX_VOICES} voices")
    voices: dict[str, CatalogVoice] = {}
    invalid: dict[str, str] = {}
    for key, entry in data.items():
        try:
            voice = parse_voice(key, entry)
            voices[voice.key] = voice
        except CatalogError as exc:
            invalid[unicodedata.normalize("NFC", key)[:MAX_KEY_CHARS]] = str(exc)
    return Catalog(voices, invalid, source)
