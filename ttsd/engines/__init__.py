"""Voice engines. torch is imported only inside the engines that need it (``ttsd.engines.vits``),
never here, so importing ``ttsd.engines`` itself is cheap; serving never imports transformers
(only the converter, ``ttsd.convert``, and the tests do).

An engine is found by the ``engine`` name in a model folder's manifest: the built-in ones below,
or any installed package that registers a class under the ``ttsd.engines`` entry point group::

    [options.entry_points]
    ttsd.engines =
        myengine = mypackage.engine:MyEngine
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..errors import LoadError, ManifestError
from ..manifest import Manifest
from ..options import SynthesisOptions
from .base import Engine

ENTRY_POINT_GROUP = "ttsd.engines"
_BUILTIN = {"vits": "ttsd.engines.vits.engine:VitsEngine"}
_LATER_OPTIONS = ("precision", "kernel_cache")  # engine options an older engine package may not take

__all__ = ["Engine", "SynthesisOptions", "available_engines", "create_engine", "engine_class"]


def available_engines() -> list[str]:
    names = set(_BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def engine_class(name: str) -> type[Engine[Any]]:
    """The class for engine ``name``; ``ManifestError`` if no such engine is installed."""
    target = _BUILTIN.get(name)
    if target is None:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            raise ManifestError(f"engine {name!r} is not installed (available: {', '.join(available_engines())})")
        target = matches[0].value
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, OSError) as exc:  # (OSError: a native library it needs is missing)
        raise LoadError(f"engine {name!r} ({target}) cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise LoadError(f"engine {name!r} ({target}) is not a ttsd Engine")
    return cls


def create_engine(folder: Path, manifest: Manifest, **kwargs: Any) -> Engine[Any]:
    """Construct (cheaply, without loading) the engine a verified folder names. Options added to
    the engine interface later than an engine package was written (``precision``, ``kernel_cache``) are left out
    for an engine whose constructor does not take them."""
    cls = engine_class(manifest.engine)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params or k not in _LATER_OPTIONS}
    return cls(folder, manifest, **kwargs)
