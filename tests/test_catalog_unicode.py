"""Piper's real catalog has keys and names beyond ASCII: ``pt_PT-tugão-medium`` (a non-ASCII key)
and ``he_IL-saspeech-medium`` (U+200E LEFT-TO-RIGHT MARK in ``name_native``). They are accepted
(keys in NFC, display fields shown as their words), while keys that would be unsafe as folder
names or on a terminal (separators, control and bidi characters) are refused, shown escaped."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_server import Mirror, VoiceFiles, add_voice, serve
from test_catalog import get, invoke

from ttsd.errors import CatalogError
from ttsd.fetch.index import check_voice_key, parse_catalog

TUGAO = "pt_PT-tugão-medium"
HEBREW = "he_IL-saspeech-medium"


def real_shapes(mirror: Mirror, files: VoiceFiles) -> dict[str, Any]:
    """The two entries as Piper's voices.json has them (the key written decomposed once, as some
    tools write it), served by the test mirror."""
    voices: dict[str, Any] = {}
    entry = add_voice(mirror, voices, TUGAO, files, language=("pt_PT", "Portuguese", "Portugal"))
    entry["language"]["name_native"] = "Português"
    decomposed = unicodedata.normalize("NFD", TUGAO)
    voices[decomposed] = {**voices.pop(TUGAO), "key": decomposed}
    entry = add_voice(mirror, voices, HEBREW, files, language=("he_IL", "Hebrew", "Israel"))
    entry["language"]["name_native"] = "\u200eעברית"
    mirror.publish(voices)
    return voices


@pytest.fixture(scope="module")
def files() -> VoiceFiles:
    return VoiceFiles.builtin()


@pytest.fixture
def mirror(files: VoiceFiles) -> Iterator[Mirror]:
    with serve() as m:
        real_shapes(m, files)
        yield m


def test_the_real_entries_are_accepted(mirror: Mirror) -> None:
    catalog = parse_catalog(mirror.files["voices.json"], "voices.json")
    assert catalog.invalid == {}
    assert sorted(catalog.voices) == [HEBREW, TUGAO]  # the key in NFC
    assert catalog.voices[HEBREW].language.name_native == "עברית"  # shown as its word
    assert catalog.find(unicodedata.normalize("NFD", TUGAO)).key == TUGAO  # however it is typed


@pytest.mark.parametrize("key", ["a/b", "..", ".hidden", "evil\u202egnp.exe", "bidi\u2066x\u2069", "x\u200emark",
                                 "zero\u200dwidth", "esc\x1b[31mred", "tab\tkey", "new\nline", "a b", "",
                                 "x" * 101, "voice.partial", "\\windows", "dollar$sign"])
def test_unsafe_keys_are_refused_and_shown_escaped(key: str) -> None:
    with pytest.raises(CatalogError) as info:
        check_voice_key(key)
    message = str(info.value)
    assert message.isascii() and "\x1b" not in message and "\n" not in message


def test_search_lists_both_without_a_warning(mirror: Mirror) -> None:
    result = invoke("models", "search", "--mirror", mirror.url)
    assert result.exit_code == 0, result.output
    assert "2 of 2 voices" in result.stdout and "\u200e" not in result.output
    assert "refused" not in result.stderr and "warning" not in result.stderr, result.stderr
    listed = json.loads(invoke("models", "search", "--mirror", mirror.url, "--json").stdout)
    keys = sorted(v["key"] for v in listed) if isinstance(listed, list) else sorted(listed)
    assert keys == [HEBREW, TUGAO]
    assert "עברית" in json.dumps(listed, ensure_ascii=False) and "\u200e" not in json.dumps(listed, ensure_ascii=False)


@pytest.mark.slow
def test_get_lands_the_non_ascii_voice(mirror: Mirror, tmp_path: Path) -> None:
    """Typed decomposed, fetched, converted and published as ``pt_PT-tugão-medium-1``, its
    manifest naming the voice in NFC."""
    result = get(mirror.url, tmp_path, unicodedata.normalize("NFD", TUGAO))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "models" / f"{TUGAO}-1"
    assert json.loads((folder / "ttsd.json").read_text(encoding="utf-8"))["name"] == TUGAO
