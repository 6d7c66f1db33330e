"""The voice folder's JSON files (``config.json``, ``vocab.json``, the phoneme map), read bounded:
without torch, which the tokenizers do not import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import LoadError
from ...safe_read import read_small

# a few KB to a few hundred in any real voice: a 500 MB config.json was read whole, at each load
MAX_JSON_BYTES = 8 << 20


def read_json(path: Path) -> Any:
    """A JSON file of the voice's folder, parsed: at most ``MAX_JSON_BYTES``, a regular file.
    ``FileNotFoundError`` when there is none; ``LoadError`` saying what is wrong otherwise
    (unreadable, too large, not UTF-8 JSON, nested too deeply)."""
    try:
        raw = read_small(path, MAX_JSON_BYTES, wait=0.0)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError as exc:
        raise LoadError(f"{path}: not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # UnicodeDecodeError included
        raise LoadError(f"{path}: not valid JSON ({exc})") from exc
