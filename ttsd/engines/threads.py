"""How many cores the calling thread's torch work may use, without touching other threads.

torch runs its CPU kernels (oneDNN convolutions, MKL matrix products, ATen's parallel loops) on
OpenMP, whose thread count is a per-thread setting: ``omp_set_num_threads`` on one thread leaves
every other thread's team as it was. ``torch.set_num_threads`` would not do: it also sets MKL's
process-wide count and clears oneDNN's kernel cache, under the synthesis workers' feet.

The model loader uses this to warm a new version up on one core while requests are being served
on the others: on 2 cores, a warm-up team of 2 threads beside the worker's team of 2 left the
worker's parallel regions waiting at their barriers for descheduled threads (p99 during a swap up
to 2.2x the steady p99 with the default layout).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("ttsd.engines")
_runtime: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: none found


def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp for the PyPI CPU wheels, libiomp5 for some builds)."""
    global _runtime
    if _runtime is False:
        import torch  # noqa: F401 - the runtime is loaded with torch

        _runtime = None
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = ""
        for path in sorted({line.split()[-1] for line in maps.splitlines() if line.split()[-1:]
                            and Path(line.split()[-1]).name.startswith(("libgomp", "libiomp5"))}):
            try:
                lib = ctypes.CDLL(path)
                lib.omp_get_max_threads.restype = ctypes.c_int
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            _runtime = lib
            break
    return _runtime if isinstance(_runtime, ctypes.CDLL) else None


@contextmanager
def thread_cores(count: int | None) -> Iterator[None]:
    """Within the block, torch work on the calling thread uses at most ``count`` OpenMP threads
    (``None``: leave it as it is). A no-op where the runtime cannot be found."""
    lib = _openmp() if count else None
    if lib is None:
        yield
        return
    previous = lib.omp_get_max_threads()
    lib.omp_set_num_threads(max(1, min(count or previous, previous)))
    try:
        yield
    finally:
        lib.omp_set_num_threads(previous)
