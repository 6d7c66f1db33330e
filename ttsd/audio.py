"""Audio as plain data (float32 samples + rate) and its encodings. No torch here."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .encoding import encode_whole
from .errors import ConfigError
from .formats import ENCODED_FORMATS, FILE_FORMATS, FORMATS


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    def to_pcm16(self) -> bytes:
        """Little-endian signed 16-bit PCM, for raw streaming."""
        return (np.clip(self.samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def silence(seconds: float, sample_rate: int) -> Audio:
    return Audio(np.zeros(round(seconds * sample_rate), dtype=np.float32), sample_rate)


def concat(parts: list[Audio], pause: float = 0.0) -> Audio:
    """Join audio chunks of one rate, with ``pause`` seconds of silence between them."""
    if not parts:
        raise ValueError("no audio to join")
    rate = parts[0].sample_rate
    gap = np.zeros(round(pause * rate), dtype=np.float32)
    pieces: list[np.ndarray] = []
    for i, part in enumerate(parts):
        if part.sample_rate != rate:
            raise ValueError("cannot join audio of different sample rates")
        if i and len(gap):
            pieces.append(gap)
        pieces.append(part.samples.astype(np.float32, copy=False))
    return Audio(np.concatenate(pieces), rate)


def encode(audio: Audio, fmt: str = "wav") -> bytes:
    """Encode to a complete file in memory (wav, flac, ogg, mp3, opus or aac)."""
    import soundfile

    if fmt in ENCODED_FORMATS:
        return encode_whole(audio.samples, audio.sample_rate, fmt)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown audio format {fmt!r}: use one of {', '.join(FILE_FORMATS)}")
    container, subtype = FORMATS[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(audio.samples, -1.0, 1.0), audio.sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes set to the maximum).

    Players and ``soundfile``/``sox`` read such a file to its end; the daemon sends it first and
    then raw PCM as each sentence is ready.
    """
    import struct

    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )
