"""A Hugging Face VITS checkpoint (MMS-TTS style: character tokenizer) through the same engine,
and the ways a folder can be refused at load time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_vits

from ttsd.engines import SynthesisOptions, create_engine
from ttsd.engines.vits.engine import MAX_UNIT_IDS
from ttsd.errors import AudioTooLongError, LoadError, RequestError
from ttsd.manifest import pack, verify
from ttsd.speak import open_engine


def test_tiny_checkpoint_speaks(tiny_folder: Path) -> None:
    engine = open_engine(tiny_folder)
    audio = engine.synthesize("hello world. how are you?", SynthesisOptions(seed=0, normalize=False))
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and len(audio.samples) > 0
    assert np.isfinite(audio.samples).all()
    parts = list(engine.synthesize_stream("hello world. how are you?", SynthesisOptions(seed=0)))
    assert len(parts) == 2
    assert engine.info()["frontend"] == "characters"


def test_characters_the_tokenizer_lacks_are_refused(tiny_folder: Path) -> None:
    engine = open_engine(tiny_folder)
    with pytest.raises(RequestError, match="cannot speak these characters: '3'"):
        engine.synthesize("route 3 is closed")
    with pytest.raises(RequestError, match="'ж'"):
        engine.synthesize("hello жук")
    # Punctuation the vocabulary lacks is dropped, as the tokenizer's normaliser does.
    assert engine.synthesize("hello, world!").duration > 0


def test_bad_options_are_refused(tiny_folder: Path) -> None:
    engine = open_engine(tiny_folder)
    with pytest.raises(RequestError, match="speed"):
        engine.synthesize("hello", SynthesisOptions(speed=10))
    with pytest.raises(RequestError, match="speaker 3 out of range"):
        engine.synthesize("hello", SynthesisOptions(speaker=3))
    with pytest.raises(RequestError, match="limit is 20"):
        create_engine(tiny_folder, verify(tiny_folder), max_chars=20).synthesize("a" * 21)


def test_an_overlong_sentence_is_spoken_in_pieces_back_to_back(tiny_folder: Path) -> None:
    """The encoder's attention grows with the square of a unit's length, so a sentence longer than
    MAX_UNIT_IDS is cut (between words here: no clause marks) and its pieces are spoken with no
    sentence pause between them and one peak normalisation over the sentence."""
    engine = create_engine(tiny_folder, verify(tiny_folder), max_chars=5000)
    engine.load()
    text = " ".join(["hello world"] * 120)  # 1,439 characters, ~2,900 ids as one unit
    units = engine._units(text, SynthesisOptions())
    assert len(units) > 1 and all(len(u.ids) <= MAX_UNIT_IDS for u in units)
    assert [u.continues for u in units] == [False] + [True] * (len(units) - 1)
    options = SynthesisOptions(seed=0, noise_scale=0.0, noise_scale_duration=0.0, sentence_pause=5.0)
    chunks = list(engine.synthesize_stream(text, options))
    assert len(chunks) == 1  # one sentence: no 5 s pauses inside it
    pieces = [engine._render(u, options) for u in units]
    assert len(chunks[0].samples) == sum(len(p) for p in pieces)
    whole = np.concatenate(pieces)
    np.testing.assert_allclose(chunks[0].samples, np.clip(whole / np.max(np.abs(whole)), -1, 1), atol=1e-6)


@pytest.mark.slow
def test_audio_over_the_limit_is_refused_early(tiny_folder: Path) -> None:
    engine = create_engine(tiny_folder, verify(tiny_folder), max_audio_seconds=10)
    engine.load()
    with pytest.raises(AudioTooLongError, match="longer than 10 s"):  # 3 pauses of 5 s: before any audio
        next(engine.synthesize_stream("a. b. c. d.", SynthesisOptions(sentence_pause=5)))
    slow = SynthesisOptions(speed=0.25, sentence_pause=0)
    with pytest.raises(AudioTooLongError):
        engine.synthesize(" ".join(["hello world"] * 20) + ". " + " ".join(["again"] * 30), slow)
    assert engine.synthesize("hello world", slow).duration < 10


def test_multi_speaker_checkpoint(tmp_path: Path) -> None:
    folder = save_tiny_vits(tmp_path / "multi", num_speakers=3, speaker_embedding_size=4)
    engine = open_engine(folder)
    a = engine.synthesize("hello there", SynthesisOptions(seed=0, speaker=0, normalize=False))
    b = engine.synthesize("hello there", SynthesisOptions(seed=0, speaker=2, normalize=False))
    assert not (a.samples.shape == b.samples.shape and np.allclose(a.samples, b.samples))
    with pytest.raises(RequestError, match="out of range"):
        engine.synthesize("hello", SynthesisOptions(speaker=3))


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    folder = save_tiny_vits(tmp_path / "t", pack_it=False)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    pack(folder, name="tiny", version="1", engine="vits", sample_rate=16000)  # checksums "fine"
    with pytest.raises(LoadError, match="weights do not load"):
        open_engine(folder)


def test_config_that_does_not_match_the_weights(tmp_path: Path) -> None:
    folder = save_tiny_vits(tmp_path / "c", pack_it=False)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    pack(folder, name="tiny", version="1", engine="vits", sample_rate=16000)
    with pytest.raises(LoadError, match="do not load|does not match"):
        open_engine(folder)


def test_sample_rate_disagreeing_with_manifest(tmp_path: Path) -> None:
    folder = save_tiny_vits(tmp_path / "r", pack_it=False)
    pack(folder, name="tiny", version="1", engine="vits", sample_rate=22050)
    with pytest.raises(LoadError, match="16000 Hz but ttsd.json says 22050"):
        open_engine(folder)


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    import torch

    def poison(model) -> None:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            model.decoder.conv_pre.weight[0, 0, 0] = float("nan")

    folder = save_tiny_vits(tmp_path / "n", edit=poison)
    with pytest.raises(LoadError, match="NaN"):
        open_engine(folder)


def _edited_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    pack(folder, name="tiny", version="1", engine="vits", sample_rate=16000)
    return folder


@pytest.mark.parametrize("changes, why", [
    ({"speaking_rate": 1e-6}, "speaking_rate must be between 0.1 and 10"),  # warm-up's durations: endless
    ({"noise_scale_duration": 1e30}, "noise_scale_duration must be between 0 and 2"),
    ({"noise_scale": float("nan")}, "noise_scale must be between"),
    ({"upsample_rates": [4000, 4]}, "upsample rate 4000 must be from 1 to its kernel size 8"),  # spun for minutes
    ({"resblock_dilation_sizes": [[0, 3]]}, "dilations"),
])
def test_config_values_no_weight_bounds_are_refused_before_loading(tmp_path: Path, changes: dict[str, object],
                                                                   why: str) -> None:
    """Values that change no weight's shape, so the weights' check passed them: the load made
    endless durations (memory until the OOM killer came) or spun the decoder's set-up for
    minutes. Refused with the reason before any weight is read."""
    folder = _edited_config(save_tiny_vits(tmp_path / "c", pack_it=False), **changes)
    with pytest.raises(LoadError, match=why):
        open_engine(folder)


@pytest.mark.parametrize("file, content, why", [
    ("config.json", '{"model_type": "vits", "junk": "' + "x" * (9 << 20) + '"}', "larger than"),
    ("config.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("vocab.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("vocab.json", b"\xff{}", "not valid JSON"),
])
def test_the_folders_json_files_are_read_bounded(tmp_path: Path, file: str, content: str | bytes, why: str) -> None:
    """A 500 MB config.json was read whole at each load (and at each restart); nesting ran into
    Python's recursion limit and said only that."""
    folder = save_tiny_vits(tmp_path / "j", pack_it=False)
    data = content.encode() if isinstance(content, str) else content
    (folder / file).write_bytes(data)
    pack(folder, name="tiny", version="1", engine="vits", sample_rate=16000)
    with pytest.raises(LoadError, match=f"{file}.*{why}"):
        open_engine(folder)


def test_durations_beyond_the_audio_limit_are_refused_before_they_are_made(tiny_folder: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A duration predictor gone wild (its weights, or a scale) asked for hours of frames: they
    were made, and the box ran out of memory, before the request's audio limit was counted."""
    import torch

    engine = create_engine(tiny_folder, verify(tiny_folder), max_audio_seconds=10)
    engine.load()
    made: list[int] = []
    interleave = torch.repeat_interleave

    def counted(values: torch.Tensor, repeats: torch.Tensor, dim: int) -> torch.Tensor:
        made.append(int(repeats.sum()))
        return interleave(values, repeats, dim=dim)

    monkeypatch.setattr(torch, "repeat_interleave", counted)
    model = engine._require()  # type: ignore[attr-defined]
    duration = model.duration
    monkeypatch.setattr(model, "duration", lambda *a: duration(*a) + 20.0)  # e**20 frames a token
    with pytest.raises(AudioTooLongError, match="longer than 10 s"):
        engine.synthesize("hello")
    assert made == []
    monkeypatch.setattr(model, "duration", lambda *a: duration(*a) + float("inf"))
    with pytest.raises(RuntimeError, match="not finite"):
        engine.synthesize("hello")


@pytest.mark.slow
def test_silent_model_fails_warmup(tmp_path: Path) -> None:
    import torch

    def mute(model) -> None:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            model.decoder.conv_post.weight.zero_()

    engine = open_engine(save_tiny_vits(tmp_path / "s", edit=mute))
    with pytest.raises(LoadError, match="silence"):
        engine.warmup()


def test_unknown_engine_is_refused(tmp_path: Path) -> None:
    from ttsd.errors import ManifestError

    folder = save_tiny_vits(tmp_path / "u", pack_it=False)
    pack(folder, name="tiny", version="1", engine="tensorrt", sample_rate=16000)
    with pytest.raises(ManifestError, match="engine 'tensorrt' is not installed"):
        open_engine(folder)


def test_third_party_engine_registers_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that declares a ``ttsd.engines`` entry point is found by the manifest's name, and
    one written before an engine option existed still loads."""
    site = tmp_path / "site"
    (site / "beep_engine-1.0.dist-info").mkdir(parents=True)
    (site / "beep_engine-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: beep-engine\nVersion: 1.0\n")
    (site / "beep_engine-1.0.dist-info" / "entry_points.txt").write_text("[ttsd.engines]\nbeep = beep_engine:Beep\n")
    (site / "beep_engine.py").write_text(
        "import numpy as np\n"
        "from ttsd.engines.base import Engine\n"
        "class Beep(Engine):\n"
        "    name = 'beep'\n"
        "    def __init__(self, folder, manifest, *, max_chars=5000, threads=None, max_audio_seconds=None):\n"
        "        super().__init__(folder, manifest, max_chars=max_chars, threads=threads,\n"
        "                         max_audio_seconds=max_audio_seconds)\n"
        "    def load(self): pass\n"
        "    def unload(self): pass\n"
        "    def _units(self, text, options): return text.split()\n"
        "    def _render(self, unit, options):\n"
        "        t = np.arange(int(0.1 * self.sample_rate)) / self.sample_rate\n"
        "        return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    model = tmp_path / "beep-model"
    model.mkdir()
    (model / "tone.txt").write_text("440 Hz")
    pack(model, name="beep", version="1", engine="beep", sample_rate=8000)
    from ttsd.engines import available_engines

    assert "beep" in available_engines()
    # written before engines took a precision: the daemon's precision is not passed to it
    engine = open_engine(model, precision="bf16", threads=1)
    audio = engine.synthesize("one two three", SynthesisOptions(sentence_pause=0.5))
    assert type(engine).__name__ == "Beep" and audio.sample_rate == 8000
    assert abs(audio.duration - (3 * 0.1 + 2 * 0.5)) < 1e-6  # three units, a pause between each pair


def test_default_sample_rate_is_config_json_s(tmp_path: Path) -> None:
    """What ``ttsd models pack`` falls back on without ``--sample-rate``: None when there is nothing to read."""
    from ttsd.engines import engine_class

    vits = engine_class("vits")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "vits", "sampling_rate": 22050}))
    assert vits.default_sample_rate(tmp_path) == 22050
    for text in (json.dumps({"model_type": "vits"}), "{not json", "[22050]", json.dumps({"sampling_rate": None})):
        config.write_text(text)
        assert vits.default_sample_rate(tmp_path) is None, text
    assert vits.default_sample_rate(tmp_path / "nowhere") is None
