"""How many cores the calling thread's torch work may use, without touching other threads.

torch runs its CPU kernels (oneDNN convolutions, MKL matrix products, ATen's parallel loops) on
OpenMP, whose thread count is a per-thread setting: ``omp_set_num_threads`` on one thread leaves
every other thread's team as it was; MKL (float32 matrix products on x86) has a per-thread count
of its own. ``torch.set_num_threads`` sets both for the calling thread, but it also clears oneDNN's
kernel cache, under the synthesis workers' feet.

The model loader uses this to warm a new version up on one core while requests are being served
on the others: on 2 cores, a warm-up team of 2 threads beside the worker's team of 2 left the
worker's parallel regions waiting at their barriers for descheduled threads (p99 during a swap up
to 2.2x the steady p99 with the default layout).

``FreeCores`` says how many of the process's cores sat idle over a stretch of time (``/proc/stat``):
the loader warms a voice up on the workers' thread count only when the cores for it are free.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("ttsd.engines")
_runtime: ctypes.CDLL | bool | None = False  # False: not looked up yet; None: none found
_mkl: Callable[[int], int] | bool | None = False  # MKL's per-thread count setter, looked up the same way
_process_threads: int | None = None  # the count process_threads last gave torch


def _loaded(prefixes: tuple[str, ...]) -> list[str]:
    """Paths of the shared libraries this process has mapped whose file names start with ``prefixes``."""
    import torch  # noqa: F401 - the libraries are loaded with torch

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return sorted(
        {
            line.split()[-1]
            for line in maps.splitlines()
            if line.split()[-1:] and Path(line.split()[-1]).name.startswith(prefixes)
        }
    )


def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp for the PyPI CPU wheels, libiomp5 for some builds)."""
    global _runtime
    if _runtime is False:
        _runtime = None
        for path in _loaded(("libgomp", "libiomp5")):
            try:
                lib = ctypes.CDLL(path)
                lib.omp_get_max_threads.restype = ctypes.c_int
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            _runtime = lib
            break
    return _runtime if isinstance(_runtime, ctypes.CDLL) else None


def _mkl_local() -> Callable[[int], int] | None:
    """MKL's ``MKL_Set_Num_Threads_Local`` (the C entry point; the lower-case symbol is Fortran's and
    takes a pointer), where torch links MKL (x86 wheels, statically into libtorch_cpu); None elsewhere.
    A thread with no count of its own follows its OpenMP count; one that has one (``torch.set_num_threads``
    sets it on the calling thread) keeps it, so its float32 products would ignore ``thread_cores``."""
    global _mkl
    if _mkl is False:
        _mkl = None
        for path in _loaded(("libtorch_cpu", "libmkl_rt", "libmkl_core")):
            try:
                setter = ctypes.CDLL(path).MKL_Set_Num_Threads_Local
            except (OSError, AttributeError):
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            _mkl = setter
            break
    return _mkl if callable(_mkl) else None


@contextmanager
def thread_cores(count: int | None) -> Iterator[None]:
    """Within the block, torch work on the calling thread uses at most ``count`` threads, OpenMP's
    and MKL's (``None``: leave it as it is). A no-op where the runtime cannot be found."""
    lib = _openmp() if count else None
    if lib is None:
        yield
        return
    import torch

    # torch gives a thread its process-wide count at its first op (ATen's lazy_init_num_threads),
    # overriding a count set before it: on a thread that had not run torch yet (every job thread),
    # the block's first op would restore 2 threads. Asking for the count runs that init now.
    torch.get_num_threads()
    previous = lib.omp_get_max_threads()
    wanted = max(1, min(count or previous, previous))
    lib.omp_set_num_threads(wanted)
    mkl = _mkl_local()
    mkl_previous = mkl(wanted) if mkl is not None else 0  # 0: the thread had no count of its own
    try:
        yield
    finally:
        lib.omp_set_num_threads(previous)
        if mkl is not None:
            mkl(mkl_previous)


def process_threads(count: int | None) -> None:
    """torch's thread count for threads that have not run torch yet (the synthesis workers take
    it at their first op): ``--threads``. Given to torch once per value: ``torch.set_num_threads``
    also sets the *calling* thread's count and clears oneDNN's kernel cache, so calling it at every
    load undid ``thread_cores(1)`` for a load beside live requests (its warm-up then ran on two
    threads beside the workers' two: requests 2.3x slower during an upgrade, measured) and threw
    the workers' kernels away."""
    global _process_threads
    if count is None or count == _process_threads:
        return
    import torch

    torch.set_num_threads(count)
    _process_threads = count


Ticks = tuple[int, int, tuple[int, ...]]  # (idle ticks, all ticks, the CPUs counted)


def cpu_ticks(stat: Path = Path("/proc/stat")) -> Ticks | None:
    """Clock ticks since boot summed over the CPUs this process may run on: (idle and iowait, all,
    which CPUs). None where ``stat`` cannot be read or names none of them; lines it does not
    understand are skipped. In a container the counts are the host's: a CPU quota is not seen."""
    try:
        allowed = os.sched_getaffinity(0)
        lines = stat.read_text().splitlines()
    except (OSError, AttributeError):  # no /proc, or no sched_getaffinity (not Linux)
        return None
    idle = total = 0
    cpus: list[int] = []
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in allowed:
            continue
        try:
            values = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            continue
        if len(values) >= 5:
            idle, total = idle + values[3] + values[4], total + sum(values)
            cpus.append(int(name[3:]))
    return (idle, total, tuple(cpus)) if cpus and total else None


class FreeCores:
    """How many of the process's cores sat idle, on average, between construction and ``measure``."""

    def __init__(self, read: Callable[[], Ticks | None] = cpu_ticks) -> None:
        self._read = read
        self._start = read()
        self._started = time.monotonic()

    def measure(self, least: float = 0.1) -> float | None:
        """Idle cores since construction (0 to the CPU count); None where the counts cannot be read
        or the CPUs changed. Waits out ``least`` seconds first (the counts tick every 10 ms), in
        10 ms sleeps: a paced job is called off between them (``ttsd.serving.pacing``), so a
        rollback does not wait."""
        while (left := self._started + least - time.monotonic()) > 0:
            time.sleep(min(left, 0.01))
        end = self._read()
        if self._start is None or end is None or end[2] != self._start[2]:
            return None
        idle, total = end[0] - self._start[0], end[1] - self._start[1]
        return len(end[2]) * idle / total if total > 0 else None


def process_count() -> int:
    """The thread count the synthesis workers run with: what ``process_threads`` last gave torch,
    else torch's own default (a job thread's count may differ: ``thread_cores`` puts back the one it
    found, from before the first load set ``--threads``)."""
    if _process_threads is not None:
        return _process_threads
    import torch

    return int(torch.get_num_threads())
