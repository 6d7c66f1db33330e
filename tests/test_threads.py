"""``ttsd.engines.threads.thread_cores``: a thread's torch work held to fewer cores, and only that
thread's (the loader warms a new version up on one core beside the serving workers)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from ttsd.engines import threads


@pytest.fixture(autouse=True)
def two_threads() -> object:
    """These tests are about a thread's count against the process's: give the process two (a
    test worker runs with one, see conftest) for their length, as a daemon on two cores has."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def test_thread_cores_holds_openmp_on_this_thread_only() -> None:
    if threads._openmp() is None:
        pytest.skip("no OpenMP runtime found")
    outside = torch.get_num_threads()
    if outside < 2:
        pytest.skip("needs 2 cores")
    seen: list[int] = []
    with threads.thread_cores(1):
        inside = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        other.start()
        other.join()
    assert (inside, torch.get_num_threads()) == (1, outside)
    assert seen[0] > 1  # a thread started meanwhile keeps the default


def test_thread_cores_holds_mkl_too() -> None:
    """MKL (float32 products) has a per-thread count of its own, which ``torch.set_num_threads`` sets:
    within ``thread_cores(1)`` it is 1 even on such a thread, and the thread's own count comes back
    after."""
    mkl = threads._mkl_local()
    if mkl is None:
        pytest.skip("torch here has no MKL")
    torch.set_num_threads(torch.get_num_threads())  # gives this thread an MKL count of its own
    before = mkl(0)  # each call returns the count it replaces
    mkl(before)
    with threads.thread_cores(1):
        inside = mkl(0)
        mkl(inside)
    after = mkl(0)
    mkl(after)
    assert (inside, after) == (1, before)


def test_thread_cores_holds_on_a_thread_that_has_not_run_torch_yet() -> None:
    """Loads run on fresh threads. torch gives a thread its process-wide count at its first op,
    which used to undo ``thread_cores(1)`` set before it: the warm-up then ran on two threads
    beside the workers' two (requests 2.4x slower during an upgrade). Inside the block, on a fresh
    thread, the count is 1 and a parallel op starts no OpenMP thread."""
    if threads._openmp() is None or torch.get_num_threads() < 2:
        pytest.skip("needs an OpenMP runtime and 2 cores")
    seen: dict[str, int] = {}

    def fresh() -> None:
        with threads.thread_cores(1):
            before = len(os.listdir("/proc/self/task"))
            seen["count"] = torch.get_num_threads()
            torch.ones(512, 512) @ torch.ones(512, 512)  # parallel in ATen/MKL
            torch.nn.functional.conv1d(torch.ones(1, 64, 4096), torch.ones(64, 64, 7))
            seen["started"] = len(os.listdir("/proc/self/task")) - before

    thread = threading.Thread(target=fresh)
    thread.start()
    thread.join()
    assert seen == {"count": 1, "started": 0}
