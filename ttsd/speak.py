"""In-process synthesis for ``ttsd say``: pick the model folder, verify it, load its engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Paths
from .engines import Engine, create_engine
from .errors import UnknownVoiceError
from .manifest import verify
from .models_dir import find_voice
from .voices import Progress, builtin_model


def resolve_model(
    paths: Paths, *, model_dir: Path | None = None, voice: str | None = None, progress: Progress | None = None
) -> Path:
    """``--model`` if given, else ``--voice`` from the models dir, else the built-in voice."""
    if model_dir is not None:
        return model_dir
    if voice is not None:
        from .voices import BUILTIN_VOICE

        try:
            return find_voice(paths.models, voice)
        except UnknownVoiceError:
            if voice != BUILTIN_VOICE:
                raise
    return builtin_model(paths.cache, progress or (lambda _msg: None))


def open_engine(folder: Path, **engine_options: Any) -> Engine[Any]:
    """Verify ``folder``, then construct, load and return its engine (no warm-up: one request)."""
    manifest = verify(folder)
    engine = create_engine(folder, manifest, **engine_options)
    engine.load()
    return engine
