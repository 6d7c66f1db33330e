"""Encoders that take audio a chunk at a time: Ogg Opus (libsndfile), ADTS AAC and MP3 (PyAV).

One encoder makes one continuous stream: ``write`` takes the next float32 samples and returns the
bytes that are ready, ``close`` returns the rest. A whole file is one ``write`` and the ``close``;
a streamed reply sends each chunk's bytes as the voice makes them. Plain numpy in and bytes out:
no ``Audio`` here, so ``ttsd.audio`` can build on this module.

Who calls this: ``ttsd.audio.encode`` (whole files: ``ttsd say``, the spool, HTTP) and the HTTP
front end's streamed replies, always off the event loop (a worker thread of the loop's executor).
An encoder is used by one caller at a time; each call is CPU work proportional to its chunk.

Opus takes only 8, 12, 16, 24 or 48 kHz: other rates are resampled (soxr) to the next one up, so
22050 Hz becomes 24000 Hz. AAC and MP3 take the voices' rates as they are.

MP3 is encoded here only for streamed replies: a whole mp3 file is libsndfile's (``ttsd.audio``),
which needs no PyAV, but libsndfile seeks back on close to finish its header, so it cannot stream.
FFmpeg's mp3 muxer, told that its output cannot seek, writes plain MP3 frames as they are made
and no Xing/LAME header (which needs the frame count): decoders then do not trim LAME's delay
(1105 samples) nor its last frame's padding, so a streamed mp3 plays up to ~0.1 s longer than the
whole file (near-silence at its start and end).

FLAC is not streamed, though FFmpeg could make the stream: its header (STREAMINFO) must then say
"total samples unknown" (0), and libsndfile 1.2.2 reads such a file as 2**63-1 frames, so
``soundfile.read`` fails ("array is too big"; libsndfile issue #1038) and reading it in blocks
fails at its end ("Internal psf_fseek() failed"). FFmpeg and libFLAC read it, but a FLAC that
soundfile users cannot read is no answer. libsndfile's own FLAC writer seeks back on close too.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from typing import Any, Protocol, cast

import numpy as np

from .errors import FormatUnavailableError

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # sndfile.h
OPUS_PAGE_MS = 100.0  # a page per ~0.1 s: about a streamed first piece, at ~30 bytes of page header each
AAC_BITRATE = 64_000  # plenty for mono speech, and fixed rather than left to FFmpeg defaults
MP3_BITRATE = 64_000  # constant bitrate, as for AAC (LAME takes it at every rate a voice has)

_PYAV = ("av", "PyAV (ttsd's aac extra, or pip install av)")
# format -> (module it needs, what to install), for check_available and the encoders' errors
_NEEDS = {"aac": _PYAV, "opus": ("soxr", "soxr (pip install soxr)")}
# ... and what only a streamed reply needs (a whole mp3 is libsndfile's)
_STREAM_NEEDS = {"mp3": ("av", f"{_PYAV[1]} to stream it; unstreamed mp3 needs nothing more")}
# the formats a chunk encoder here makes: whole files (opus, aac) and streamed replies (all three)
CHUNK_FORMATS = ("opus", "aac", "mp3")


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


class _Pipe(_Sink):
    """A ``_Sink`` that says it cannot seek. FFmpeg asks (PyAV passes ``seekable()`` on) and then
    leaves out what it would go back for (the mp3 muxer's Xing header), where libsndfile needs a
    seekable file even to start writing."""

    def seekable(self) -> bool:
        return False


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
                raise FormatUnavailableError.lacking("opus", _NEEDS["opus"][1]) from None
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


class _PyAvEncoder:
    """One audio stream muxed by FFmpeg through PyAV into a sink that cannot seek. The muxer is
    told to flush after each packet, so a chunk's frames go out at once rather than when FFmpeg's
    32 KiB output buffer fills. Subclasses name the muxer, the codec and their options."""

    def __init__(
        self,
        sample_rate: int,
        fmt: str,
        *,
        muxer: str,
        codec: str,
        bit_rate: int,
        options: dict[str, str] | None = None,
    ) -> None:
        try:
            import av
        except ImportError:
            raise FormatUnavailableError.lacking(fmt, _PYAV[1]) from None
        self.sample_rate = sample_rate
        self._av = av
        self._sink = _Pipe()
        self._container = av.open(self._sink, mode="w", format=muxer, options={"flush_packets": "1", **(options or {})})
        try:
            # an audio codec gives an audio stream (the annotation covers video and subtitles too)
            self._stream: Any = cast(Any, self._container.add_stream(codec, rate=sample_rate, layout="mono"))
        except (ValueError, av.FFmpegError) as exc:  # a PyAV built without this encoder
            self._container.close()
            raise FormatUnavailableError.lacking(fmt, f"a PyAV whose FFmpeg has the {codec} encoder ({exc})") from None
        self._stream.format = "fltp"  # what the samples come as: no conversion inside FFmpeg
        self._stream.bit_rate = bit_rate
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


class AacEncoder(_PyAvEncoder):
    """AAC in an ADTS stream (``.aac``, what OpenAI's API sends) through FFmpeg's own AAC encoder.
    ADTS frames stand alone."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__(sample_rate, "aac", muxer="adts", codec="aac", bit_rate=AAC_BITRATE)


class Mp3Encoder(_PyAvEncoder):
    """MP3 frames through LAME (FFmpeg's libmp3lame), for streamed replies: no ID3 tag, no
    Xing/LAME header (see the module docstring), just frames, each going out as it is made."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__(
            sample_rate, "mp3", muxer="mp3", codec="libmp3lame", bit_rate=MP3_BITRATE, options={"id3v2_version": "0"}
        )


def open_encoder(fmt: str, sample_rate: int) -> Encoder:
    """A new encoder for ``fmt`` (one of ``CHUNK_FORMATS``) at the voice's ``sample_rate``.
    ``FormatUnavailableError`` if the library it needs is not installed."""
    if fmt == "opus":
        return OpusEncoder(sample_rate)
    if fmt == "aac":
        return AacEncoder(sample_rate)
    if fmt == "mp3":
        return Mp3Encoder(sample_rate)
    raise ValueError(f"no chunk encoder for {fmt!r}")


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # looks, does not import (PyAV takes ~0.2 s)


def check_available(fmt: str, *, stream: bool = False) -> None:
    """Raise ``FormatUnavailableError`` now, before any synthesis, if ``fmt`` cannot be encoded
    on this box (a request should not make audio that cannot be sent), whole or, with ``stream``,
    as a streamed reply. Cheap enough for the event loop: the answer is looked up once per
    process, and PyAV is looked for, not imported (a PyAV without LAME is found out later, when
    the first chunk's encoder is opened)."""
    for needs in (_NEEDS, _STREAM_NEEDS if stream else {}):
        if fmt in needs and not _installed(needs[fmt][0]):
            raise FormatUnavailableError.lacking(fmt, needs[fmt][1])


def encode_whole(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A complete ``fmt`` file of ``samples``."""
    encoder = open_encoder(fmt, sample_rate)
    return encoder.write(samples) + encoder.close()
