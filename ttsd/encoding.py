"""Encoders that take audio a chunk at a time: Ogg Opus (libsndfile) and ADTS AAC (PyAV).

One encoder makes one continuous stream: ``write`` takes the next float32 samples and returns the
bytes that are ready, ``close`` returns the rest. A whole file is one ``write`` and the ``close``;
a streamed reply sends each chunk's bytes as the voice makes them. Plain numpy in and bytes out:
no ``Audio`` here, so ``ttsd.audio`` can build on this module.

Who calls this: ``ttsd.audio.encode`` (whole files: ``ttsd say``, the spool, HTTP) and the HTTP
front end's streamed replies, always off the event loop (a worker thread of the loop's executor).
An encoder is used by one caller at a time; each call is CPU work proportional to its chunk.

Opus takes only 8, 12, 16, 24 or 48 kHz: other rates are resampled (soxr) to the next one up, so
22050 Hz becomes 24000 Hz. AAC takes the voices' rates as they are.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from typing import Any, Protocol

import numpy as np

from .errors import FormatUnavailableError

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # sndfile.h
OPUS_PAGE_MS = 100.0  # a page per ~0.1 s: about a streamed first piece, at ~30 bytes of page header each
AAC_BITRATE = 64_000  # plenty for mono speech, and fixed rather than left to FFmpeg defaults

# format -> (module it needs, what to install), for check_available and the encoders' errors
_NEEDS = {"aac": ("av", "PyAV (pip install 'ttsd[aac]')"), "opus": ("soxr", "soxr (pip install soxr)")}


class Encoder(Protocol):
    sample_rate: int  # of the encoded stream (Opus: after resampling)

    def write(self, samples: np.ndarray) -> bytes: ...
    def close(self) -> bytes: ...


class _Sink(io.RawIOBase):
    """Collects what an encoder writes, handed out by ``take``. It can report its position but
    never go back: an encoder that tried to rewrite what was already sent would corrupt a stream,
    so that fails loudly instead."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True  # libsndfile's virtual I/O asks for read; it gets nothing back

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._buf += chunk
        self._pos += len(chunk)
        return len(chunk)

    def read(self, size: int = -1) -> bytes:
        return b""

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._pos + offset
        if target != self._pos:
            raise OSError("this stream cannot go back to rewrite what was already sent")
        return self._pos

    def take(self) -> bytes:
        data, self._buf = bytes(self._buf), bytearray()
        return data


def opus_rate(sample_rate: int) -> int:
    """The Opus rate a voice's audio is encoded at: its own, or the next one up (48 kHz at most)."""
    return next((r for r in OPUS_RATES if r >= sample_rate), OPUS_RATES[-1])


def _set_page_latency(file: Any, ms: float) -> None:
    """libsndfile closes an Ogg page once it holds ``ms`` of audio (1000 ms unless told): a
    streamed reply's first audio would wait a second for it. soundfile has no call for this
    command, so it goes through soundfile's own libsndfile handle; where that is not there (a
    soundfile that changed its insides), pages stay at libsndfile's 1 s, which is still valid Opus."""
    import soundfile

    try:
        ffi, snd, handle = soundfile._ffi, soundfile._snd, file._file
        snd.sf_command(handle, SFC_SET_OGG_PAGE_LATENCY_MS, ffi.new("double *", ms), ffi.sizeof("double"))
    except AttributeError:
        pass


class OpusEncoder:
    """Ogg Opus through libsndfile (``soundfile``), which writes each Ogg page as it fills, so
    the bytes of one chunk can go out before the next is made."""

    def __init__(self, sample_rate: int) -> None:
        import soundfile

        self.sample_rate = opus_rate(sample_rate)
        self._resampler: Any = None
        if self.sample_rate != sample_rate:
            try:
                import soxr
            except ImportError:
                raise FormatUnavailableError("opus", _NEEDS["opus"][1]) from None
            self._resampler = soxr.ResampleStream(sample_rate, self.sample_rate, 1, dtype="float32")
        self._sink = _Sink()
        self._file = soundfile.SoundFile(self._sink, "w", self.sample_rate, 1, format="OGG", subtype="OPUS")
        _set_page_latency(self._file, OPUS_PAGE_MS)

    def _put(self, samples: np.ndarray) -> None:
        if len(samples):
            self._file.write(np.clip(samples, -1.0, 1.0))

    def write(self, samples: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        self._put(self._resampler.resample_chunk(samples) if self._resampler is not None else samples)
        return self._sink.take()

    def close(self) -> bytes:
        if self._file.closed:
            return b""
        if self._resampler is not None:  # what the resampler still holds
            self._put(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self._file.close()
        return self._sink.take()


class AacEncoder:
    """AAC in an ADTS stream (``.aac``, what OpenAI's API sends) through PyAV (FFmpeg's own AAC
    encoder). ADTS frames stand alone, and the muxer is told to flush after each packet, so a
    chunk's frames go out at once rather than when FFmpeg's 32 KiB output buffer fills."""

    def __init__(self, sample_rate: int) -> None:
        try:
            import av
        except ImportError:
            raise FormatUnavailableError("aac", _NEEDS["aac"][1]) from None
        self.sample_rate = sample_rate
        self._av = av
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format="adts", options={"flush_packets": "1"})
        self._stream = self._container.add_stream("aac", rate=sample_rate, layout="mono")
        self._stream.bit_rate = AAC_BITRATE
        self._pts = 0
        self._closed = False

    def _mux(self, frame: Any) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def write(self, samples: np.ndarray) -> bytes:
        samples = np.clip(np.ascontiguousarray(samples, dtype=np.float32), -1.0, 1.0)
        if len(samples):
            frame = self._av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="fltp", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            self._pts += len(samples)
            self._mux(frame)
        return self._sink.take()

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        self._mux(None)  # what the encoder still holds (its last, padded frame)
        self._container.close()
        return self._sink.take()


def open_encoder(fmt: str, sample_rate: int) -> Encoder:
    """A new encoder for ``fmt`` (one of ``formats.ENCODED_FORMATS``) at the voice's ``sample_rate``.
    ``FormatUnavailableError`` if the library it needs is not installed."""
    if fmt == "opus":
        return OpusEncoder(sample_rate)
    if fmt == "aac":
        return AacEncoder(sample_rate)
    raise ValueError(f"no chunk encoder for {fmt!r}")


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # looks, does not import (PyAV takes ~0.2 s)


def check_available(fmt: str) -> None:
    """Raise ``FormatUnavailableError`` now, before any synthesis, if ``fmt`` cannot be encoded
    on this box (a request should not make audio that cannot be sent). Cheap enough for the
    event loop: the answer is looked up once per process."""
    if fmt in _NEEDS and not _installed(_NEEDS[fmt][0]):
        raise FormatUnavailableError(fmt, _NEEDS[fmt][1])


def encode_whole(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A complete ``fmt`` file of ``samples``."""
    encoder = open_encoder(fmt, sample_rate)
    return encoder.write(samples) + encoder.close()
