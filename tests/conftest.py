"""Shared fixtures: the real built-in voice (converted once per run) and tiny random VITS folders."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: each worker's torch (and every daemon and CLI it starts,
    # through the environment) gets one thread, or OpenMP's threads fight over the cores and the
    # suite runs slower than on one worker. Set before torch is imported; tests of thread counts
    # set theirs (tests/test_threads.py).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from ttsd.manifest import pack  # noqa: E402
from ttsd.serving.manager import ModelManager
from ttsd.serving.source import LocalFolderSource
from ttsd.serving.versions import Policy

LETTERS = list("abcdefghijklmnopqrstuvwxyz '")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ttsd cache for the whole run (for each worker under pytest-xdist: ``models get``'s
    partial downloads live there too), holding the built-in voice, converted once per run."""
    cache = tmp_path_factory.mktemp("ttsd-cache")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the first worker converts it, the others copy
        import shutil

        from filelock import FileLock

        from ttsd.voices import builtin_model

        shared = tmp_path_factory.getbasetemp().parent / "ttsd-builtin"
        shared.mkdir(exist_ok=True)
        with FileLock(str(shared / ".lock")):
            built = builtin_model(shared)
        shutil.copytree(built, cache / built.relative_to(shared))
    return cache


@pytest.fixture(scope="session")
def joe_folder(cache_dir: Path) -> Path:
    """The built-in voice, converted from its PyPI package by ttsd's own code."""
    from ttsd.voices import builtin_model

    return builtin_model(cache_dir)


@pytest.fixture(scope="session")
def joe_engine(joe_folder: Path):  # type: ignore[no-untyped-def]
    from ttsd.speak import open_engine

    return open_engine(joe_folder, precision="fp32")  # the exact path; bf16: tests/test_precision.py


@pytest.fixture
def api(voices, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The HTTP front ends, in-process, over the module's own ``voices`` fixture (``inproc.FakeVoices``)."""
    from inproc import FrontEnds

    front = FrontEnds(voices.backend, tmp_path)
    yield front
    front.close()


@pytest.fixture
def cli_env(cache_dir: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for a ``ttsd`` subprocess: shared cache, empty models dir, no terminal."""
    env = dict(os.environ)
    env.update(TTSD_CACHE=str(cache_dir), TTSD_MODELS=str(tmp_path / "models"), PYTHONUNBUFFERED="1",
               TTSD_SOCKET=str(tmp_path / "no-daemon.sock"), TTSD_STATE=str(tmp_path / "state"))
    return env


def tiny_vits_config(**overrides: object) -> dict[str, object]:
    config: dict[str, object] = dict(
        vocab_size=len(LETTERS) + 1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        window_size=2,
        ffn_dim=16,
        flow_size=8,
        spectrogram_bins=9,
        upsample_initial_channel=16,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        duration_predictor_filter_channels=16,
        depth_separable_num_layers=1,
        duration_predictor_num_flows=2,
        sampling_rate=16000,
    )
    config.update(overrides)
    return config


def plausible(model: object) -> None:
    """Make a random tiny VITS speak at a believable pace (20 ms per token), so it passes warm-up:
    zero the duration flows (identity) and let the affine layer give log-duration 3."""
    import torch

    with torch.no_grad():
        predictor = model.duration_predictor  # type: ignore[attr-defined]
        for flow in predictor.flows[1:]:
            flow.conv_proj.weight.zero_()
            flow.conv_proj.bias.zero_()
        predictor.flows[0].translate.fill_(-3.0)
        predictor.flows[0].log_scale.zero_()


def save_tiny_vits(folder: Path, *, seed: int = 0, pack_it: bool = True, name: str = "tiny", version: str = "1",
                   edit: Callable[[object], None] | None = None, **overrides: object) -> Path:
    """A small random ``VitsModel`` + character ``VitsTokenizer``, as an MMS-TTS download looks."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = VitsModel(VitsConfig(**tiny_vits_config(**overrides)))
    if edit is not None:
        edit(model)
    model.save_pretrained(str(folder), safe_serialization=True)
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(LETTERS)}}
    vocab_file = folder / "vocab.json"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = VitsTokenizer(str(vocab_file), add_blank=True, normalize=True, phonemize=False)
    tokenizer.save_pretrained(str(folder))
    if pack_it:
        pack(folder, name=name, version=version, engine="vits", sample_rate=16000)
    return folder


@pytest.fixture(autouse=True)
def no_stray_daemons() -> Iterator[None]:
    """A test that fails before stopping its daemon must not leave it running."""
    yield
    from daemon_util import kill_leftovers

    kill_leftovers()


@pytest.fixture(autouse=True)
def standby_loaded_when_start_returns(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted manager loads its rollback targets again in the background, after ``start``
    returns (the daemon is ready before they are). In-process tests that count loads or engines
    right after a start would race with those loads: here ``start`` returns once they are done,
    unless the test is marked ``standby_in_background`` (it looks at them while they load)."""
    if request.node.get_closest_marker("standby_in_background"):
        return
    from ttsd.serving.manager import ModelManager

    real_start = ModelManager.start

    def start(self: ModelManager) -> None:
        real_start(self)
        assert self.jobs.wait(timeout=60), "the rollback targets never finished loading again"

    monkeypatch.setattr(ModelManager, "start", start)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return save_tiny_vits(tmp_path / "tiny")


@pytest.fixture
def fake_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    info = site / "ttsd_fake-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ttsd-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ttsd.engines]\nfake = fake_engine:FakeEngine\n")
    monkeypatch.syspath_prepend(str(site))
    from fake_engine import FakeEngine

    FakeEngine.live = FakeEngine.peak = FakeEngine.loads = 0
    FakeEngine.unloaded_on = []


def make_manager(tmp_path: Path, default_voice: str | None = None, **policy: object) -> ModelManager:
    policy.setdefault("settle", 0.0)
    source = LocalFolderSource(tmp_path / "models", settle=float(policy["settle"]),  # type: ignore[arg-type]
                               incomplete_timeout=float(policy.pop("incomplete_timeout", 60.0)))  # type: ignore[arg-type]
    return ModelManager(source, state_dir=tmp_path / "state", policy=Policy(**policy),  # type: ignore[arg-type]
                        default_voice=default_voice)


def v2_over_v1(tmp_path: Path, **policy: object) -> tuple[Path, ModelManager]:
    """A started manager whose voice "voice" came as v1 and was upgraded to v2: v2 serves, v1 is
    its rollback target (loaded unless ``keep=0``). Returns (the models dir, the manager)."""
    models = tmp_path / "models"
    fake_model(models, "voice", "1")
    manager = make_manager(tmp_path, **policy)
    manager.start()
    fake_model(models, "voice", "2")
    manager.reconcile()
    return models, manager


def fake_model(models: Path, name: str, version: str, blob_mb: int = 0, **settings: object) -> Path:
    """Version ``version`` of voice ``name`` for the fake engine, told ``settings``; ``blob_mb``
    adds a file that large, so that copying it in and hashing it takes a moment."""
    folder = models / f"{name}-{version}"
    folder.mkdir(parents=True)
    (folder / "fake.json").write_text(json.dumps(settings))
    if blob_mb:
        (folder / "blob.safetensors").write_bytes(os.urandom(1 << 20) * blob_mb)
    pack(folder, name=name, version=version, engine="fake", sample_rate=8000)
    return folder
