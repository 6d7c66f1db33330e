"""Text -> character ids for MMS-TTS style VITS checkpoints, without transformers.

The ``vits`` engine needs transformers' ``VitsTokenizer`` only to turn text into character ids, and
importing transformers for that costs about 110 MB of memory and 2 s of start-up. ``CharTokenizer``
reads the same files and gives the same ids as ``VitsTokenizer.from_pretrained(folder)(text)["input_ids"]``:

* ``normalize``: lower-case every character except where a vocabulary entry matches as written,
  then drop every character that is not in ``vocab.json`` and strip surrounding whitespace;
* ``language == "ron"``: write t-comma as t-cedilla; ``is_uroman``: romanize non-ASCII text with
  the ``uroman`` package when it is installed (left as is otherwise, as transformers does);
* added and special tokens (``<pad>``, ``<unk>``, ...) are matched whole, everything else is split
  into characters, and a character outside the vocabulary becomes the unknown token;
* ``add_blank``: the token whose id is 0 in ``vocab.json`` goes between and around the characters
  of each run of text between added tokens.

Special tokens missing from ``vocab.json`` get new ids after it, in transformers' order, so every
id matches. Phonemizing tokenizers (``phonemize: true``, transformers' default) load, so that the
engine can refuse them by name, but cannot encode: ttsd does not bundle ``phonemizer``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import LoadError, RequestError
from .files import read_json

VOCAB_FILE = "vocab.json"
CONFIG_FILE = "tokenizer_config.json"
# Read only when tokenizer_config.json has no "added_tokens_decoder" (files saved before transformers 4.34).
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"

# transformers' named special tokens, in the order it gives ids to those missing from the vocabulary.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_NON_ASCII = re.compile(r"[^\x00-\x7F]")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole before the text is split into characters (e.g. ``<pad>``)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


class CharTokenizer:
    """``VitsTokenizer`` for character checkpoints: the same attributes the engine uses, the same ids."""

    def __init__(
        self,
        encoder: dict[str, int],
        *,
        added: dict[int, AddedToken] | None = None,
        special_tokens: Iterable[str] = ("<unk>", "<pad>"),
        pad_token: str | None = "<pad>",
        unk_token: str | None = "<unk>",
        language: str | None = None,
        add_blank: bool = True,
        normalize: bool = True,
        phonemize: bool = True,
        is_uroman: bool = False,
        split_special_tokens: bool = False,
    ) -> None:
        self.encoder = dict(encoder)
        self.language = language
        self.add_blank = add_blank
        self.normalize = normalize
        self.phonemize = phonemize
        self.is_uroman = is_uroman
        self.split_special_tokens = split_special_tokens
        self.pad_token = pad_token
        self.unk_token = unk_token
        self._added_decoder = dict(added or {})
        self._added_encoder = {token.content: i for i, token in self._added_decoder.items()}

        # Special tokens not yet added take their id from the vocabulary as transformers counts it
        # (``get_vocab()`` at that point), or the next free one after it.
        current = self._transformers_vocab()
        next_id = len(current)
        for token in dict.fromkeys(special_tokens):
            if not token or token in self._added_encoder:
                continue
            if token not in current:
                current[token] = next_id
                next_id += 1
            self._added_decoder[current[token]] = AddedToken(token)
            self._added_encoder[token] = current[token]

        self.vocab: dict[str, int] = {**self.encoder, **self._added_by_id()}
        self.unk_token_id = self._lookup(unk_token) if unk_token is not None else None
        self.pad_token_id = self._token_id(pad_token) if pad_token is not None else None
        # The blank add_blank puts between characters: vocab.json's id-0 token, not necessarily pad_token_id.
        self.blank_id = self._token_id({i: t for t, i in self.encoder.items()}.get(0))
        whole = _by_first_char(t.content for t in self._added_decoder.values())
        self._whole = {c: sorted(tokens, key=len, reverse=True) for c, tokens in whole.items()}  # longest first
        self._kept = _by_first_char([*self.encoder, *self._added_by_id()])  # normalize_text keeps these
        self._uroman: Any = None

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Path) -> CharTokenizer:
        """Read ``vocab.json`` and ``tokenizer_config.json`` (optional, as for transformers) from ``folder``."""
        folder = Path(folder)
        vocab_path = folder / VOCAB_FILE
        vocab = _read_json(vocab_path)
        if vocab is None:
            raise LoadError(f"{vocab_path}: file not found")
        if not isinstance(vocab, dict) or not all(_is_int(i) for i in vocab.values()):
            raise LoadError(f"{vocab_path}: must be a JSON object mapping each token to an integer id")

        config_path = folder / CONFIG_FILE
        config = _read_json(config_path)
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise LoadError(f"{config_path}: must be a JSON object")
        added: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            added = _added_tokens_decoder(config_path, config["added_tokens_decoder"])
        else:
            legacy = _read_json(folder / SPECIAL_TOKENS_FILE)
            if legacy is not None:
                if not isinstance(legacy, dict):
                    raise LoadError(f"{folder / SPECIAL_TOKENS_FILE}: must be a JSON object")
                config = {**config, **legacy}
            legacy = _read_json(folder / ADDED_TOKENS_FILE)
            if legacy is not None:
                if not isinstance(legacy, dict) or not all(_is_int(i) for i in legacy.values()):
                    raise LoadError(f"{folder / ADDED_TOKENS_FILE}: must be a JSON object mapping tokens to ids")
                added = {i: AddedToken(token) for token, i in legacy.items()}

        def flag(key: str, default: bool) -> bool:
            value = config.get(key, default)
            if not isinstance(value, bool):
                raise LoadError(f"{config_path}: {key!r} must be true or false, not {value!r}")
            return value

        def token(key: str, default: str | None = None) -> str | None:
            value = config.get(key, default)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise LoadError(f"{config_path}: {key!r} must be a token string, not {config[key]!r}")
            return value

        language = config.get("language")
        if language is not None and not isinstance(language, str):
            raise LoadError(f"{config_path}: 'language' must be a string, not {language!r}")
        pad_token, unk_token = token("pad_token", "<pad>"), token("unk_token", "<unk>")
        named = {"pad_token": pad_token, "unk_token": unk_token}
        named.update((key, token(key)) for key in NAMED_SPECIAL_TOKENS if key not in named)
        # Other "*_token" entries and "extra_special_tokens" are special tokens too, after the named ones.
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        model_specific = [
            key
            for key, value in config.items()
            if key.endswith("_token") and key not in named and (isinstance(value, str) or _is_token_dict(value))
        ]
        if isinstance(extra, dict):
            model_specific += [key for key in extra if key not in model_specific]
            config = {**config, **extra}
            extra = []
        if not isinstance(extra, list):
            raise LoadError(f"{config_path}: 'extra_special_tokens' must be a list of tokens")
        specials = [named[key] for key in NAMED_SPECIAL_TOKENS] + [token(key) for key in model_specific]
        specials += [t.get("content") if isinstance(t, dict) else t for t in extra]
        if not all(t is None or isinstance(t, str) for t in specials):
            raise LoadError(f"{config_path}: special tokens must be strings")

        return cls(
            {str(t): int(i) for t, i in vocab.items()},
            added=added,
            special_tokens=[t for t in specials if t is not None],
            pad_token=pad_token,
            unk_token=unk_token,
            language=language,
            add_blank=flag("add_blank", True),
            normalize=flag("normalize", True),
            phonemize=flag("phonemize", True),
            is_uroman=flag("is_uroman", False),
            split_special_tokens=flag("split_special_tokens", False),
        )

    # -- encoding -----------------------------------------------------------------------------
    def normalize_text(self, text: str) -> str:
        """Lower-case ``text``, except where a vocabulary entry matches it as written (the first one
        in vocabulary order, as ``VitsTokenizer.normalize_text``)."""
        out: list[str] = []
        i = 0
        while i < len(text):
            word = next((w for w in self._kept.get(text[i], ()) if text.startswith(w, i)), None)
            if word is None:
                out.append(text[i].lower())
                i += 1
            else:
                out.append(word)
                i += len(word)
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        """The ids ``VitsTokenizer(text)["input_ids"]`` gives. ``RequestError`` where it would give
        ``None``: a character outside the vocabulary when the tokenizer has no unknown token."""
        if self.phonemize:
            raise LoadError("this tokenizer phonemizes with the 'phonemizer' package, which ttsd does not bundle")
        if self.normalize:
            text = self.normalize_text(text)
        if self.language == "ron":
            text = text.replace("ț", "ţ")
        if self.is_uroman and _NON_ASCII.search(text):
            text = self._romanize(text)
        if self.normalize:
            text = "".join(c for c in text if c in self.encoder).strip()

        if self.split_special_tokens:  # no added-token matching; an empty text still gets one blank
            ids = self._char_ids(text)
        else:
            ids = []
            for piece in self._split_added(text):
                if piece in self._added_encoder:
                    ids.append(self._added_encoder[piece])
                elif piece:
                    ids += self._char_ids(piece)
        if None in ids:
            unknown = sorted({c for c in text if self._token_id(c) is None})
            shown = ", ".join(repr(c) for c in unknown[:8]) or "the blank"
            raise RequestError(f"the voice has no id (and no unknown token) for: {shown}")
        return [i for i in ids if i is not None]

    # -- helpers ------------------------------------------------------------------------------
    def _split_added(self, text: str) -> list[str]:
        """Cut ``text`` around added tokens (leftmost, then longest match), then apply their
        lstrip/rstrip/single_word options as transformers does."""
        pieces: list[str] = []
        start = i = 0
        while i < len(text):
            match = next((t for t in self._whole.get(text[i], ()) if text.startswith(t, i)), None)
            if match is None:
                i += 1
                continue
            pieces += [text[start:i], match] if i > start else [match]
            start = i = i + len(match)
        if start < len(text):
            pieces.append(text[start:])

        for i, piece in enumerate(pieces):
            if piece not in self._added_encoder:
                continue
            token = self._added_decoder.get(self._added_encoder[piece])
            if token is None:
                continue
            left = pieces[i - 1] if i > 0 else None
            right = pieces[i + 1] if i < len(pieces) - 1 else None
            if token.rstrip and right:
                pieces[i + 1] = right.lstrip()
            if token.lstrip and left:
                pieces[i - 1] = left.rstrip()
            if token.single_word:
                if left and left[-1] != " ":
                    pieces[i - 1] += piece
                    pieces[i] = ""
                elif right and right[0] != " ":
                    pieces[i + 1] = piece + pieces[i + 1]
                    pieces[i] = ""
        return pieces

    def _char_ids(self, text: str) -> list[int | None]:
        ids = [self._token_id(c) for c in text]
        if not self.add_blank:
            return ids
        with_blanks = [self.blank_id] * (2 * len(ids) + 1)
        with_blanks[1::2] = ids
        return with_blanks

    def _lookup(self, token: str | None) -> int | None:
        if token is None:
            return None
        found = self._added_encoder.get(token)
        return self.encoder.get(token) if found is None else found

    def _token_id(self, token: str | None) -> int | None:
        found = self._lookup(token)
        return self.unk_token_id if found is None else found

    def _added_by_id(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self._added_decoder.items())}

    def _transformers_vocab(self) -> dict[str | None, int]:
        """``VitsTokenizer.get_vocab()``: ids 0..len(vocab)-1 (a gap gives ``None``), then added tokens."""
        decoder = {i: t for t, i in self.encoder.items()}
        vocab: dict[str | None, int] = {}
        for i in range(len(self.encoder)):
            vocab[self._added_decoder[i].content if i in self._added_decoder else decoder.get(i)] = i
        vocab.update(self._added_by_id())
        return vocab

    def _romanize(self, text: str) -> str:
        if self._uroman is None:
            try:
                import uroman
            except ImportError:
                _log.warning("text has non-Roman characters but the 'uroman' package is not installed")
                return text
            self._uroman = uroman.Uroman()
        return str(self._uroman.romanize_string(text))


def _by_first_char(tokens: Iterable[str]) -> dict[str, list[str]]:
    """Non-empty ``tokens`` grouped by first character, in their order."""
    groups: dict[str, list[str]] = {}
    for token in tokens:
        if token:
            groups.setdefault(token[0], []).append(token)
    return groups


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_dict(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("content"), str)


def _read_json(path: Path) -> Any:
    """The parsed file, ``None`` if it does not exist, ``LoadError`` if it cannot be read or parsed."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def _added_tokens_decoder(path: Path, data: object) -> dict[int, AddedToken]:
    """tokenizer_config.json's ``{"<id>": {"content": ..., "lstrip": ..., ...}}``."""
    added: dict[int, AddedToken] = {}
    if not isinstance(data, dict):
        raise LoadError(f"{path}: 'added_tokens_decoder' must be a JSON object")
    for key, value in data.items():
        if (
            not isinstance(key, str)
            or not key.lstrip("-").isdigit()
            or not isinstance(value, dict)
            or not isinstance(value.get("content"), str)
        ):
            raise LoadError(f"{path}: 'added_tokens_decoder' entry {key!r} is not an id with a token")
        flags = {k: value.get(k, False) for k in ("lstrip", "rstrip", "single_word")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise LoadError(f"{path}: 'added_tokens_decoder' entry {key!r} has a non-boolean option")
        added[int(key)] = AddedToken(value["content"], **flags)
    return added
