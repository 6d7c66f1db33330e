"""Piper's real catalog has keys and names beyond ASCII: ``pt_PT-tugão-medium`` (a non-ASCII key)
and ``he_IL-saspeech-medium`` (U+200E LEFT-TO-RIGHT MARK in ``name_native``). They are accepted
(keys in NFC, display fields shown as their words), while keys that would be unsafe as folder
names or on a terminal (separators, ``.``/``..``, control and bidi characters, too long) are
refused, and named escaped."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_server import Mirror, VoiceFiles, add_voice, serve
from test_catalog import get, invoke, nothing_in_models, one_line_error

from ttsd.errors import CatalogError
from ttsd.fetch.index import check_voice_key, display_text, parse_catalog

TUGAO = "pt_PT-tugão-medium"
HEBREW = "he_IL-saspeech-medium"
HOSTILE = {  # keys a mirror could list, and what each would do as a folder name or on a terminal
    "a/b": "a/b",  # a folder below the models dir
    "..": "..",  # the models dir's parent
    "esc\x1b[31mred": "\\x1b",  # a terminal escape
    "evil\u202egnp.exe": "\\u202e",  # RIGHT-TO-LEFT OVERRIDE: shows as evilexe.png
}


def real_shapes(mirror: Mirror, files: VoiceFiles) -> dict[str, Any]:
    """The two entries as Piper's voices.json has them (every field: key, name, language{code,
    family, region, name_native, name_english, country_english}, quality, num_speakers,
    speaker_id_map, files{path: {size_bytes, md5_digest}}, aliases), the files served by the test
    mirror under their real, non-ASCII paths (``pt/pt_PT/tugão/medium/…``). The catalog is UTF-8
    as Piper writes it, not \\u-escaped; the Portuguese key is written decomposed (NFD), as
    some tools write it."""
    voices: dict[str, Any] = {}
    entry = add_voice(mirror, voices, TUGAO, files, language=("pt_PT", "Portuguese", "Portugal"))
    entry["language"]["name_native"] = "Português"
    assert next(iter(entry["files"])).startswith("pt/pt_PT/tugão/medium/")
    decomposed = unicodedata.normalize("NFD", TUGAO)
    voices[decomposed] = {**voices.pop(TUGAO), "key": decomposed}
    entry = add_voice(mirror, voices, HEBREW, files, language=("he_IL", "Hebrew", "Israel"))
    entry["language"]["name_native"] = "\u200eעברית"  # as in Piper's voices.json
    entry["aliases"] = ["he-saspeech"]
    publish_utf8(mirror, voices)
    return voices


def publish_utf8(mirror: Mirror, voices: dict[str, Any]) -> None:
    mirror.files["voices.json"] = json.dumps(voices, ensure_ascii=False, indent=4).encode("utf-8")


@pytest.fixture(scope="module")
def files() -> VoiceFiles:
    return VoiceFiles.builtin()


@pytest.fixture
def mirror(files: VoiceFiles) -> Iterator[Mirror]:
    with serve() as m:
        real_shapes(m, files)
        yield m


def with_hostile_keys(mirror: Mirror) -> dict[str, Any]:
    """The real catalog plus entries listed under hostile keys (else like the Portuguese one)."""
    voices = json.loads(mirror.files["voices.json"])
    good = next(v for k, v in voices.items() if unicodedata.normalize("NFC", k) == TUGAO)
    for key in HOSTILE:
        voices[key] = {**good, "key": key}
    publish_utf8(mirror, voices)
    return voices


@pytest.mark.parametrize("escaped", [False, True])
def test_the_real_entries_are_accepted(mirror: Mirror, escaped: bool) -> None:
    raw = mirror.files["voices.json"]
    if escaped:  # the same catalog written with \u escapes
        raw = json.dumps(json.loads(raw)).encode()
    catalog = parse_catalog(raw, "voices.json")
    assert catalog.invalid == {}
    assert sorted(catalog.voices) == [HEBREW, TUGAO]  # the key in NFC
    assert catalog.voices[HEBREW].language.name_native == "עברית"  # shown as its word
    assert catalog.find(unicodedata.normalize("NFD", TUGAO)).key == TUGAO  # however it is typed
    assert catalog.find("he-saspeech").key == HEBREW
    assert [v.key for v in catalog.search("português")] == [TUGAO]
    assert [v.key for v in catalog.search(language="he")] == [HEBREW]


@pytest.mark.parametrize("key", [
    "a/b", "..", ".", ".hidden", "-voice", "evil\u202egnp.exe", "bidi\u2066x\u2069", "emb\u202ax\u202c",
    "x\u200emark", "x\u200fmark", "zero\u200dwidth", "bom\ufeff", "esc\x1b[31mred", "tab\tkey", "new\nline",
    "nul\x00", "del\x7f", "c1\x85", "a b", "nbsp\u00a0x", "", "x" * 101, "語" * 51, "voice.partial", "\\windows",
    "dollar$sign", "colon:x", "lone\ud800", "a\u0301\u0301",  # an uncomposable mark: voice names take none
    "\u3164filler", 7, None,
])
def test_unsafe_keys_are_refused_and_shown_escaped(key: object) -> None:
    with pytest.raises(CatalogError, match="invalid voice key") as info:
        check_voice_key(key)
    message = str(info.value)
    assert message.isascii() and message.isprintable(), message  # nothing a terminal would act on
    if isinstance(key, str) and 0 < len(key) < 20:
        assert ascii(key) in message  # named, escaped


@pytest.mark.parametrize("key", [TUGAO, unicodedata.normalize("NFD", TUGAO), "ru_RU-дмитрий-medium",
                                 "zh_CN-语音-medium", "el_GR-ραπσωδός-low", "vi_VN-vais1000-medium", "語" * 50])
def test_keys_of_any_script_pass_in_nfc(key: str) -> None:
    assert check_voice_key(key) == unicodedata.normalize("NFC", key)
    assert len(check_voice_key(key).encode()) <= 150  # with "-VERSION" and work suffixes, within 255 bytes


def test_display_text_keeps_the_words_and_nothing_a_terminal_acts_on() -> None:
    assert display_text("\u200eעברית") == "עברית"
    assert display_text("a\x1b[31mb\u202ec\u2066d\u2069\n") == "a[31mbcd"
    assert display_text("می\u200cخواهم") == "می\u200cخواهم"  # a ZWNJ spells Persian words: kept
    assert display_text("a\u00a0b\u2028c") == "a b c"
    assert display_text("pua\ue000 \ud800") == "pua\\ue000 \\ud800"  # unprintable: escaped, not dropped


def test_display_fields_are_shown_not_refused(files: VoiceFiles) -> None:
    """Control, bidi and markup-looking characters in display fields do not cost the entry."""
    with serve() as m:
        voices = real_shapes(m, files)
    entry = voices[HEBREW]
    entry["language"].update(name_english="\u202eHebrew\x1b[2J", country_english="[/x] [bold]Israel")
    entry["name"] = "sas\u2067peech"
    cat = parse_catalog(json.dumps(voices).encode(), "voices.json")
    assert cat.invalid == {}
    lang = cat.voices[HEBREW].language
    assert (lang.name_english, lang.country_english, cat.voices[HEBREW].name) == \
        ("Hebrew[2J", "[/x] [bold]Israel", "saspeech")


def test_search_lists_both_without_a_warning(mirror: Mirror) -> None:
    result = invoke("models", "search", "--mirror", mirror.url)
    assert result.exit_code == 0, result.output
    assert "2 of 2 voices" in result.stdout and TUGAO in result.stdout and HEBREW in result.stdout
    assert "\u200e" not in result.output
    assert "refused" not in result.stderr and "warning" not in result.stderr, result.stderr
    listed = json.loads(invoke("models", "search", "--mirror", mirror.url, "--json").stdout)
    assert sorted(v["key"] for v in listed) == [HEBREW, TUGAO]
    hebrew = next(v for v in listed if v["key"] == HEBREW)
    assert hebrew["language"]["name_native"] == "עברית" and hebrew["aliases"] == ["he-saspeech"]
    only = invoke("models", "search", "tugão", "--mirror", mirror.url, "--json")
    assert [v["key"] for v in json.loads(only.stdout)] == [TUGAO]


def test_search_shows_markup_looking_names_as_text(mirror: Mirror) -> None:
    """A catalog's text is never read as rich markup: '[/x]' once ended search with exit 1."""
    voices = json.loads(mirror.files["voices.json"])
    voices[HEBREW]["language"]["country_english"] = "[/x][red]Israel"
    publish_utf8(mirror, voices)
    result = invoke("models", "search", "--mirror", mirror.url)
    assert result.exit_code == 0, result.output
    assert "[/x][red]Israel" in result.stdout, result.stdout


def test_search_names_a_hostile_key_escaped_and_lists_the_rest(mirror: Mirror) -> None:
    with_hostile_keys(mirror)
    result = invoke("models", "search", "--mirror", mirror.url)
    assert result.exit_code == 0, result.output
    assert "2 of 2 voices" in result.stdout
    assert f"warning: {len(HOSTILE)} catalog entries refused" in result.stderr
    for raw in ("\x1b", "\u202e"):
        assert raw not in result.output
    assert "invalid voice key" in result.stderr


@pytest.mark.parametrize("key", list(HOSTILE))
def test_get_of_a_hostile_key_is_refused_naming_it_escaped(mirror: Mirror, tmp_path: Path, key: str) -> None:
    from ttsd.errors import ManifestError
    from ttsd.manifest import check_name

    with_hostile_keys(mirror)
    result = get(mirror.url, tmp_path, key)
    one_line_error(result, 15, "invalid voice key", HOSTILE[key])
    assert "\x1b" not in result.output and "\u202e" not in result.output
    try:  # a key no voice name could be is refused before the network (offline too: 15, not 14)
        check_name(key)
    except ManifestError:
        assert mirror.requests == []
    else:  # a fleet voice's name could be it: the catalog refuses the entry, no file of it asked for
        assert "is refused" in result.stderr
        assert [path for path, _ in mirror.requests] == ["ttsd-index.json", "voices.json"]
    nothing_in_models(tmp_path)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.onnx*"))


def test_get_of_an_unlisted_hostile_name_is_named_escaped(mirror: Mirror, tmp_path: Path) -> None:
    result = get(mirror.url, tmp_path, "nope\x1b]0;owned\x07")
    one_line_error(result, 15, "invalid voice key 'nope\\x1b]0;owned\\x07'")
    assert mirror.requests == []  # refused before the network
    assert "\x1b" not in result.output and "\x07" not in result.output


@pytest.mark.slow
def test_get_lands_the_non_ascii_voice(mirror: Mirror, tmp_path: Path) -> None:
    """Typed decomposed, fetched from its non-ASCII paths, converted and published as
    ``pt_PT-tugão-medium-1`` (an NFC folder name), its manifest naming the voice in NFC; the folder
    verifies as the daemon will check it, and ``models list`` shows it."""
    from ttsd.manifest import verify

    result = get(mirror.url, tmp_path, unicodedata.normalize("NFD", TUGAO))
    assert result.exit_code == 0, result.output
    assert [name for name in (p.name for p in (tmp_path / "models").iterdir())] == [f"{TUGAO}-1"]
    folder = tmp_path / "models" / f"{TUGAO}-1"
    manifest = verify(folder)
    assert manifest.name == TUGAO and manifest.version == "1"
    assert json.loads((folder / "ttsd.json").read_text(encoding="utf-8"))["name"] == TUGAO
    assert "pt/pt_PT/tugão/medium/MODEL_CARD" in [path for path, _ in mirror.requests]
    listed = invoke("models", "list", "--models", str(tmp_path / "models"), "--json")
    assert listed.exit_code == 0, listed.output
    assert [(v["voice"], v["version"]) for v in json.loads(listed.stdout)] == [(TUGAO, "1")]
