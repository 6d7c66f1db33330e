"""Where ttsd keeps things, resolved once from flags, ``TTSD_*`` variables and platform defaults.

Plain data: the CLI builds a ``Paths`` and passes it down; nothing reads the environment later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP = "ttsd"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_models_dir() -> Path:
    """``/models`` on a box (running as root, or when it exists), else the user's data dir."""
    if env := os.environ.get("TTSD_MODELS"):
        return Path(env)
    if _is_root() or Path("/models").is_dir():
        return Path("/models")
    return Path(platformdirs.user_data_dir(APP)) / "models"


def default_cache_dir() -> Path:
    """Derived files ttsd can rebuild (the converted built-in voice)."""
    if env := os.environ.get("TTSD_CACHE"):
        return Path(env)
    if _is_root():
        return Path("/var/cache/ttsd")
    return Path(platformdirs.user_cache_dir(APP))


@dataclass(frozen=True)
class Paths:
    models: Path
    cache: Path

    @classmethod
    def resolve(cls, models: Path | None = None, cache: Path | None = None) -> Paths:
        return cls(models=Path(models) if models else default_models_dir(),
                   cache=Path(cache) if cache else default_cache_dir())
