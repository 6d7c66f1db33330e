"""Number formats: how ``--precision`` resolves per CPU and voice, and the bf16 quality gate on the
real voice (same length as fp32, spectrally much closer to fp32 than two fp32 renders that differ
only in the flow's noise seed)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ttsd.engines import precision
from ttsd.errors import ManifestError
from ttsd.manifest import MANIFEST, pack, read_manifest
from ttsd.quality import mel_cepstral_distortion, precision_gate

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme avx512f avx512_bf16 avx512_vnni
"""
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
SAPPHIRE = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8 avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize("cpuinfo, feature", [
    (X86, "AVX512-BF16"), (SAPPHIRE, "AMX-BF16"), (ARM, "ARM BF16"), (X86_PLAIN, None), (ARM_PLAIN, None), ("", None),
])
def test_native_bf16_is_read_from_cpuinfo(cpuinfo: str, feature: str | None) -> None:
    assert precision.native_bf16_feature(precision.cpu_flags(cpuinfo)) == feature


@pytest.mark.parametrize("requested, voice, feature, chosen, why", [
    (None, "auto", "AMX-BF16", "bf16", "the CPU has AMX-BF16"),
    ("auto", "auto", "ARM BF16", "bf16", "the CPU has ARM BF16"),
    ("auto", "bf16", None, "fp32", "no native bf16"),
    ("auto", "auto", None, "fp32", "no native bf16"),
    ("auto", "fp32", "AMX-BF16", "fp32", "ttsd.json asks for fp32"),  # the voice may insist on fp32
    ("fp32", "bf16", "AMX-BF16", "fp32", "--precision fp32"),  # the operator overrides the voice
    ("bf16", "fp32", "AVX512-BF16", "bf16", "--precision bf16"),
    ("bf16", "auto", None, "bf16", "emulated"),  # forced without the instructions: allowed, with a warning
])
def test_resolve(requested: str | None, voice: str, feature: str | None, chosen: str, why: str) -> None:
    got, reason = precision.resolve(requested, voice, feature)
    assert got == chosen and why in reason


def test_the_cli_offers_the_manifest_precisions() -> None:
    """The CLI keeps its own copy (importing ttsd.manifest would slow every ``ttsd`` command)."""
    from ttsd.cli.common import PRECISION_CHOICES
    from ttsd.manifest import PRECISIONS

    assert PRECISION_CHOICES == PRECISIONS


def test_the_manifest_carries_the_voice_precision(tmp_path: Path) -> None:
    (tmp_path / "weights.bin.txt").write_text("w")
    pack(tmp_path, name="v", version="1", engine="vits", sample_rate=16000, precision="fp32")
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["precision"] == "fp32" and read_manifest(tmp_path).precision == "fp32"
    pack(tmp_path, name="v", version="1", engine="vits", sample_rate=16000)  # auto is the default: not written
    assert "precision" not in json.loads((tmp_path / MANIFEST).read_text())
    assert read_manifest(tmp_path).precision == "auto"
    for bad in ("fp16", 16, ["bf16"], None):
        (tmp_path / MANIFEST).write_text(json.dumps({**data, "precision": bad}))
        with pytest.raises(ManifestError, match="'precision' must be one of auto, fp32, bf16"):
            read_manifest(tmp_path)


def test_mel_cepstral_distortion_is_zero_for_the_same_audio_and_grows_with_noise() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(22050) / 22050
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    assert mel_cepstral_distortion(tone, tone, 22050) == 0.0
    near = mel_cepstral_distortion(tone + 1e-4 * rng.standard_normal(len(t)), tone, 22050)
    far = mel_cepstral_distortion(tone + 1e-2 * rng.standard_normal(len(t)), tone, 22050)
    assert 0 < near < far
    with pytest.raises(ValueError, match="differ in length"):
        mel_cepstral_distortion(tone, tone[:-1], 22050)


needs_bf16 = pytest.mark.skipif(precision.native_bf16() is None,
                                reason="this CPU has no native bf16 (AVX512-BF16, AMX or ARM BF16)")

GATE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Every morning, the old lighthouse keeper climbed the narrow stairs to check the lamp.",
    "Could you tell me the way to the nearest train station? It is late, and I am tired.",
)


@pytest.fixture(scope="module")
def joe_bf16(joe_folder: Path):  # type: ignore[no-untyped-def]
    from ttsd.speak import open_engine

    return open_engine(joe_folder, precision="bf16")


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("text", GATE_TEXTS)
def test_bf16_passes_the_quality_gate_on_the_real_voice(joe_engine, joe_bf16, text: str) -> None:  # type: ignore[no-untyped-def]
    """Same length as fp32, and a spectral distance to fp32 under half of what the model's own
    sampling (another noise seed) moves it. bf16 anywhere in the last layer left a -40 dBFS hiss
    that measured 0.64 of the seed spread: this margin catches that."""
    assert joe_engine.info()["precision"] == "fp32" and joe_bf16.info()["precision"] == "bf16"
    gate = precision_gate(joe_engine, joe_bf16, text)
    assert gate["candidate_samples"] == gate["samples"]
    assert gate["distance"] < 0.5 * gate["seed_spread"], gate


@pytest.mark.slow
@needs_bf16
def test_bf16_has_the_same_length_with_timing_noise_and_streams_the_same_samples(joe_engine, joe_bf16) -> None:  # type: ignore[no-untyped-def]
    """The durations stay fp32, so seeded timing noise gives the same length in both; streaming
    in pieces gives the whole render's samples (up to the pieces' gain)."""
    from ttsd.options import SynthesisOptions

    text = GATE_TEXTS[1]
    for seed in (3, 4):
        options = SynthesisOptions(seed=seed)
        assert len(joe_bf16.synthesize(text, options).samples) == len(joe_engine.synthesize(text, options).samples)
    joe_bf16.warmup()
    quiet = SynthesisOptions(noise_scale=0, noise_scale_duration=0, sentence_pause=0.0, normalize=False)
    whole = joe_bf16.synthesize(text, quiet).samples
    pieces = np.concatenate([p.samples for p in joe_bf16.synthesize_stream(text, quiet, pieces=True)])
    assert len(pieces) == len(whole)
    assert mel_cepstral_distortion(pieces, whole, 22050) < 1.0


@needs_bf16
def test_auto_picks_bf16_here_and_says_so(joe_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ttsd.speak import open_engine

    with caplog.at_level(logging.INFO, logger="ttsd.engines"):
        engine = open_engine(joe_folder)
    assert engine.info()["precision"] == "bf16"
    assert any("computes in bf16 (the CPU has" in r.getMessage() for r in caplog.records)


@pytest.mark.daemon
def test_say_takes_precision(joe_folder: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    run = subprocess.run([sys.executable, "-m", "ttsd", "say", "Hello there.", "-o", str(out), "--no-daemon",
                          "--model", str(joe_folder), "--precision", "fp32"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "in fp32" in run.stdout + run.stderr and out.stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "ttsd", "say", "Hi.", "-o", str(out), "--precision", "fp16"],
                         env=cli_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "fp16" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_the_daemon_passes_precision_on_and_lists_it(tmp_path: Path, joe_folder: Path) -> None:
    """``serve --precision`` reaches the engines through the manager, and each voice's listing says
    what its active version computes in."""
    import shutil

    from ttsd.serving.manager import ModelManager
    from ttsd.serving.source import LocalFolderSource
    from ttsd.serving.versions import Policy

    shutil.copytree(joe_folder, tmp_path / "models" / "joe")
    manager = ModelManager(LocalFolderSource(tmp_path / "models", settle=0.0), state_dir=tmp_path / "state",
                           policy=Policy(settle=0.0), engine_options={"precision": "fp32"})
    manager.start()
    try:
        (voice,) = manager.snapshot()
        assert voice["precision"] == "fp32"
        # and the kernel path each class of product runs on, as measured on this box (or cached)
        assert set(voice["kernels"]) == {"text", "flow"}
        assert all(k["path"] in ("mkl", "onednn") and k["path"] in k["rates"] for k in voice["kernels"].values())
    finally:
        manager.close()
