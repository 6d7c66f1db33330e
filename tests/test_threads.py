"""``ttsd.engines.threads.thread_cores``: a thread's torch work held to fewer cores, and only that
thread's (the loader warms a new version up on one core beside the serving workers)."""

from __future__ import annotations

import threading

import pytest
import torch

from ttsd.engines import threads


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
