"""``CharTokenizer`` gives the ids transformers' ``VitsTokenizer`` gives for the same folder, and
refuses a broken folder with ``LoadError``."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import LETTERS

from ttsd.engines.vits.chars import CharTokenizer
from ttsd.errors import LoadError, RequestError

MMS = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(LETTERS)}}
N = len(MMS)  # the next free id

TEXTS = [
    "", " ", "   ", "hello world", "Hello, World!", "HELLO   WORLD", "  leading and trailing  ",
    "tab\tand\nnewline", "it's O'Neil's", "route 66, exit 3b", "naïve café, Ærø, ÀÉÎÕÜ", "straße STRASSE ẞ",
    "İstanbul ılık", "жук and 日本語 text", "emoji 😀 here", "\u00a0nbsp\u2003em\u200bzero-width",
    "<pad>a<unk>b<PAD> <UNK>", "<pad><pad>x<pad", "church CHurch Ch cH", "<sil>go<SIL> <sil >", "ţara țară Țară",
    "a", "A", "...", "?!", "x y  z   w",
]


def save(folder: Path, vocab: dict[str, int], *, add: Callable[[Any], object] | None = None,
         **options: Any) -> Path:
    """A tokenizer folder as ``VitsTokenizer.save_pretrained`` writes it."""
    from transformers import VitsTokenizer

    folder.mkdir(parents=True)
    source = folder.parent / f"{folder.name}-vocab.json"
    source.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    options.setdefault("phonemize", False)
    tokenizer = VitsTokenizer(str(source), **options)
    if add is not None:
        add(tokenizer)
    tokenizer.save_pretrained(str(folder))
    return folder


def random_texts(vocab: dict[str, int], count: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    parts = [*vocab, *(t.upper() for t in vocab), *" \t.,!?-'0123456789éÉżЖ語", "<pad>", "<unk>", "<PAD>", "  "]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 30))) for _ in range(count)]


def assert_same(folder: Path, texts: list[str] | None = None) -> CharTokenizer:
    from transformers import VitsTokenizer

    reference = VitsTokenizer.from_pretrained(str(folder), local_files_only=True)
    ours = CharTokenizer.from_folder(folder)
    for name in ("add_blank", "normalize", "phonemize", "is_uroman", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name
    if None not in reference.get_vocab():  # ids 0..n-1 without gaps: the same vocabulary
        assert ours.vocab == reference.get_vocab()
    for text in (TEXTS + random_texts(reference.encoder)) if texts is None else texts:
        expected = reference(text, return_tensors=None)["input_ids"]
        if None in expected:  # no unknown token: transformers gives None, ttsd refuses the text
            with pytest.raises(RequestError):
                ours.encode(text)
        else:
            assert ours.encode(text) == expected, repr(text)
        assert ours.normalize_text(text) == reference.normalize_text(text), repr(text)
    return ours


def upper_vocab() -> dict[str, int]:
    return {**MMS, "A": N, "É": N + 1, "é": N + 2, "ü": N + 3, "3": N + 4, ",": N + 5}


def multi_vocab() -> dict[str, int]:
    return {**MMS, "ch": N, "CH": N + 1, "<sil>": N + 2, "ng": N + 3, "<": N + 4, ">": N + 5}


CASES: dict[str, tuple[Callable[[], dict[str, int]], dict[str, Any]]] = {
    "mms": (lambda: MMS, {}),
    "mms-no-blank": (lambda: MMS, {"add_blank": False}),
    "mms-raw": (lambda: MMS, {"normalize": False}),
    "mms-raw-no-blank": (lambda: MMS, {"normalize": False, "add_blank": False}),
    "no-pad-in-vocab": (lambda: {c: i for i, c in enumerate(LETTERS)}, {}),
    "no-pad-in-vocab-raw": (lambda: {c: i for i, c in enumerate(LETTERS)}, {"normalize": False}),
    "unk-in-vocab": (lambda: {**MMS, "<unk>": N}, {}),
    "unk-in-vocab-raw": (lambda: {**MMS, "<unk>": N}, {"normalize": False}),
    "unk-first": (lambda: {"<unk>": 0, **{c: i + 1 for i, c in enumerate(LETTERS)}}, {"normalize": False}),
    "uppercase": (upper_vocab, {}),
    "uppercase-raw": (upper_vocab, {"normalize": False}),
    "multi-char": (multi_vocab, {}),
    "multi-char-raw": (multi_vocab, {"normalize": False}),
    "multi-char-no-blank": (multi_vocab, {"add_blank": False}),
    "uroman": (lambda: MMS, {"is_uroman": True}),
    "uroman-raw": (lambda: MMS, {"is_uroman": True, "normalize": False}),
    "romanian": (lambda: {**MMS, "ţ": N, "ț": N + 1}, {"language": "ron"}),
    "romanian-raw": (lambda: {**MMS, "ţ": N, "ț": N + 1}, {"language": "ron", "normalize": False}),
    "no-unk-token": (lambda: MMS, {"unk_token": None, "normalize": False}),
    "no-special-tokens": (lambda: MMS, {"unk_token": None, "pad_token": None}),
    "other-special-tokens": (lambda: MMS, {"pad_token": "_", "unk_token": "?", "normalize": False}),
    "gapped-ids": (lambda: {"<pad>": 0, **{c: 2 * i + 3 for i, c in enumerate(LETTERS)}}, {"normalize": False}),
    "duplicate-ids": (lambda: {**MMS, "A": 1, "<unk>": N - 1}, {}),
    "duplicate-ids-raw": (lambda: {**MMS, "A": 1, "<unk>": N - 1}, {"normalize": False}),
    "no-id-0": (lambda: {c: i + 1 for i, c in enumerate(LETTERS)}, {"normalize": False}),
    "split-special-tokens": (lambda: MMS, {"split_special_tokens": True, "normalize": False}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_same_ids_as_transformers(tmp_path: Path, case: str) -> None:
    make_vocab, options = CASES[case]
    assert_same(save(tmp_path / "tok", make_vocab(), **options))


@pytest.mark.parametrize("normalize", [True, False])
def test_added_tokens_with_options(tmp_path: Path, normalize: bool) -> None:
    from transformers import AddedToken

    def add(tokenizer: Any) -> None:
        tokenizer.add_tokens([AddedToken("<sil>", lstrip=True, rstrip=True), AddedToken("ch", single_word=True),
                              "<breath>"])

    vocab = {**MMS, "<": N, ">": N + 1}
    assert_same(save(tmp_path / "tok", vocab, add=add, normalize=normalize),
                TEXTS + ["a <sil> b", "a<sil>b", "x ch y", "xchy", "ch", "a <breath>  b", "<sil>"]
                + random_texts({**vocab, "<sil>": 0, "ch": 0, "<breath>": 0}, seed=1))


def test_blank_is_the_id_0_token_not_the_pad_token(tmp_path: Path) -> None:
    ours = assert_same(save(tmp_path / "tok", {c: i for i, c in enumerate(LETTERS)}, normalize=False), ["ba"])
    # "<unk>" and "<pad>" are added after the vocabulary, in transformers' order; the blank stays "a" (id 0).
    assert (ours.unk_token_id, ours.pad_token_id) == (len(LETTERS), len(LETTERS) + 1)
    assert ours.blank_id == 0 and ours.encode("ba") == [0, 1, 0, 0, 0]


def test_mms_folder_as_the_hub_has_it(tmp_path: Path) -> None:
    """Saved before transformers 4.34: no added_tokens_decoder, a special_tokens_map.json."""
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({**MMS, "<unk>": N}), encoding="utf-8")
    config = {"add_blank": True, "is_uroman": False, "language": "eng", "normalize": True, "phonemize": False,
              "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "VitsTokenizer",
              "model_max_length": 1000000000000000019884624838656, "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    special = {"pad_token": {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False}, "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    assert_same(folder)
    (folder / "added_tokens.json").write_text(json.dumps({"<sil>": N + 1}), encoding="utf-8")
    assert_same(folder)
    special["unk_token"] = {"content": "[UNK]"}  # the map wins over tokenizer_config.json
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    assert CharTokenizer.from_folder(folder).unk_token_id == N + 2
    assert_same(folder, TEXTS + ["[UNK] x", "[unk]"])


def test_defaults_when_tokenizer_config_is_missing(tmp_path: Path) -> None:
    from transformers import VitsTokenizer

    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(MMS), encoding="utf-8")
    ours = CharTokenizer.from_folder(folder)
    reference = VitsTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (ours.add_blank, ours.normalize, ours.phonemize, ours.is_uroman) == (True, True, True, False)
    assert (ours.pad_token_id, ours.unk_token_id) == (reference.pad_token_id, reference.unk_token_id) == (0, N)
    assert ours.vocab == reference.get_vocab()
    with pytest.raises(LoadError, match="phonemizer"):  # transformers needs the phonemizer package here
        ours.encode("hello")


BAD_FOLDERS: dict[str, dict[str, str | bytes | None]] = {
    "no vocab.json": {},
    "vocab.json not JSON": {"vocab.json": '{"a": 1,'},
    "vocab.json a list": {"vocab.json": '["a", "b"]'},
    "vocab.json ids are strings": {"vocab.json": '{"a": "1"}'},
    "vocab.json ids are floats": {"vocab.json": '{"a": 1.5}'},
    "vocab.json ids are booleans": {"vocab.json": '{"a": true}'},
    "vocab.json ids are lists": {"vocab.json": '{"a": [1]}'},
    "vocab.json not UTF-8": {"vocab.json": b'{"\xff": 1}'},
    "vocab.json a folder": {"vocab.json": None},
    "tokenizer_config.json not JSON": {"vocab.json": '{"a": 0}', "tokenizer_config.json": "add_blank: true"},
    "tokenizer_config.json a list": {"vocab.json": '{"a": 0}', "tokenizer_config.json": "[]"},
    "add_blank not a boolean": {"vocab.json": '{"a": 0}', "tokenizer_config.json": '{"add_blank": "yes"}'},
    "pad_token a number": {"vocab.json": '{"a": 0}', "tokenizer_config.json": '{"pad_token": 0}'},
    "language a number": {"vocab.json": '{"a": 0}', "tokenizer_config.json": '{"language": 1}'},
    "bad added_tokens_decoder": {"vocab.json": '{"a": 0}',
                                 "tokenizer_config.json": '{"added_tokens_decoder": {"x": "<pad>"}}'},
    "special_tokens_map.json not JSON": {"vocab.json": '{"a": 0}', "special_tokens_map.json": "{"},
    "added_tokens.json ids not integers": {"vocab.json": '{"a": 0}', "added_tokens.json": '{"<x>": "1"}'},
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_raise_load_error(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, content in BAD_FOLDERS[case].items():
        if content is None:
            (folder / name).mkdir()
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(LoadError) as error:
        CharTokenizer.from_folder(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message, message


def test_missing_folder_raises_load_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="vocab.json: file not found"):
        CharTokenizer.from_folder(tmp_path / "nowhere")
