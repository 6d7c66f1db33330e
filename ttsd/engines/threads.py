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

``BusyElsewhere`` says how many of them other programs kept busy lately, and ``load_threads``
runs a request on fewer threads while they do: a team of two on 2 cores beside one CPU-bound
program waits at every parallel region's barrier for the thread the scheduler took off its core.

Nothing here imports torch: the counts are those of the runtimes torch brings, so until an engine
has imported it (the VITS engine's module does) every helper is a no-op and ``--threads`` waits to
be given to torch at the next load. A daemon or ``ttsd say`` whose engines do not use torch never
pays its import (2.5-4 s and its libraries' memory at each start).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("ttsd.engines")
_runtime: ctypes.CDLL | bool | None = False  # False: not looked up yet; None: none found
_mkl: Callable[[int], int] | bool | None = False  # MKL's per-thread count setter, looked up the same way
_process_threads: int | None = None  # the count process_threads last gave torch
_asked_threads: int | None = None  # the count process_threads was last asked for (torch not loaded yet)


_giving = threading.Lock()


def _torch_loaded() -> bool:
    """Whether torch is imported, and its import finished: a helper called while another thread
    imports it (a voice's first load beside a non-torch voice's requests) must neither wait for that
    import nor look for its libraries before they are all mapped (and cache "none found" for good).
    The first time it is, ``--threads`` asked for before is given to it, before any thread's first
    op takes torch's default for good."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return False  # not imported, or another thread's import of it still runs: never wait for it
    if _asked_threads is not None and _process_threads is None:
        with _giving:
            if _process_threads is None:
                _give(_asked_threads)  # before any thread's first op takes torch's default
    return True


def _give(count: int) -> None:
    global _process_threads
    import torch

    torch.set_num_threads(count)
    _process_threads = count


def _loaded(prefixes: tuple[str, ...]) -> list[str]:
    """Paths of the shared libraries this process has mapped whose file names start with ``prefixes``
    (torch loaded them: callers look only once it is imported)."""
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
        if not _torch_loaded():
            return None  # nothing to set yet; looked up once torch is imported
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
        if not _torch_loaded():
            return None
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
    the workers' kernels away. Before torch is imported it only remembers ``count``, for the next
    call (the next load) to give."""
    global _process_threads, _asked_threads
    if count is None or count == _process_threads:
        return
    _asked_threads = count
    if _torch_loaded() and count != _process_threads:
        _give(count)


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
    else the count torch gives a thread at its first op, read on a new thread. Not the calling
    thread's: inside the loader's ``thread_cores(1)`` that is 1, and without ``--threads`` (the
    default) a load and a warm-up beside live requests took it for the workers' count. They chose
    the kernel paths for one thread and built the decoder's kernels on one thread, which the
    workers' two threads cannot use (docs/benchmarks.md, the AVX2 box's "A busy box"). Before torch
    is imported: the count asked for, else the cores this process may run on."""
    if _process_threads is not None:
        return _process_threads
    if not _torch_loaded():
        if _asked_threads:
            return _asked_threads
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            return os.cpu_count() or 1
    import torch

    counts: list[int] = []
    probe = threading.Thread(target=lambda: counts.append(torch.get_num_threads()), name="ttsd-thread-count")
    probe.start()
    probe.join()
    return counts[0] if counts else int(torch.get_num_threads())


def own_ticks(stat: Path = Path("/proc/self/stat")) -> int | None:
    """Clock ticks this process has run, user and system, all its threads (``proc(5)``'s utime and
    stime); None where it cannot be read."""
    try:
        fields = stat.read_text().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return int(fields[11]) + int(fields[12])  # fields 14 and 15, counted from the pid
    except (OSError, IndexError, ValueError):
        return None


def _procs_running(stat: Path) -> int | None:
    return next(
        (int(line.split()[1]) for line in stat.read_text().splitlines() if line.startswith("procs_running ")), None
    )


def _running_tasks(tasks: Path) -> set[str]:
    running = set()
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            if (task / "stat").read_text().rpartition(")")[2].split()[:1] == ["R"]:
                running.add(task.name)
    return running


def runnable_elsewhere(stat: Path = Path("/proc/stat"), tasks: Path = Path("/proc/self/task")) -> int | None:
    """Threads of other processes running or ready to run at this instant: ``/proc/stat``'s
    ``procs_running`` less this process's threads in state R; None where either cannot be read.
    ``procs_running`` is the whole machine's (in a container, the host's), not only the CPUs this
    process may use. A thread of this process counts as its own only if it is in state R both just
    before and just after the count is read, so one that wakes in between errs towards "another
    program runs", the cautious side. 1 on the machine is the caller: 0 without looking further."""
    try:
        if (total := _procs_running(stat)) is None or total <= 1:
            return None if total is None else 0
        before = _running_tasks(tasks)
        if (total := _procs_running(stat)) is None:
            return None
        own = before & _running_tasks(tasks)
    except (OSError, ValueError, IndexError):
        return None
    return max(0, total - len(own))


IDLE_CORES = 0.25  # a stretch in which this process ran less than this is one in which no request ran


class BusyElsewhere:
    """How many of the process's CPUs other programs kept busy lately: ``/proc/stat``'s busy ticks
    on the CPUs it may run on, less its own (``/proc/self/stat``), over the last quarter of a second
    or more (0.1 s or more early in a request, below). Read at most every ``every`` seconds, when
    asked (no thread of its own), so nothing is read between requests. After such an idle stretch
    (no reading for longer than the span, and this process used less than ``IDLE_CORES`` in it: a
    long step of a request is not one) the counts cover the whole stretch, and a program that ran in
    it and has stopped (the speech-to-text that ran just before the answer, on a voice assistant)
    would look busy. So an answer whose counts reach back over an idle stretch holds only while
    another program's thread is runnable at that instant (``runnable_elsewhere``), and from ``2 *
    every`` into a request on, the counts of the request's own time are used. A program that keeps
    running is judged on the stretch's average at first, on the request's own counts ``2 * every``
    in. ``procs_running`` is the whole machine's: beside runnable threads on CPUs this process may
    not use (another container's, under a cpuset), the stretch's average holds, as it did before.
    In a container the counts are the host's."""

    def __init__(
        self,
        read: Callable[[], Ticks | None] = cpu_ticks,
        own: Callable[[], int | None] = own_ticks,
        clock: Callable[[], float] = time.monotonic,
        every: float = 0.05,
        span: float = 0.25,
        running: Callable[[], int | None] = runnable_elsewhere,
    ) -> None:
        self._read, self._own, self._clock, self._every, self._span = read, own, clock, every, span
        self._running = running
        self._readings: deque[tuple[float, Ticks, int]] = deque(maxlen=int(span / every) + 4)
        self._lock = threading.Lock()
        self._last: tuple[float, int] | None = None  # (cores busy elsewhere, CPUs counted)

    def _idle(self, before: tuple[float, Ticks, int], after: tuple[float, Ticks, int]) -> bool:
        """Whether no request ran between two consecutive readings: nobody asked for longer than the
        span, and this process used less than ``IDLE_CORES`` meanwhile."""
        if after[0] - before[0] <= self._span:
            return False
        elapsed = after[1][1] - before[1][1]
        return elapsed <= 0 or len(after[1][2]) * (after[2] - before[2]) / elapsed < IDLE_CORES

    def cores(self) -> tuple[float, int] | None:
        """(cores other programs kept busy, CPUs counted); None until two readings are far enough
        apart, or where the counts cannot be read."""
        now = self._clock()
        with self._lock:
            if not self._readings or now - self._readings[-1][0] >= self._every:
                ticks, own = self._read(), self._own()
                if ticks is None or own is None:
                    return None
                if self._readings and self._readings[-1][1][2] != ticks[2]:
                    self._readings.clear()  # the CPUs it may use changed: start again
                readings = self._readings
                readings.append((now, ticks, own))
                newest = readings[-1]
                # the first reading after the last idle stretch (0: none in the readings kept)
                watched = next(
                    (i for i in range(len(readings) - 1, 0, -1) if self._idle(readings[i - 1], readings[i])), 0
                )
                reference = next((r for r in reversed(readings) if newest[0] - r[0] >= self._span), readings[0])
                unwatched = reference is not newest and reference[0] < readings[watched][0]
                if unwatched and newest[0] - readings[watched][0] >= 2 * self._every:
                    reference, unwatched = readings[watched], False  # enough of this request's own counts
                if reference is not newest:
                    (idle0, all0, cpus), own0 = reference[1], reference[2]
                    idle1, all1, _ = newest[1]
                    elapsed = all1 - all0
                    if elapsed > 0:
                        busy = elapsed - (idle1 - idle0)
                        others = max(0, busy - (newest[2] - own0))
                        if others and unwatched and self._running() == 0:
                            others = 0  # what kept the cores busy while no request ran has stopped
                        self._last = (len(cpus) * others / elapsed, len(cpus))
            return self._last


def threads_for_load(wanted: int, busy: tuple[float, int] | None) -> int:
    """The thread count a request runs on: the cores other programs leave free, rounded to the
    nearest, between 1 and ``wanted`` (the workers' count); ``wanted`` where that is not known.
    On 2 cores one thread took 1.17x the time of two beside a program busy a quarter of the time,
    0.74x beside one busy three quarters of it, 0.51-0.81x beside one busy all the time
    (bench/busy_threads.py; docs/benchmarks.md, "Requests beside another program"): the team
    drops to one thread once others keep more than half a core busy."""
    if wanted <= 1 or busy is None:
        return wanted
    others, cpus = busy
    return max(1, min(wanted, int(cpus - others + 0.5)))


BUSY = BusyElsewhere()  # one per process: every worker reads the same counts
ANNOUNCE_EVERY = 60.0  # seconds between info lines about a drop in the thread count; debug in between
# [when an info line about a drop was last written, the count requests last ran on, whether the last
# info line said fewer threads]
_noted: list[float | int | bool | None] = [float("-inf"), None, False]


def _note(count: int, wanted: int) -> None:
    """Log when requests start running on another thread count than the last one did. A drop is
    said at info at most once a minute (a load that comes and goes changes it often), at debug in
    between; the way back at info when the last info line said fewer, so that it is not left
    saying so, else at debug."""
    if count == _noted[1] or (_noted[1] is None and count == wanted):
        return
    _noted[1] = count
    now = time.monotonic()
    if count < wanted:
        info = now - float(_noted[0] or 0.0) >= ANNOUNCE_EVERY
        if info:
            _noted[0], _noted[2] = now, True
        log.log(
            logging.INFO if info else logging.DEBUG,
            "synthesizing on %d of %d threads: other programs keep the cores busy",
            count,
            wanted,
        )
    else:
        info = bool(_noted[2])
        _noted[2] = False
        log.log(
            logging.INFO if info else logging.DEBUG, "synthesizing on all %d threads again: the cores are free", wanted
        )


T = TypeVar("T")


class load_threads(Generic[T]):  # lower case: used as ``with load_threads(stream) as steps:``
    """Iterate ``steps`` (a synthesis stream) on the calling thread, each step on the thread count
    the box allows now (``threads_for_load``): the count is looked at before each step, so a long
    request follows the box. Beside a program busy all the time on 2 cores, a team of two took
    1.2-2x the time of one thread: each of the decoder's parallel regions waits at its barrier for
    the thread the scheduler took off its core, and the waiting thread spins meanwhile (with
    ``OMP_WAIT_POLICY=passive`` it sleeps instead: as good beside the program, but 1.01-1.25x
    slower on a quiet box). On a quiet box one thread took 1.6-1.8x the time of two (bench/busy_threads.py).
    The thread's own counts (OpenMP's and MKL's) are put back when the block ends, on the thread
    that set them (a context manager, not a generator's ``finally``, which runs where the
    generator is collected). A no-op where the OpenMP runtime cannot be found."""

    def __init__(self, steps: Iterator[T], busy: BusyElsewhere = BUSY) -> None:
        self._steps, self._busy = steps, busy
        self._lib: ctypes.CDLL | None = None
        self._wanted = self._current = 0
        self._mkl_previous: int | None = None
        self.counts: list[int] = []  # the count of each step, for logs and tests

    def __enter__(self) -> load_threads[T]:
        self._lib = _openmp()
        if self._lib is not None:
            import torch

            torch.get_num_threads()  # the thread's count from torch's lazy init, before reading it
            self._wanted = self._current = self._lib.omp_get_max_threads()
        return self

    def __iter__(self) -> load_threads[T]:
        return self

    def __next__(self) -> T:
        lib = self._lib
        counted = False
        if lib is not None and self._wanted > 1:
            counted = True
            count = threads_for_load(self._wanted, self._busy.cores())
            if count != self._current:
                lib.omp_set_num_threads(count)
                mkl = _mkl_local()
                if mkl is not None:
                    previous = mkl(count)
                    if self._mkl_previous is None:
                        self._mkl_previous = previous
                self._current = count
            _note(count, self._wanted)
            self.counts.append(count)
        try:
            return next(self._steps)
        except StopIteration:
            if counted:
                self.counts.pop()  # no step ran on it
            raise

    def __exit__(self, *exc: object) -> None:
        # the stream closed here, on this thread, as a plain ``for`` over it would have left it: an
        # exception's traceback keeps this frame, and a suspended stream holds the model's tensors
        close = getattr(self._steps, "close", None)
        self._steps = iter(())
        if close is not None:
            close()
        if self._lib is not None and self._current != self._wanted:
            self._lib.omp_set_num_threads(self._wanted)
        mkl = _mkl_local() if self._mkl_previous is not None else None
        if mkl is not None and self._mkl_previous is not None:
            mkl(self._mkl_previous)  # the MKL count it found, 0 for none of its own (it follows OpenMP)
