"""Checks on request text and a plain sentence splitter. No torch here."""

from __future__ import annotations

import re
import unicodedata

from .errors import RequestError, TextTooLongError

DEFAULT_MAX_CHARS = 5000
_ALLOWED_CONTROL = {"\n", "\r", "\t"}
# A sentence ends at . ! ? … (and their CJK forms) followed by whitespace or the end.
_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"')\]»”’]*\s+")


def check_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Return ``text`` stripped, or raise ``RequestError`` saying why it cannot be spoken."""
    if not isinstance(text, str):
        raise RequestError("text must be a string")
    stripped = text.strip()
    if not stripped:
        raise RequestError("text is empty")
    if len(stripped) > max_chars:
        raise TextTooLongError(f"text is {len(stripped)} characters; the limit is {max_chars}")
    for index, char in enumerate(stripped):
        category = unicodedata.category(char)
        if (category == "Cc" and char not in _ALLOWED_CONTROL) or category in ("Cs", "Co", "Cn"):
            raise RequestError(f"text has an invalid character U+{ord(char):04X} at position {index}")
    if not any(unicodedata.category(c)[0] in "LN" for c in stripped):
        raise RequestError("text has nothing to speak (only punctuation, symbols or spaces)")
    return stripped


def split_sentences(text: str) -> list[str]:
    """Split at sentence-final punctuation followed by whitespace; keep non-empty parts."""
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        parts.append(text[start : match.end()].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def has_speech(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in text)
