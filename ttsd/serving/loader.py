"""The loader: bring one version's engine up from its store copy, and take it down again.

TF Serving's *Loader*: constructing an engine is cheap, ``load`` + ``warmup`` do the expensive
work, ``unload`` frees it; only the manager calls these, from a job's thread (``jobs.py``, which
also paces the work beside live requests: ``pacing.py``). This module adds one OpenMP thread for
the load, and memory given back to the OS after an unload (``ttsd.malloc.trim``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engines import Engine, create_engine
from ..engines.threads import thread_cores
from ..errors import TtsdError, VerifyError, is_system_oserror
from ..malloc import trim
from ..manifest import Manifest, read_manifest, verify
from .store import ModelStore, content_id
from .versions import ModelVersion

log = logging.getLogger("ttsd.loader")


class StoreLost(TtsdError):
    """A version's store copy is damaged and there is no intact folder to copy it from again."""


def load_engine(
    folder: Path, manifest: Manifest, options: dict[str, Any], *, warming: Callable[[], None]
) -> Engine[Any]:
    """Construct, load and warm up the engine of a verified store copy, on one OpenMP thread.
    ``warming`` is called between load and warm-up. On any failure (``Superseded`` included) the
    half-built engine is unloaded and the exception propagates.

    One thread, always: beside the workers, a team of two left their parallel regions waiting at
    barriers for descheduled threads (p99 during a swap up to 2.2x steady on 2 cores); beside other
    busy programs, a team of two spins while its partner is preempted. Measured on the built-in
    voice (Intel Xeon with AMX, 2 cores), the first load and warm-up of a process: 1.24 s on two
    threads and 0.53 s on one on a quiet box, 6.6 s and 0.81 s beside two CPU-bound programs; later
    loads 0.17 and 0.22 s."""
    engine = create_engine(folder, manifest, **options)
    try:
        with thread_cores(1):
            engine.load()
            warming()
            engine.warmup()
    except BaseException:
        engine.unload()
        raise
    return engine


def unload_engine(engine: Engine[Any]) -> None:
    """Drop the engine's weights and hand the freed memory back to the OS. The engine's tensors
    are freed by ``unload()`` itself; leases that outlive it hold only the emptied object."""
    engine.unload()
    trim()


def check_store_copy(store: ModelStore, model: ModelVersion) -> tuple[Path, Manifest]:
    """The version's store copy, verified, and its manifest: it must verify and be the content
    recorded for the version. A damaged one is dropped and copied again from the version's folder
    in the models dir when that folder holds the same content; else ``StoreLost``. Reads the
    record; the caller records the result."""
    problem = "it is not in the store"
    if model.store_copy is not None:
        try:
            manifest = verify(model.store_copy)
            if model.content and content_id(manifest) != model.content:
                log.warning(
                    "%s %s: its store copy verifies but holds other content than was recorded; serving the store copy",
                    model.name,
                    model.version,
                )
            return model.store_copy, manifest
        except OSError as exc:
            if is_system_oserror(exc):
                raise
            problem = f"its store copy is unreadable ({exc})"
        except TtsdError as exc:
            problem = f"its store copy is damaged ({exc})"
        log.warning("%s %s: %s; dropping the copy", model.name, model.version, problem)
        store.remove(model.name, model.version)
    if model.folder is None:
        raise StoreLost(f"{problem}, and the models dir has no folder of it to copy again")
    try:
        manifest = _same_content(model, model.folder)
        copy = store.put(model.folder, manifest)  # hashed as it is copied
    except TtsdError as exc:
        raise StoreLost(f"{problem}, and its folder {model.folder} does not verify ({exc})") from exc
    log.warning("%s %s: copied again from %s", model.name, model.version, model.folder)
    return copy, manifest


def _same_content(model: ModelVersion, folder: Path) -> Manifest:
    manifest = read_manifest(folder)
    if model.content and content_id(manifest) != model.content:
        raise VerifyError(f"{folder} holds other content now")
    return manifest
