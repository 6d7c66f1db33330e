"""The loader: bring one version's engine up from its store copy, and take it down again.

TF Serving's *Loader*: constructing an engine is cheap, ``load`` + ``warmup`` do the expensive
work, ``unload`` frees it; only the manager calls these, one version at a time. This module adds
what it takes to do that beside live requests on a 2-core box: the loading thread's CPU priority,
one OpenMP thread for the load while requests are served, the GIL handed over to them
(``ttsd.gil``), and memory given back to the OS after an unload (``ttsd.malloc.trim``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engines import Engine, create_engine
from ..engines.threads import thread_cores
from ..errors import TtsdError, VerifyError, is_system_oserror
from ..gil import yielding_gil
from ..malloc import trim
from ..manifest import Manifest, read_manifest, verify
from .store import ModelStore, content_id
from .versions import ModelVersion

log = logging.getLogger("ttsd.loader")


class StoreLost(TtsdError):
    """A version's store copy is damaged and there is no intact folder to copy it from again."""


def lower_thread_priority(nice: int, idle: bool = False) -> None:
    """Lower this thread's (and the OpenMP threads it starts') CPU priority on Linux: ``nice``, or
    with ``idle`` the SCHED_IDLE class (runs only on CPU time no one else wants). Loader threads
    are fresh threads that end with their work, so this is never undone."""
    if not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    # never the main thread: it outlives the work (an embedding program's, or a test's)
    if idle and hasattr(os, "SCHED_IDLE") and threading.current_thread() is not threading.main_thread():
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
        except OSError:
            pass


def load_engine(folder: Path, manifest: Manifest, options: dict[str, Any], *, serving: Callable[[], bool],
                warming: Callable[[], None]) -> Engine[Any]:
    """Construct, load and warm up the engine of a verified store copy. While ``serving()`` says
    requests are being served, the load runs on one OpenMP thread and hands the GIL over to them.
    ``warming`` is called between load and warm-up. On any failure the half-built engine is
    unloaded and the exception propagates."""
    engine = create_engine(folder, manifest, **options)
    try:
        with thread_cores(1 if serving() else None), yielding_gil(serving):
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


def check_store_copy(store: ModelStore, model: ModelVersion) -> None:
    """The store copy must verify and be the content recorded for this version. A damaged one is
    dropped and copied again from the version's folder in the models dir when that folder holds
    the same content; else ``StoreLost``. Sets ``model.manifest``/``content``/``store``."""
    problem = "it is not in the store"
    if model.store is not None:
        try:
            manifest = verify(model.store)
            if model.content and content_id(manifest) != model.content:
                log.warning("%s %s: its store copy verifies but holds other content than was recorded; "
                            "serving the store copy", model.name, model.version)
            model.manifest, model.content = manifest, content_id(manifest)
            return
        except OSError as exc:
            if is_system_oserror(exc):
                raise
            problem = f"its store copy is unreadable ({exc})"
        except TtsdError as exc:
            problem = f"its store copy is damaged ({exc})"
        log.warning("%s %s: %s; dropping the copy", model.name, model.version, problem)
        store.remove(model.name, model.version)
        model.store = None
    if model.source is None:
        raise StoreLost(f"{problem}, and the models dir has no folder of it to copy again")
    try:
        manifest = _same_content(model, model.source)
        model.store = store.put(model.source, manifest)  # hashed as it is copied
    except TtsdError as exc:
        raise StoreLost(f"{problem}, and its folder {model.source} does not verify ({exc})") from exc
    model.manifest, model.content = manifest, content_id(manifest)
    log.warning("%s %s: copied again from %s", model.name, model.version, model.source)


def _same_content(model: ModelVersion, folder: Path) -> Manifest:
    manifest = read_manifest(folder)
    if model.content and content_id(manifest) != model.content:
        raise VerifyError(f"{folder} holds other content now")
    return manifest
