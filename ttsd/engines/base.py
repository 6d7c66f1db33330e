"""The engine contract every voice backend follows (no torch here; engines import it themselves).

Life cycle, driven by one owner (``ttsd say`` in-process, later the daemon's model manager):

1. ``Engine(folder, manifest)`` is cheap: no file is read beyond what the constructor needs.
2. ``load()`` does the expensive work (weights into memory); ``warmup()`` runs the warm-up
   sentences and raises ``LoadError`` if the voice produces NaN, silence or absurd lengths.
3. ``synthesize(text, options)`` / ``synthesize_stream(...)`` may be called from several threads
   at once once loaded; they never change the engine's state.
4. ``unload()`` drops the weights; the engine is not used afterwards.

Text is checked and split into units (sentences) *before* any audio is produced, so a bad request
fails with ``RequestError`` without wasting synthesis time.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from ..audio import Audio, concat, silence
from ..errors import AudioTooLongError, LoadError, RequestError
from ..manifest import Manifest
from ..options import SynthesisOptions
from ..text import DEFAULT_MAX_CHARS, check_text

Unit = TypeVar("Unit")

STREAM_HEADROOM = 1.6  # pieces are scaled to 1/1.6 of full scale at the warm-up peak (about 4 dB)
DEFAULT_WARMUP = ("Hello.", "This sentence warms up the voice before it serves requests.")


class Engine(ABC, Generic[Unit]):
    """Base class: text checks, sentence streaming and warm-up checks are shared here."""

    name: ClassVar[str]

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        threads: int | None = None,
        max_audio_seconds: float | None = None,
        precision: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.max_chars = max_chars
        self.threads = threads
        # the operator's number format (None: auto, the voice's own); engines without a choice ignore it
        self.precision = precision
        # a request's audio, pauses included, may not run longer (None: no limit)
        self.max_audio_seconds = max_audio_seconds
        self.sample_rate = manifest.sample_rate
        self.stream_gain: float | None = None  # set by warmup(): scale for audio streamed in pieces

    # -- subclass hooks -------------------------------------------------------------------------
    @classmethod
    def default_sample_rate(cls, folder: Path) -> int | None:
        """The sample rate a model folder's own files state, for ``ttsd models pack`` when no
        ``--sample-rate`` is given: by default ``sampling_rate`` in a Hugging Face style
        ``config.json``; None when there is none. Engines with another layout override it."""
        try:
            return int(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))["sampling_rate"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @abstractmethod
    def load(self) -> None:
        """Load weights; raise ``LoadError`` with the reason if the folder cannot serve."""

    @abstractmethod
    def unload(self) -> None:
        """Drop the weights so their memory can be returned."""

    @abstractmethod
    def _units(self, text: str, options: SynthesisOptions) -> Sequence[Unit]:
        """Split checked text into units (sentences, or pieces of an over-long sentence) ready for
        the model; raise ``RequestError``."""

    @abstractmethod
    def _render(self, unit: Unit, options: SynthesisOptions) -> np.ndarray:
        """One unit -> float32 samples."""

    def _continues(self, unit: Unit) -> bool:
        """Whether ``unit`` is a further piece of the previous unit's sentence: no pause before
        it, and one peak normalisation for the whole sentence. Engines that split over-long
        sentences override this."""
        return False

    def _check_speaker(self, options: SynthesisOptions) -> None:
        """Raise ``RequestError`` if this voice has no such speaker (engines with speakers)."""
        if options.speaker not in (None, 0, "0"):
            raise RequestError("this voice has one speaker")

    def info(self) -> dict[str, Any]:
        """Facts about the loaded voice (speakers, the precision it computes in), shown in
        ``/v1/voices`` and by ``ttsd say``."""
        return {}

    def default_warmup(self) -> Sequence[str]:
        return DEFAULT_WARMUP

    def _render_pieces(self, unit: Unit, options: SynthesisOptions) -> Iterator[np.ndarray]:
        """One unit -> float32 samples in pieces, each as soon as it is ready (streaming below the
        sentence). The default yields the whole unit; engines that can do better override it."""
        yield self._render(unit, options)

    def _render_first_pieces(self, unit: Unit, options: SynthesisOptions) -> Iterator[np.ndarray]:
        """``_render_pieces`` for a request's first unit, whose first piece is the request's first
        audio: an engine may get that piece out sooner at some cost to the whole (the default
        renders it as any other)."""
        return self._render_pieces(unit, options)

    # -- the contract ---------------------------------------------------------------------------
    def check_options(self, options: SynthesisOptions) -> SynthesisOptions:
        """Every option checked against this voice (ranges, speaker), cheaply and without touching
        the model: the daemon calls this before it queues a request, so an option the model cannot
        take is the request's fault (``RequestError``), never the model's."""
        options = options.checked()
        self._check_speaker(options)
        return options

    def synthesize_stream(
        self, text: str, options: SynthesisOptions | None = None, *, pieces: bool = False, checked: bool = False
    ) -> Iterator[Audio]:
        """Yield the audio in order: one ``Audio`` per sentence, each but the first preceded by the
        sentence pause. ``pieces=True`` yields parts of sentences as soon as the engine has them
        (lowest latency to the first audio). Peak normalisation per sentence needs the whole
        sentence, so pieces are scaled instead by the voice's gain measured at warm-up
        (``stream_gain``); a voice that was not warmed up streams whole sentences.

        Audio over ``max_audio_seconds`` (pauses included) is ``AudioTooLongError``: at once when
        the pauses alone would exceed it, else as soon as a unit takes the total over, so a refused
        request costs at most the limit's worth of audio plus one unit (and, in the vits engine,
        the flow of the units after it that run theirs with it: ``FLOW_ROWS``).

        ``checked``: the caller has already passed ``text`` through ``check_text`` (stripped,
        within ``max_chars``) and ``options`` through ``check_options`` for this engine."""
        if not checked:  # the daemon checks text and options once, before it queues a request
            text = check_text(text, self.max_chars)
            options = self.check_options(options or SynthesisOptions())
        options = options or SynthesisOptions()
        units = self._units(text, options)
        if not units:
            raise RequestError("text has nothing to speak")
        budget = _AudioBudget(self.max_audio_seconds, self.sample_rate)
        starts = [i for i, unit in enumerate(units) if i == 0 or not self._continues(unit)]
        budget.add(options.sentence_pause * (len(starts) - 1) if options.sentence_pause else 0.0)
        gain = 1.0 if not options.normalize else self.stream_gain
        by_piece = pieces and gain is not None
        for index, start in enumerate(starts):
            sentence = units[start : starts[index + 1] if index + 1 < len(starts) else len(units)]
            pause = index > 0 and options.sentence_pause > 0
            if by_piece:
                parts: Iterator[np.ndarray] = (
                    budget.counted(_clipped(p * gain))
                    for unit in sentence
                    for p in (self._render_first_pieces if unit is units[0] else self._render_pieces)(unit, options)
                )
            else:
                rendered = [budget.counted(self._render(unit, options)) for unit in sentence]
                samples = rendered[0] if len(rendered) == 1 else np.concatenate(rendered)
                parts = iter([_normalized(samples) if options.normalize else _clipped(samples)])
            for samples in parts:
                if pause:
                    gap = silence(options.sentence_pause, self.sample_rate).samples
                    samples, pause = np.concatenate([gap, samples]), False
                yield Audio(samples, self.sample_rate)

    def synthesize(self, text: str, options: SynthesisOptions | None = None) -> Audio:
        """The whole text as one ``Audio``."""
        return concat(list(self.synthesize_stream(text, options)))

    def warmup(self) -> None:
        """Speak the warm-up sentences; refuse a voice whose output is unusable. Their loudest
        peak sets ``stream_gain``, the scale for audio streamed below the sentence, with
        ``STREAM_HEADROOM`` for louder sentences (measured on the built-in voice: sentence peaks
        spread 0.32-0.75 around a warm-up peak of 0.49)."""
        sentences = self.manifest.warmup or tuple(self.default_warmup())
        peak = 0.0
        for sentence in sentences:
            try:
                audio = self.synthesize(sentence, SynthesisOptions(seed=0, normalize=False))
            except RequestError as exc:
                raise LoadError(f"warm-up sentence {sentence!r} was refused: {exc}") from exc
            check_output(audio, sentence)
            peak = max(peak, float(np.max(np.abs(audio.samples))))
        self.stream_gain = 1.0 / (STREAM_HEADROOM * peak)


class _AudioBudget:
    """Seconds of audio a request has made so far, against the engine's limit."""

    def __init__(self, limit: float | None, sample_rate: int) -> None:
        self.limit, self.rate, self.seconds = limit, sample_rate, 0.0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        if self.limit is not None and self.seconds > self.limit:
            raise AudioTooLongError(
                f"the audio would be longer than {self.limit:g} s (the daemon's --max-audio-seconds); "
                "send shorter text, a shorter sentence_pause or a higher speed"
            )

    def counted(self, samples: np.ndarray) -> np.ndarray:
        self.add(len(samples) / self.rate)
        return samples


def _clipped(samples: np.ndarray) -> np.ndarray:
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def _normalized(samples: np.ndarray) -> np.ndarray:
    """Peak-normalised, as Piper does per sentence."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    return _clipped(samples / peak if peak > 1e-8 else samples)


def check_output(audio: Audio, text: str) -> None:
    """Raise ``LoadError`` for NaN/inf, silence, or a duration absurd for the text."""
    samples = audio.samples
    if not np.all(np.isfinite(samples)):
        raise LoadError(f"voice produced NaN or infinite samples for {text!r}")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    if rms < 1e-4:
        raise LoadError(f"voice produced silence for {text!r} (rms {rms:.2e})")
    chars = max(len(text), 1)
    # Speech runs at roughly 10-20 characters a second; allow a wide margin both ways.
    low, high = 0.01 * chars, max(2.0, 0.5 * chars)
    if not (low <= audio.duration <= high) or math.isnan(audio.duration):
        raise LoadError(
            f"voice produced {audio.duration:.2f} s for {chars} characters ({text!r}); expected {low:.2f}-{high:.1f} s"
        )
