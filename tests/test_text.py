from __future__ import annotations

import pytest

from ttsd.errors import RequestError, TextTooLongError
from ttsd.text import check_text, split_sentences


@pytest.mark.parametrize("text", ["", "   \n\t", "...", "?!, -- ;", "\u200b"])
def test_nothing_to_speak(text: str) -> None:
    with pytest.raises(RequestError):
        check_text(text)


def test_too_long() -> None:
    with pytest.raises(TextTooLongError, match="limit is 10"):
        check_text("a" * 11, max_chars=10)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\ud800", "\ue000"])
def test_invalid_characters_are_named(char: str) -> None:
    with pytest.raises(RequestError, match=f"U\\+{ord(char):04X}"):
        check_text(f"hello {char} world")


def test_ordinary_text_passes_stripped() -> None:
    assert check_text("  Hello, world!\n") == "Hello, world!"


def test_split_sentences() -> None:
    text = 'Hi there. "Really?" she asked! Yes… fine\nNext line'
    assert split_sentences(text) == ["Hi there.", '"Really?"', "she asked!", "Yes…", "fine\nNext line"]
