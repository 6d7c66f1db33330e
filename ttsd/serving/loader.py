"""The loader: bring one version's engine up from its store copy, and take it down again.

TF Serving's *Loader*: constructing an engine is cheap, ``load`` + ``warmup`` do the expensive
work, ``unload`` frees it; only the manager calls these, from a job's thread (``jobs.py``, which
also paces the work beside live requests: ``pacing.py``). This module adds the thread counts the
load and the warm-up run on (``warm_cores``), and memory given back to the OS after an unload
(``ttsd.malloc.trim``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engines import Engine, create_engine
from ..engines.threads import FreeCores, process_count, process_threads, thread_cores
from ..errors import TtsdError, VerifyError, is_system_oserror
from ..malloc import trim
from ..manifest import Manifest, read_manifest, verify
from .pacing import checkpoint
from .store import ModelStore, content_id
from .versions import ModelVersion

log = logging.getLogger("ttsd.loader")


class StoreLost(TtsdError):
    """A version's store copy is damaged and there is no intact folder to copy it from again."""


def load_engine(
    folder: Path,
    manifest: Manifest,
    options: dict[str, Any],
    *,
    warming: Callable[[], None],
    live: Callable[[], bool],
) -> Engine[Any]:
    """Construct, load and warm up the engine of a verified store copy. ``warming`` is called
    between load and warm-up; ``live`` says whether requests may be served now (a voice is active,
    or one is being served). On any failure (``Superseded`` included) the half-built engine is
    unloaded and the exception propagates.

    The load runs on one OpenMP thread, always: beside the workers, a team of two left their
    parallel regions waiting at barriers for descheduled threads (p99 during a swap up to 2.2x
    steady on 2 cores); beside other busy programs, a team of two spins while its partner is
    preempted. The warm-up runs on the workers' thread count when it can (``warm_cores``): oneDNN
    builds and keeps its kernels per thread count, so a warm-up on one thread warmed nothing the
    workers use."""
    engine = create_engine(folder, manifest, **options)
    try:
        process_threads(options.get("threads"))  # the workers' count, on this thread too, before any load
        free = FreeCores()
        with thread_cores(1):
            engine.load()
        checkpoint()  # a job called off during the load goes no further, however the load ended
        warming()
        cores, why = warm_cores(free.measure, live())
        log.debug("%s %s warms up on %s thread(s) (%s)", manifest.name, manifest.version, cores, why)
        with thread_cores(cores):
            engine.warmup()
    except BaseException:
        engine.unload()
        raise
    return engine


def warm_cores(free: Callable[[], float | None], live: bool) -> tuple[int, str]:
    """The thread count a warm-up runs on, and why. ``free``: idle cores over the load (measured
    only when it matters); ``live``: requests may be served now.

    oneDNN compiles a kernel for each shape *and thread count* it runs and keeps them: the workers'
    requests (two threads on 2 cores) cannot use what a one-thread warm-up built. Warming on one
    thread left the first request to build them (measured on the built-in voice, Intel Xeon with
    AMX, 2 cores: first request 0.18-0.23 s against 0.05 s, and peak RSS 30-35 MB higher: both sets
    kept). So it warms on the workers' count, unless

    * a voice is active or a request in flight: a request may start during the warm-up, and a
      second team of two beside the workers' makes their parallel regions wait for each other
      (requests 2x slower). An upgrade is such a case; the serving version has built the kernels
      of its shapes already;
    * the cores are not free: other programs were using them during the load (idle cores below
      half of the extra threads) or that cannot be read. Beside two CPU-bound programs a
      two-thread warm-up took 2-6 s against 0.7 s on one thread (and the first request 0.1 s
      against 2-4 s): a voice comes up promptly on a busy box and the first request pays."""
    wanted = process_count()
    if wanted <= 1:
        return 1, "one thread serves"
    if live:
        return 1, "requests may be served meanwhile"
    idle = free()
    if idle is None:
        return 1, "the cores' use cannot be read"
    if idle < 0.5 * (wanted - 1):
        return 1, f"the cores are busy ({idle:.1f} of {wanted} idle)"
    return wanted, f"the cores are free ({idle:.1f} of {wanted} idle)"


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
