"""Checks on request text and a plain sentence splitter. No torch here."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Sequence
from typing import TypeVar

from .errors import NothingToSpeakError, RequestError, TextTooLongError

DEFAULT_MAX_CHARS = 5000
_ALLOWED_CONTROL = {"\n", "\r", "\t"}
# A sentence ends at . ! ? … (and their CJK forms) followed by whitespace or the end.
# A sentence ends at . ! ? … followed by whitespace (after any closing quotes or brackets), or at
# the full-width 。！？ of Chinese and Japanese, which are written without a space after them.
_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]»”’]*\s+|[。！？]+[\"')\]»”’」』）】〕》〉]*\s*")


def check_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Return ``text`` stripped, or raise ``RequestError`` saying why it cannot be spoken."""
    if not isinstance(text, str):
        raise RequestError("text must be a string")
    stripped = text.strip()
    if not stripped:
        raise NothingToSpeakError("text is empty")
    if len(stripped) > max_chars:
        raise TextTooLongError(f"text is {len(stripped)} characters; the limit is {max_chars}")
    unknown = False
    for index, char in enumerate(stripped):
        category = unicodedata.category(char)
        if (category == "Cc" and char not in _ALLOWED_CONTROL) or category in ("Cs", "Co") or _noncharacter(char):
            raise RequestError(f"text has an invalid character U+{ord(char):04X} at position {index}")
        unknown = unknown or category == "Cn"
    if unknown:
        # unassigned to this Python's Unicode database is not invalid: Python 3.11 knows Unicode 14,
        # and a conversation agent's reply holds emoji of Unicode 15 and 16. Left out, not spoken
        # (espeak-ng spelled 🩷 out as "symbol one F A seven seven"); the text was refused whole
        stripped = "".join(c for c in stripped if unicodedata.category(c) != "Cn").strip()
    if not any(unicodedata.category(c)[0] in "LN" for c in stripped):
        raise NothingToSpeakError("text has nothing to speak (only punctuation, symbols or spaces)")
    return stripped


def complete_sentences(text: str) -> tuple[list[str], str]:
    """The sentences ``text`` completes (``split_sentences``), and the rest, still being written
    (a text stream's next piece goes on from it as it is: "Hello " + "world." is "Hello world.").
    A sentence is complete at its end mark and a space (so "3." in "3.5" waits), or at a Chinese
    or Japanese full-width mark."""
    cut = max((match.end() for match in _SENTENCE_END.finditer(text)), default=0)
    return split_sentences(text[:cut]) if cut else [], text[cut:].lstrip()


def _noncharacter(char: str) -> bool:
    """One of Unicode's 66 noncharacters (U+FDD0..U+FDEF, and the last two of every plane):
    never text, in any version of the standard."""
    code = ord(char)
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


def split_sentences(text: str) -> list[str]:
    """Split at sentence-final punctuation (``_SENTENCE_END``); keep non-empty parts."""
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        parts.append(text[start : match.end()].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def has_speech(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in text)


CLAUSE_MARKS = frozenset(",;:—–")  # a clause ends after one of these (and any spaces)
T = TypeVar("T")


def split_long(
    symbols: Sequence[T],
    limit: int,
    *,
    space: T,
    clause: Collection[T] = CLAUSE_MARKS,  # type: ignore[assignment]
) -> list[Sequence[T]]:
    """Split one over-long sentence into pieces of at most ``limit`` symbols (characters or
    phonemes), cutting after a clause mark where there is one, else between words, and only
    inside a word that is longer than ``limit`` by itself.

    Pieces come out about equal in length (the cut nearest to an even share is taken, never one
    past ``limit``), so no piece is a lone word left over at the end. Spaces at the cuts are
    dropped. A sentence of at most ``limit`` symbols comes back whole.
    """
    if limit < 2:
        raise ValueError("limit must be at least 2")
    pieces: list[Sequence[T]] = []
    start, n = 0, len(symbols)
    while True:
        while start < n and symbols[start] == space:
            start += 1
        end = n
        while end > start and symbols[end - 1] == space:
            end -= 1
        if end - start <= limit:
            if end > start:
                pieces.append(symbols[start:end])
            return pieces
        count = -(-(end - start) // limit)  # pieces still needed
        target = start + -(-(end - start) // count)
        lowest = start + max(1, (target - start) // 2)
        window = range(lowest, start + limit + 1)  # a cut at i ends the piece before symbols[i]
        clauses = [i for i in window if symbols[i] == space and symbols[i - 1] in clause]
        words = [i for i in window if symbols[i] == space and symbols[i - 1] != space]
        # an uneven cut beats cutting a word: look below the window before giving up
        anywhere = [i for i in range(start + 1, lowest) if symbols[i] == space and symbols[i - 1] != space]
        cut = _nearest(clauses, target) or _nearest(words, target) or _nearest(anywhere, target) or target
        piece = symbols[start:cut]
        while piece and piece[-1] == space:
            piece = piece[:-1]
        pieces.append(piece)
        start = cut


def _nearest(cuts: list[int], target: int) -> int | None:
    """The cut closest to ``target`` (the later one on a tie), if any."""
    return min(cuts, key=lambda i: (abs(i - target), -i)) if cuts else None
