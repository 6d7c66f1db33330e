"""The ``vits`` engine: VITS voices on torch, CPU, computed by ``model.NativeVits`` from the folder's
``config.json`` + ``model.safetensors`` (transformers' ``VitsModel`` is the reference it is tested
against; serving does not import transformers).

Serves two kinds of model folder:

* a Hugging Face VITS checkpoint (e.g. MMS-TTS): ``config.json``, ``model.safetensors`` and a
  character ``VitsTokenizer`` (``vocab.json``, ``tokenizer_config.json``);
* a converted Piper voice (``ttsd models import-piper``): ``config.json`` with
  ``model_type: piper_vits``, ``model.safetensors`` and ``phonemes.json`` (espeak-ng phonemes).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import LoadError, RequestError
from ...manifest import Manifest
from ...options import SynthesisOptions
from ...text import DEFAULT_MAX_CHARS, has_speech, split_long, split_sentences
from .. import precision
from ..base import Engine
from ..threads import process_count, process_threads
from . import kernels
from .chars import CharTokenizer
from .model import Encoded, NativeVits, _padded
from .phonemes import PHONEMES_FILE, EspeakPhonemes, PhonemeConfig

# The longest model input one unit may have. The text encoder's self-attention holds
# heads x T x T scores (and relative-position skews of T x 2T), so its memory and time grow with
# the square of a sentence's length: an unpunctuated 5,000-character text took the daemon to 9 GB.
# Longer sentences are cut into pieces of at most this many ids (about 250 phonemes, 12 s of
# speech) at clause marks, else between words, and the pieces are spoken back to back. Chosen by
# measurement (bench/split.py): up to 512 ids the text side lifts a warmed-up process's peak by
# ~5 MB (768: 13 MB, 1024: 44, 1536: 149) and its time per id is flat; and Whisper made fewer
# errors on 8 long sentences cut at 512 (3.9 % WER) than spoken whole (6.1 %; 384 and 768: 4.3 %
# and 4.8 %).
MAX_UNIT_IDS = 512
log = logging.getLogger("ttsd.engines")


# A request's sentences after its first are text-encoded together, as many as fit in this many
# rows (the longest's padded length each, so the attention's memory stays within one longest unit's).
# Over the four-sentence Wyoming text, the three later sentences' encoder took 16.7 ms together
# against 21.2 one by one, the same to the bit (fp32, Intel Xeon with AMX, 2 threads).
ENCODE_ROWS = MAX_UNIT_IDS


class _Encodings:
    """A request's units' text encodings (``NativeVits.encode``). The first unit is encoded alone,
    so that the first audio waits for nothing else; a later unit with its next ones, as many as fit
    in ``ENCODE_ROWS``, while the audio before them plays. Each encoding is handed out once."""

    def __init__(self, ids: list[list[int]]) -> None:
        self.ids = ids
        self.ready: dict[int, Encoded] = {}

    def take(self, model: NativeVits, index: int) -> Encoded:
        if index not in self.ready:
            group = [index]
            while index > 0 and (following := index + len(group)) < len(self.ids):
                lengths = [len(self.ids[i]) for i in (*group, following)]
                if len(lengths) * model.encode_rows(lengths) > ENCODE_ROWS:
                    break
                group.append(following)
            self.ready.update(zip(group, model.encode([self.ids[i] for i in group]), strict=True))
        return self.ready.pop(index)


# A request's units after its first run the prior flow together, as many as fit in this many rows
# (``NativeVits.stack_rows`` each: about four sentences of Piper's medium voices). One pass over
# several pays the couplings' small operations once: bench/flows.py measured the four later
# sentences of bench/rtf.py's paragraph at 0.53-0.77x their time one by one in bf16 and 0.89-0.93x
# in fp32, the Wyoming bench's three at 0.68-0.93x and 0.83-0.88x (two runs, Intel Xeon with AMX,
# 2 threads). It also bounds what a request cancelled or refused for its length computes ahead of
# its audio.
FLOW_ROWS = 1536  # a multiple of model.STACK_BUCKET: a stack padded to it stays within this


class _Flows:
    """A request's later units' decoder input (``NativeVits.flow_many``). The first unit runs its
    flow alone, so that the first audio waits for nothing else; a later unit runs it with the units
    after it, as many as fit in ``FLOW_ROWS``, while the audio before them plays. Each unit's noise
    comes from its own generator (``VitsEngine._prior``), so drawing a later unit's early changes
    nothing. Each result is handed out once."""

    def __init__(self, ids: list[list[int]], encodings: _Encodings) -> None:
        # the units' ids and encodings, not the units: a unit holds this, and a cycle would keep a
        # request's tensors until Python's cycle collector ran (unload and malloc rely on none)
        self.ids, self.encodings = ids, encodings
        self.priors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # made, not yet flowed
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def take(
        self, engine: VitsEngine, index: int, options: SynthesisOptions
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if index not in self.ready:
            model = engine._require()
            group: list[int] = []
            priors: list[torch.Tensor] = []
            speaker: torch.Tensor | None = None
            rows = 0
            for j in range(index, len(self.ids)):
                made = self.priors.pop(j, None)
                if made is None:
                    made = engine._prior(Unit(self.ids[j], encodings=self.encodings, index=j), options)
                prior, speaker = made
                need = model.stack_rows(prior.shape[0])
                if group and rows + need > FLOW_ROWS:
                    self.priors[j] = (prior, speaker)  # its noise is drawn: kept for its own group
                    break
                group.append(j)
                priors.append(prior)
                rows += need
            with torch.inference_mode():
                self.ready.update(zip(group, model.flow_many(priors, speaker), strict=True))
        return self.ready.pop(index)


@dataclass(frozen=True)
class Unit:
    """Model input for one sentence, or one piece of an over-long sentence (``continues``: not
    its first piece). ``encodings``: the request's, where it was split into units here; ``index``:
    this unit's place in it."""

    ids: list[int]
    continues: bool = False
    encodings: _Encodings | None = field(default=None, repr=False, compare=False)
    index: int = 0
    flows: _Flows | None = field(default=None, repr=False, compare=False)


class VitsEngine(Engine[Unit]):
    name = "vits"

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        threads: int | None = None,
        max_audio_seconds: float | None = None,
        precision: str | None = None,
        kernel_cache: Path | None = None,
    ) -> None:
        """``kernel_cache``: the file where the kernel paths measured on this box are kept
        (``ttsd.engines.vits.kernels``); None measures at every load."""
        super().__init__(
            folder,
            manifest,
            max_chars=max_chars,
            threads=threads,
            max_audio_seconds=max_audio_seconds,
            precision=precision,
        )
        self.dtype = torch.float32  # what load() chose: see ttsd.engines.precision
        self.kernel_cache = kernel_cache
        self.kernels: dict[str, kernels.Choice] = {}  # what load() chose: see ttsd.engines.vits.kernels
        self.model: NativeVits | None = None
        self._phonemes: EspeakPhonemes | None = None
        self._tokenizer: CharTokenizer | None = None

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        process_threads(self.threads)
        if not (self.folder / "model.safetensors").is_file():
            raise LoadError(f"{self.folder}: no model.safetensors (the vits engine loads safetensors only)")
        feature = precision.native_bf16()
        chosen, why = precision.resolve(self.precision, self.manifest.precision, feature)
        (log.warning if chosen == "bf16" and feature is None else log.info)(
            "%s %s computes in %s (%s)", self.manifest.name, self.manifest.version, chosen, why
        )
        self.dtype = torch.bfloat16 if chosen == "bf16" else torch.float32
        # LoadError with the reason for a bad config or bad weights
        model = NativeVits(self.folder, dtype=self.dtype)
        self.kernels = kernels.choose(model, self.kernel_cache, self._label(), serving=process_count())
        config = model.config
        if int(config.sampling_rate) != self.manifest.sample_rate:
            raise LoadError(
                f"{self.folder}: config.json says {config.sampling_rate} Hz but ttsd.json says "
                f"{self.manifest.sample_rate} Hz"
            )
        if (self.folder / PHONEMES_FILE).is_file():
            self._phonemes = EspeakPhonemes(PhonemeConfig.read(self.folder / PHONEMES_FILE))
        elif (self.folder / "vocab.json").is_file():
            self._tokenizer = CharTokenizer.from_folder(self.folder)
            if self._tokenizer.phonemize:
                raise LoadError(
                    f"{self.folder}: this tokenizer phonemizes with the 'phonemizer' package, "
                    "which ttsd does not bundle; use a character (MMS-style) checkpoint"
                )
            largest = max(self._tokenizer.encoder.values(), default=-1)
            if largest >= config.vocab_size:
                raise LoadError(
                    f"{self.folder}: vocab.json uses id {largest} but the model has only {config.vocab_size} symbols"
                )
        else:
            raise LoadError(f"{self.folder}: neither {PHONEMES_FILE} (Piper voice) nor vocab.json (tokenizer)")
        self.model = model

    def unload(self) -> None:
        """Drop the model: its tensors are freed as their last reference goes (the engine holds no
        cycles; measured, a full ``gc.collect()`` afterwards found nothing to free). No collection
        here: a full one takes about 50 ms with torch loaded, holding Python's lock, so it stalled
        the event loop at every unload and made a rollback that called off a load answer 0.25 s
        late on a busy box."""
        self.model = None
        self._phonemes = None
        self._tokenizer = None

    def info(self) -> dict[str, Any]:
        model = self._require()
        speakers = self._phonemes.config.speaker_id_map if self._phonemes else {}
        return {
            "num_speakers": int(model.config.num_speakers),
            "speakers": speakers,
            "frontend": "espeak-ng phonemes" if self._phonemes else "characters",
            "precision": "bf16" if self.dtype == torch.bfloat16 else "fp32",
            "kernels": {kind: choice.to_json() for kind, choice in self.kernels.items()},
            # milliseconds per decoder window, by width in frames, as measured at warm-up (the plans' costs)
            "windows": {str(w): round(t * 1000, 2) for w, t in model.decoder.window_seconds.items()},
        }

    def _label(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def warmup(self) -> None:
        """The warm-up sentences (``Engine.warmup``), with two choices made for the thread count the
        workers synthesize on (``process_count``) where the warm-up runs on it (a quiet start; the
        loader's warm-up drops to one thread beside live requests or busy cores):

        * the kernel paths, when the load found no choice for that count (``kernels.choose``:
          cached, else measured now);
        * the decoder's window times, which its plans are costed by (``measure_windows``): cached
          for this box and count, else measured now (about 0.1 s) and cached. A warm-up on another
          count takes them from the cache if they are there, else the decoder keeps its work model:
          times taken on one core beside live requests would not be the workers'."""
        model = self._require()
        here, serving = torch.get_num_threads(), process_count()
        if here == serving and any(c.source != "forced" and c.threads != here for c in self.kernels.values()):
            self.kernels = kernels.choose(model, self.kernel_cache, self._label(), serving=here)
        super().warmup()
        decoder = model.decoder
        if not decoder.usable_widths():  # a decoder too deep for the windows decodes whole: no plans
            return
        cached = kernels.cached_window_times(decoder, self.kernel_cache, serving)
        if cached is not None:
            decoder.window_seconds = cached
            if here == serving:
                decoder.warm_windows()  # every width's kernels built before the first request
            how = f"cached for {serving} thread(s)"
        elif here == serving:
            kernels.keep_window_times(decoder, self.kernel_cache, decoder.measure_windows())
            how = f"measured on {here} thread(s)"
        else:
            log.info("%s: decoder windows planned by their work (no times for %d thread(s))", self._label(), serving)
            return
        log.info(
            "%s: decoder windows %s ms (%s)",
            self._label(),
            ", ".join(f"{w} frames {t * 1000:.1f}" for w, t in decoder.window_seconds.items()),
            how,
        )

    def default_warmup(self) -> Sequence[str]:
        if self._tokenizer is None:
            return super().default_warmup()
        # A character model in any language: build words from letters the vocabulary has.
        letters = [t for t in self._tokenizer.vocab if len(t) == 1 and t.isalpha()]
        if not letters:
            return super().default_warmup()
        words = ["".join(letters[i : i + 4]) for i in range(0, min(len(letters), 24), 4)]
        return (" ".join(words),)

    # -- synthesis ----------------------------------------------------------------------------
    def _require(self) -> NativeVits:
        if self.model is None:
            raise LoadError(f"{self.folder}: engine used before load()")
        return self.model

    def _units(self, text: str, options: SynthesisOptions) -> Sequence[Unit]:
        self._require()
        self._speaker_id(options)  # refuse a bad speaker before any work
        units: list[Unit] = []
        if self._phonemes is not None:
            # Piper's ids: ^ _ then each phoneme followed by _, then $ (2 per phoneme + 3)
            limit = (MAX_UNIT_IDS - 3) // 2
            for phonemes in self._phonemes.sentences(text):
                pieces = split_long(phonemes, limit, space=" ")
                units.extend(Unit(self._phonemes.ids(p), i > 0) for i, p in enumerate(pieces))
            return self._shared(units)
        assert self._tokenizer is not None
        limit = (MAX_UNIT_IDS - 1) // 2 if self._tokenizer.add_blank else MAX_UNIT_IDS  # blanks between characters
        for sentence in split_sentences(text):
            first = True
            for piece in split_long(" ".join(sentence.split()), limit, space=" "):
                if ids := self._tokenize("".join(piece)):
                    units.append(Unit(ids, not first))
                    first = False
        return self._shared(units)

    @staticmethod
    def _shared(units: list[Unit]) -> list[Unit]:
        """The units, each knowing the request's ``_Encodings`` and ``_Flows`` and its place in them."""
        ids = [unit.ids for unit in units]
        encodings = _Encodings(ids)
        flows = _Flows(ids, encodings)
        return [replace(unit, encodings=encodings, index=i, flows=flows) for i, unit in enumerate(units)]

    def _continues(self, unit: Unit) -> bool:
        return unit.continues

    def _check_speaker(self, options: SynthesisOptions) -> None:
        self._speaker_id(options)

    def _tokenize(self, sentence: str) -> list[int]:
        tokenizer = self._tokenizer
        assert tokenizer is not None
        vocab = tokenizer.vocab
        text = tokenizer.normalize_text(sentence) if tokenizer.normalize else sentence
        if tokenizer.is_uroman and re.search(r"[^\x00-\x7F]", text):
            try:
                import uroman  # noqa: F401
            except ImportError:
                raise RequestError("this voice needs the 'uroman' package to read non-Latin text") from None
        elif unknown := sorted({c for c in text if unicodedata.category(c)[0] in "LN" and c not in vocab}):
            shown = ", ".join(repr(c) for c in unknown[:8])
            raise RequestError(f"the voice cannot speak these characters: {shown}")
        ids = tokenizer.encode(sentence)
        if any(i >= self._require().config.vocab_size for i in ids):
            raise RequestError("the voice cannot speak some characters of this text")
        blank = tokenizer.blank_id if tokenizer.add_blank else None
        if not has_speech(sentence) or all(i in (blank, tokenizer.unk_token_id) for i in ids):
            return []
        return list(ids)

    def _speaker_id(self, options: SynthesisOptions) -> int | None:
        model = self._require()
        count = int(model.config.num_speakers)
        speaker = options.speaker
        if speaker is None:
            return 0 if count > 1 else None
        if isinstance(speaker, str) and not (speaker.isascii() and speaker.isdigit()):
            names = self._phonemes.config.speaker_id_map if self._phonemes else {}
            if speaker not in names:
                known = f" (known: {', '.join(sorted(names)[:10])})" if names else ""
                raise RequestError(f"unknown speaker {speaker!r}{known}")
            return names[speaker]
        index = int(speaker)
        if not 0 <= index < max(count, 1):
            raise RequestError(f"speaker {index} out of range: this voice has {count} speaker(s)")
        return index if count > 1 else None

    def _prior(self, unit: Unit, options: SynthesisOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flow's input for ``unit`` and the speaker embedding (``NativeVits.prior``)."""
        model = self._require()
        config = model.config
        generator = None
        if options.seed is not None:
            generator = torch.Generator().manual_seed(options.seed)
        noise = config.noise_scale if options.noise_scale is None else options.noise_scale
        noise_w = config.noise_scale_duration if options.noise_scale_duration is None else options.noise_scale_duration
        length_scale = (1.0 / float(config.speaking_rate)) / options.speed
        with torch.inference_mode():
            encoded = None if unit.encodings is None else unit.encodings.take(model, unit.index)
            return model.prior(
                unit.ids,
                encoded=encoded,
                noise_scale=noise,
                noise_scale_duration=noise_w,
                length_scale=length_scale,
                speaker_id=self._speaker_id(options),
                generator=generator,
                max_seconds=self.max_audio_seconds,
            )

    def _latents(self, unit: Unit, options: SynthesisOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
        if unit.index > 0 and unit.flows is not None:  # a later unit: with the ones after it
            return unit.flows.take(self, unit.index, options)
        prior, speaker = self._prior(unit, options)
        with torch.inference_mode():
            return self._require().flow(prior, speaker)

    def _render(self, unit: Unit, options: SynthesisOptions) -> np.ndarray:
        latents, speaker = self._latents(unit, options)
        with torch.inference_mode():
            return self._require().decoder(latents, speaker).numpy().astype(np.float32)

    def _render_pieces(self, unit: Unit, options: SynthesisOptions) -> Iterator[np.ndarray]:
        return self._pieces(unit, options, first=False)

    def _render_first_pieces(self, unit: Unit, options: SynthesisOptions) -> Iterator[np.ndarray]:
        return self._pieces(unit, options, first=True)

    def _pieces(self, unit: Unit, options: SynthesisOptions, *, first: bool) -> Iterator[np.ndarray]:
        """The decoder window by window, each piece out as soon as it is decoded.

        ``first``: the request's first sentence, whose first piece is the request's first audio.
        Its first window is a small one (about 0.2 s of audio, ``first_piece``), and the flow runs
        first on only the frames that window reads plus the flow's reach (``flow_radius``), which
        gives those frames (exactly in fp32; in bf16 a product's rounding may differ by a step
        with its row count), then on the whole sentence for the other windows: the first
        audio waits for a third or less of a sentence's flow (on the built-in voice in bf16, 128
        frames of about 384), for a little more work in all. Later sentences are decoded in the
        cheapest windows: the audio before them is still playing, and their flow runs with the
        units after them (``_Flows``). (Over Wyoming each sentence of a text stream is a request
        of its own, so each gets the early first piece.)"""
        model = self._require()
        decoder = model.decoder
        if not first and unit.index > 0 and unit.flows is not None:
            with torch.inference_mode():
                latents, column = unit.flows.take(self, unit.index, options)
                frames, bias = latents.shape[-1], decoder.speaker_bias(column)
            for window in decoder.plan(frames):
                with torch.inference_mode():  # entered per piece, as below
                    piece = decoder.decode(latents, frames, window, bias)
                yield piece.numpy().astype(np.float32)
            return
        prior, speaker = self._prior(unit, options)
        frames = prior.shape[0]
        plan = decoder.plan(frames, first=decoder.first_piece if first else None)
        head = None
        if first and len(plan) > 1:
            reads = plan[0][0] + plan[0][1]  # the first window reads the frames below this
            enough = reads + model.flow_radius
            # worth it where the early flow's (padded) frames fit three times in the sentence's: on a
            # shorter sentence the whole flow is a few ms and the early one would add half of it to
            # the answer's total for less than that
            if 3 * _padded(enough, model.frame_bucket) <= _padded(frames, model.frame_bucket):
                with torch.inference_mode():
                    latents, column = model.flow(prior[:enough], speaker, head=True)
                    head = (latents, decoder.speaker_bias(column))
        whole = None
        for index, window in enumerate(plan):
            with torch.inference_mode():  # entered per piece: it must not leak into the caller between pieces
                if index > 0 or head is None:
                    if whole is None:
                        latents, column = model.flow(prior, speaker)
                        whole = (latents, decoder.speaker_bias(column))
                    latents, bias = whole
                else:
                    latents, bias = head
                piece = decoder.decode(latents, frames, window, bias)
            yield piece.numpy().astype(np.float32)
