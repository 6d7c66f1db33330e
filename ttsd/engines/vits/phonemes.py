"""Text -> phoneme ids exactly as Piper does it: espeak-ng phonemes (piper-tts's own bundled
espeak-ng and phonemizer), then ``^`` BOS, ``_`` pad after every phoneme, ``$`` EOS. The voice's
phoneme-id map is ``PHONEMES_FILE`` in its model folder, read by ``PhonemeConfig``.

piper-tts (GPL-3.0) provides espeak-ng; ttsd calls it, it does not copy it. espeak-ng keeps global
state in the C library, so every call holds one process-wide lock.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import LoadError, RequestError
from .files import read_json

_ESPEAK_LOCK = threading.Lock()
# A Piper voice's phoneme map in its model folder: written by the converter, read by the engine.
PHONEMES_FILE = "phonemes.json"


@dataclass(frozen=True)
class PhonemeConfig:
    espeak_voice: str
    phoneme_id_map: dict[str, list[int]]
    speaker_id_map: dict[str, int]
    num_speakers: int

    @classmethod
    def read(cls, path: Path) -> PhonemeConfig:
        try:
            data: dict[str, Any] = read_json(path)
            return cls(
                espeak_voice=str(data.get("espeak_voice", "en-us")),
                phoneme_id_map={str(k): [int(i) for i in v] for k, v in data["phoneme_id_map"].items()},
                speaker_id_map={str(k): int(v) for k, v in data.get("speaker_id_map", {}).items()},
                num_speakers=int(data.get("num_speakers", 1)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LoadError(f"{path}: not a valid phoneme map ({exc})") from exc
        except LoadError as exc:
            raise LoadError(f"not a valid phoneme map: {exc}") from exc


_INIT_LOCK = threading.RLock()
_RUNNING: set[int] = set()  # ids of the _DeferredPackages whose __init__ is running


class _DeferredPackage(types.ModuleType):
    """A package whose ``__init__`` runs only when a name it defines is first asked for (``__all__``
    too, so ``from piper import *`` is whole); its submodules import as usual before that. As with
    an import, other threads wait while the ``__init__`` runs, one that fails runs again at the
    next name, and inside the ``__init__`` a name it has not defined yet is missing."""

    def __getattr__(self, name: str) -> Any:
        spec = self.__spec__
        if not name.isidentifier() or spec is None or spec.loader is None:
            raise AttributeError(name)
        if not name.startswith("__") and importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
            return importlib.import_module(f"{self.__name__}.{name}")  # a submodule: just it
        with _INIT_LOCK:
            if name in self.__dict__:  # defined while this thread waited
                return self.__dict__[name]
            if type(self) is not _DeferredPackage or id(self) in _RUNNING:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            _RUNNING.add(id(self))
            try:
                spec.loader.exec_module(self)
            finally:
                _RUNNING.discard(id(self))
            self.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module from here on
        return getattr(self, name)


def _defer_piper_init() -> None:
    """Let ``piper.phonemize_espeak`` and ``piper.phoneme_ids`` import without ``piper/__init__.py``,
    which imports Piper's own ONNX inference (``piper.voice``, onnxruntime): 29 MB resident in a
    process that has torch (``bench/memory_parts.py``), which ttsd never uses. ``piper`` becomes a
    ``_DeferredPackage``: the first name taken from it (``from piper import PiperVoice``) runs the
    real ``__init__`` then. Nothing to do where piper is already imported, or not installed (the
    caller's import fails)."""
    if "piper" in sys.modules:
        return
    spec = importlib.util.find_spec("piper")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = _DeferredPackage("piper")
    package.__spec__, package.__loader__ = spec, spec.loader
    package.__file__, package.__package__ = spec.origin, "piper"
    package.__dict__["__cached__"] = spec.cached
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("piper", package)


class EspeakPhonemes:
    """Sentences of phoneme ids for one voice. Thread-safe."""

    def __init__(self, config: PhonemeConfig) -> None:
        try:
            _defer_piper_init()
            from piper.phoneme_ids import phonemes_to_ids
            from piper.phonemize_espeak import EspeakPhonemizer
        except ImportError as exc:
            raise LoadError("Piper voices need the 'piper-tts' package (espeak-ng phonemizer)") from exc
        for symbol in ("^", "_", "$"):
            if symbol not in config.phoneme_id_map:
                raise LoadError(f"phoneme map lacks the required symbol {symbol!r}")
        self.config = config
        self._to_ids = phonemes_to_ids
        with _ESPEAK_LOCK:
            self._phonemizer = EspeakPhonemizer()
            self._phonemizer.phonemize(config.espeak_voice, "test")  # fails early on a bad voice

    def sentences(self, text: str) -> list[list[str]]:
        """Phonemes per sentence (only those the voice has ids for); espeak-ng decides the
        sentence boundaries, as in Piper. Clause marks (``,``, ``;``, ``:``) are followed by a
        space, words are separated by one."""
        with _ESPEAK_LOCK:
            try:
                sentences = self._phonemizer.phonemize(self.config.espeak_voice, text)
            except Exception as exc:  # the C bridge raises plain RuntimeError
                raise RequestError(f"espeak-ng could not phonemize the text: {exc}") from exc
        result = []
        for phonemes in sentences:
            # Piper skips (with a warning) phonemes the voice has no id for; so do we.
            known = [p for p in phonemes if p in self.config.phoneme_id_map]
            if any(p.strip() and p not in ",.;:!?'\"-" for p in known):
                result.append(known)
        return result

    def ids(self, phonemes: Sequence[str]) -> list[int]:
        """Model input for one sentence (or piece of one): ``^``, each phoneme's ids followed by
        ``_``, then ``$``."""
        return list(self._to_ids(list(phonemes), self.config.phoneme_id_map))
