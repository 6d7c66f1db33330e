"""How far apart two renders of the same text sound: mel-cepstral distortion (MCD, in dB).

The bf16 path of the vits engine is not bit-exact with fp32, so it is judged by ear's proxy instead:
both renders are cut into 46 ms frames (1024-point Hann window, 256-sample hop at 22.05 kHz), each
frame's power spectrum is pooled into 80 mel bands, the log of their amplitude (half the log power)
taken, and a DCT of that gives the mel cepstrum. The distortion between two aligned renders is the usual
``10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2)`` over coefficients 1..24 (c0, the loudness, left
out), averaged over frames. Identical audio gives 0; two renders of a VITS voice that differ only in
the prior flow's noise seed are a few dB apart, which is the yardstick the bf16 gate compares with
(``tests/test_precision.py``, ``bench/intelligibility.py``). numpy only.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

N_FFT, HOP, MELS, CEPSTRA = 1024, 256, 80, 24
FLOOR = 1e-8  # power floor: digital silence in both renders compares equal


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


@lru_cache(maxsize=8)
def _mel_bank(sample_rate: int) -> np.ndarray:
    """Triangular HTK-mel filters, ``(MELS, N_FFT // 2 + 1)``, from 0 Hz to Nyquist."""
    bins = np.fft.rfftfreq(N_FFT, 1.0 / sample_rate)
    edges = 700.0 * (10 ** (np.linspace(0.0, _hz_to_mel(np.array(sample_rate / 2.0)), MELS + 2) / 2595.0) - 1.0)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


@lru_cache(maxsize=1)
def _dct() -> np.ndarray:
    """Orthonormal DCT-II rows 1..CEPSTRA over MELS bands."""
    n = np.arange(MELS)
    k = np.arange(1, CEPSTRA + 1)[:, None]
    return math.sqrt(2.0 / MELS) * np.cos(math.pi / MELS * (n + 0.5) * k)


def mel_cepstrum(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """``(frames, CEPSTRA)`` mel cepstra of mono float samples."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("mel_cepstrum takes mono samples")
    x = np.pad(x, (N_FFT // 2, N_FFT // 2))
    if len(x) < N_FFT:
        x = np.pad(x, (0, N_FFT - len(x)))
    count = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(x, (count, N_FFT), (x.strides[0] * HOP, x.strides[0]))
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT), axis=1)) ** 2
    log_mel = 0.5 * np.log(np.maximum(power @ _mel_bank(sample_rate).T, FLOOR))  # log amplitude
    return log_mel @ _dct().T


def mel_cepstral_distortion(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """MCD in dB between two renders of the same length (same durations: no alignment is done)."""
    if len(a) != len(b):
        raise ValueError(f"renders differ in length ({len(a)} vs {len(b)} samples)")
    diff = mel_cepstrum(a, sample_rate) - mel_cepstrum(b, sample_rate)
    return float(np.mean(10.0 / math.log(10.0) * np.sqrt(2.0 * np.sum(diff * diff, axis=1))))


def precision_gate(reference: Any, candidate: Any, text: str, seeds: tuple[int, int] = (1, 2)) -> dict[str, float]:
    """The bf16 quality gate for one text: ``reference`` and ``candidate`` are loaded engines of the
    same voice (fp32 and bf16). Both speak ``text`` at the voice's default noise scale with the
    durations' noise off (so timing is fixed) and the flow's noise seeded; returns the two lengths
    in samples, ``distance``: MCD of the candidate against the reference with the same seed, and
    ``seed_spread``: MCD between two reference renders that differ only in the seed - the model's
    own sampling variation, which the candidate's distance must stay well below."""
    from .options import SynthesisOptions

    def render(engine: Any, seed: int) -> np.ndarray:
        options = SynthesisOptions(noise_scale_duration=0.0, seed=seed, normalize=False)
        return engine.synthesize(text, options).samples

    first, second = (render(reference, seed) for seed in seeds)
    other = render(candidate, seeds[0])
    rate = int(reference.sample_rate)
    return {
        "samples": len(first),
        "candidate_samples": len(other),
        "distance": mel_cepstral_distortion(other, first, rate) if len(other) == len(first) else math.inf,
        "seed_spread": mel_cepstral_distortion(second, first, rate),
    }
