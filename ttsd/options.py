"""Per-request synthesis options as plain data, shared by the front ends and the engines."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RequestError


@dataclass(frozen=True)
class SynthesisOptions:
    """Per-request knobs. ``None`` means the model's own default."""

    speed: float = 1.0  # 2.0 speaks twice as fast (VITS length scale / speed)
    noise_scale: float | None = None
    noise_scale_duration: float | None = None
    speaker: int | str | None = None
    sentence_pause: float = 0.2  # seconds of silence between sentences
    normalize: bool = True  # peak-normalise each sentence, as Piper does
    seed: int | None = None  # fixes the sampling noise, for reproducible output

    def checked(self) -> SynthesisOptions:
        """``self`` if every field is in range, else ``RequestError`` naming the field. Engines may
        rely on this: a checked option never makes the model raise."""
        if not _number_in(self.speed, 0.25, 4.0):
            raise RequestError(f"speed must be between 0.25 and 4.0, not {self.speed!r}")
        for name in ("noise_scale", "noise_scale_duration"):
            value = getattr(self, name)
            if value is not None and not _number_in(value, 0.0, 2.0):
                raise RequestError(f"{name} must be between 0 and 2, not {value!r}")
        if not _number_in(self.sentence_pause, 0.0, 5.0):
            raise RequestError(f"sentence_pause must be between 0 and 5 seconds, not {self.sentence_pause!r}")
        if self.seed is not None and not (
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 1 << 64
        ):
            raise RequestError("seed must be a whole number from 0 to 2**64 - 1")
        speaker = self.speaker
        if speaker is not None and (
            isinstance(speaker, bool)
            or not isinstance(speaker, (int, str))
            or (isinstance(speaker, int) and speaker < 0)
        ):
            raise RequestError(f"speaker must be a name or a number from 0, not {speaker!r}")
        return self


def _number_in(value: object, low: float, high: float) -> bool:
    """A real number (not a bool) within [low, high]; NaN and huge integers are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return low <= float(value) <= high
    except OverflowError:
        return False
