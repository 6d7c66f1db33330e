"""glibc malloc settings for a process that synthesizes speech: keep the working set mapped.

One synthesis allocates and frees tens of MB of activations (a Piper medium voice's widest decoder
window makes 8 MB tensors, a few dozen of them). With glibc's defaults that memory goes back to the
kernel between uses: a worker thread gets its own arena, whose heaps are unmapped as soon as they
empty, and the main arena trims whatever is free at its top. The next window faults the same pages
back in and the kernel zeroes them again: measured on a 2-core box, about 25,000 page faults (100 MB)
per 5-second sentence, 60,000 per paragraph, and a tenth of the synthesis time. ONNX Runtime avoids
the same cost with its own memory arena; torch's CPU allocator is plain malloc.

So ``tune()``, called once at the start of every ``ttsd`` process, sets:

- ``M_ARENA_MAX`` 1: every thread allocates from the main arena, the only one that honours the
  trim threshold. Synthesis allocates a few large blocks per layer, so there is no lock contention
  to speak of.
- ``M_MMAP_THRESHOLD`` 32 MiB (glibc's own upper bound for its dynamic threshold): blocks up to that
  come from the heap, where they are reused, instead of a fresh mapping each time.
- ``M_TRIM_THRESHOLD`` 128 MiB: up to that much free memory stays mapped after a request, for the
  next one. The peak grows by a few percent (measured: 515-531 vs 503-507 MB over 300 varied
  requests); what changes most is that the process does not shrink back between requests.

A setting the user made through glibc's environment variables (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc.*`` in
``GLIBC_TUNABLES``) is left alone, so an operator can still choose; ``TTSD_MALLOC=system`` skips all
three (``TTSD_MALLOC=ttsd``, the default, applies them; any other value is warned about). On a C
library other than glibc this does nothing.

``resident_bytes()`` is the process's RSS, what ``--memory-budget`` is measured against.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MiB = 1024 * 1024

# (name, mallopt parameter, value, the environment variable and GLIBC_TUNABLES name that override it)
SETTINGS = (
    ("arena_max", M_ARENA_MAX, 1, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
    ("mmap_threshold", M_MMAP_THRESHOLD, 32 * MiB, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    ("trim_threshold", M_TRIM_THRESHOLD, 128 * MiB, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)

_applied: dict[str, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        return libc
    except (OSError, AttributeError):
        return None


def tune() -> dict[str, int]:
    """Apply the settings above that the environment does not already choose; return what was set.
    Call it before the process starts threads (a thread keeps the arena it first allocated from).
    Idempotent: later calls return the first call's result."""
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ
    applied: dict[str, int] = {}
    choice = env.get("TTSD_MALLOC", "").strip().lower()
    if choice not in ("", "ttsd", "system"):  # runs before logging is set up: one line on stderr
        sys.stderr.write(
            f"ttsd: warning: TTSD_MALLOC={choice!r} is neither 'system' nor 'ttsd'; using ttsd's malloc settings\n"
        )
    libc = None if choice == "system" else _glibc()
    if libc is not None:
        tunables = env.get("GLIBC_TUNABLES", "")
        for name, param, value, variable, tunable in SETTINGS:
            if variable in env or f"{tunable}=" in tunables:
                continue
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:  # mallopt returns 1 on success
                applied[name] = value
    _applied = applied
    return applied


def describe(applied: dict[str, int]) -> str:
    """``tune()``'s result for a log line: ``arena_max=1 mmap_threshold=32MiB ...``, or
    ``system defaults`` when it set nothing."""
    if not applied:
        return "system defaults"
    return " ".join(
        f"{name}={value // MiB}MiB" if value >= MiB else f"{name}={value}" for name, value in applied.items()
    )


def trim() -> None:
    """Give freed memory back to the OS (after a model is unloaded): glibc keeps freed heap pages
    in the process unless asked, so without this an unloaded voice's memory still counts in RSS.
    Young reference cycles (a failed load's traceback and the frames it holds) are collected
    first; a full collection is not (about 50 ms with torch loaded, holding Python's lock: the
    event loop stood still that long at every unload), and an engine's tensors need none."""
    import gc

    gc.collect(1)
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def freeze_heap() -> int:
    """Leave every object made so far out of Python's later garbage collections; returns how many.

    Called once the daemon's voices are up. With torch and a voice loaded the process tracks about
    190,000 objects, and each automatic full collection walked them all: about 50 ms holding
    Python's lock, the event loop and the workers' Python steps stopped, once every hundred-odd
    requests (counted over Wyoming; the asyncio and protocol objects of each request fill the young
    generations). Frozen, they are never walked again; a full collection then looks only at what
    was made since. Collected first, so no start-up garbage is frozen with them. A frozen object
    that loses its last reference is still freed at once (reference counting); only a reference
    cycle among objects made before this call would never be collected, and an unloaded engine
    leaves none (``tests/test_malloc.py``)."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def resident_bytes() -> int:
    """The process's resident set size now, from ``/proc/self/statm`` (one read, no dependency);
    0 where there is no such file. The memory budget is measured with this, before and after
    each load."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
