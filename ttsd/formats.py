"""Audio formats by name and file extension (no numpy here: ``ttsd say`` via the daemon needs
only this)."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

# Container name -> (soundfile format, subtype). 16-bit PCM is what every player takes.
FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
# Written by ``ttsd.encoding`` instead (resampled Ogg Opus; ADTS AAC through PyAV).
ENCODED_FORMATS = ("opus", "aac")
FILE_FORMATS = (*FORMATS, *ENCODED_FORMATS)
# opus and aac: the types OpenAI's speech API sends for them.
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "pcm": "audio/L16",
}


def format_for_path(path: str | Path, default: str = "wav") -> str:
    """``out.flac`` -> ``flac``; ``-`` (stdout) or no extension -> ``default``."""
    suffix = Path(str(path)).suffix.lower().lstrip(".")
    if str(path) == "-" or not suffix:
        return default
    if suffix not in FILE_FORMATS:
        raise ConfigError(f"unknown audio format '.{suffix}': use one of {', '.join('.' + f for f in FILE_FORMATS)}")
    return suffix
