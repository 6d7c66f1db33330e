from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttsd.errors import RequestError, TextTooLongError
from ttsd.text import check_text, split_long, split_sentences


@pytest.mark.parametrize("text", ["", "   \n\t", "...", "?!, -- ;", "\u200b"])
def test_nothing_to_speak(text: str) -> None:
    with pytest.raises(RequestError):
        check_text(text)


def test_too_long() -> None:
    with pytest.raises(TextTooLongError, match="limit is 10"):
        check_text("a" * 11, max_chars=10)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\ud800", "\ue000", "\ufdd0", "\ufffe", "\U0001ffff", "\U0010ffff"])
def test_invalid_characters_are_named(char: str) -> None:
    with pytest.raises(RequestError, match=f"U\\+{ord(char):04X}"):
        check_text(f"hello {char} world")


@pytest.mark.parametrize("char", ["\U0001FA77", "\U0001FABF", "\U0001FACE", "\U0001FAE8"])  # 🩷 🪿 🫎 🫨
def test_emoji_newer_than_this_pythons_unicode_pass(char: str) -> None:
    """Unicode 15 and 16 emoji are unassigned to Python 3.11's database: a conversation agent's
    "Sure, I turned on the lights 🩷." was refused whole as an invalid character. They are left
    out (espeak-ng spelled them out as "symbol one F A seven seven")."""
    assert check_text(f"Sure, I turned on the lights {char}.") == "Sure, I turned on the lights ."
    with pytest.raises(RequestError, match="nothing to speak"):
        check_text(char)


def test_ordinary_text_passes_stripped() -> None:
    assert check_text("  Hello, world!\n") == "Hello, world!"


def test_split_sentences() -> None:
    text = 'Hi there. "Really?" she asked! Yes… fine\nNext line'
    assert split_sentences(text) == ["Hi there.", '"Really?"', "she asked!", "Yes…", "fine\nNext line"]


def test_chinese_and_japanese_split_at_full_width_marks_without_spaces() -> None:
    """Chinese and Japanese put no space after 。！？: each sentence still ends there (closing
    brackets kept with it), so the first audio does not wait for the whole paragraph."""
    chinese = "今天天气很好。我们去公园散步吧！你觉得怎么样？好的。"
    assert split_sentences(chinese) == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？", "好的。"]
    japanese = "こんにちは。元気ですか？「はい、元気です。」"
    assert split_sentences(japanese) == ["こんにちは。", "元気ですか？", "「はい、元気です。」"]
    mixed = "Version 2.5 is out. 新版本已经发布。Try it!"
    assert split_sentences(mixed) == ["Version 2.5 is out.", "新版本已经发布。", "Try it!"]



@given(words=st.lists(st.text(alphabet="abc", min_size=1, max_size=30), min_size=1, max_size=80),
       marks=st.lists(st.sampled_from(["", "", "", ","]), min_size=80, max_size=80),
       limit=st.integers(min_value=2, max_value=60))
def test_split_long_pieces_fit_and_rebuild_the_sentence(words: list[str], marks: list[str], limit: int) -> None:
    sentence = " ".join(w + m for w, m in zip(words, marks, strict=False))
    pieces = split_long(sentence, limit, space=" ")
    assert all(0 < len(p) <= limit for p in pieces)
    assert " ".join(pieces).replace(" ", "") == sentence.replace(" ", "")
    if len(sentence) <= limit:
        assert pieces == [sentence]
    # a word is cut only when it is longer than the limit
    if all(len(w) + 1 <= limit for w in words):
        assert sorted(" ".join(pieces).split()) == sorted(sentence.split())


def test_split_long_prefers_clauses_then_words_and_even_pieces() -> None:
    sentence = "one two three, four five six seven, eight nine ten eleven twelve, thirteen"
    assert split_long(sentence, 30, space=" ") == [
        "one two three,", "four five six seven,", "eight nine ten eleven twelve,", "thirteen"]
    words = ("hello world " * 30).strip()  # 359 characters, no clause marks
    lengths = [len(p) for p in split_long(words, 100, space=" ")]
    assert len(lengths) == 4 and max(lengths) - min(lengths) <= 12  # not 100, 100, 100, 59
    assert split_long(list("ab cd, ef gh"), 5, space=" ") == [list("ab"), list("cd,"), list("ef gh")]
    assert split_long("x" * 25, 10, space=" ") == ["x" * 9, "x" * 8, "x" * 8]
