"""``ttsd.engines.threads`` while another thread imports torch (a VITS voice's first load in a daemon
whose other voice's engine does not use torch): no helper waits for the import, loses the OpenMP
runtime for good, or lets a worker's first op take torch's default over ``--threads``. Each test runs
in a fresh interpreter, torch not yet imported."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_a_helper_called_while_torch_imports_does_not_lose_openmp_for_good() -> None:
    """A worker's load_threads (a request of a voice whose engine is not torch) runs while another
    voice's job imports torch: 'torch' is in sys.modules before libgomp is mapped."""
    code = """
import importlib.abc, sys, threading
from ttsd.engines import threads
class Pause(importlib.abc.MetaPathFinder):
    fired = False
    def find_spec(self, name, path, target=None):
        if name == "torch._utils" and not self.fired:   # early in torch/__init__, libraries not loaded yet
            self.fired = True
            def worker():
                with threads.load_threads(iter([b"audio"])) as steps:
                    list(steps)
            w = threading.Thread(target=worker); w.start(); w.join(1.0)
            workers.append(w)
        return None
workers = []
sys.meta_path.insert(0, Pause())
job = threading.Thread(target=lambda: __import__("torch")); job.start(); job.join()
workers[0].join()                          # (the code before 4ea5d09 has it wait for the import)
import torch
torch.set_num_threads(2)
seen = []
def load():
    with threads.thread_cores(1):
        seen.append(torch.get_num_threads())
t = threading.Thread(target=load); t.start(); t.join()
assert threads._openmp() is not None, "OpenMP runtime cached as not found"
assert seen == [1], seen
"""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    run = _run(code)
    assert run.returncode == 0, run.stderr[-600:]


def test_threads_is_given_to_workers_that_served_a_non_torch_voice_during_torch_import() -> None:
    """--threads 1; voice A (no torch) serves; voice B's first load imports torch, and one of A's
    requests starts before B's load_engine gives --threads to torch (during the import itself a
    request's ``import torch`` waits for it, then does the same)."""
    code = """
import queue, threading
from ttsd.engines import threads
threads.process_threads(1)                 # A's load: --threads 1
requests = queue.Queue(); seen = []
def worker():                              # a synthesis worker: load_threads around each request
    while (item := requests.get()) is not None:
        kind, done = item
        def steps():
            if kind == "torch":
                import torch
                seen.append(torch.get_num_threads())
            yield b"audio"
        with threads.load_threads(steps()) as s:
            list(s)
        done.set()
w = threading.Thread(target=worker); w.start()
def request(kind):
    done = threading.Event(); requests.put((kind, done)); done.wait(30)
from ttsd.engines import engine_class
engine_class("vits")                       # B's job: _import_engine (torch imported)
request("plain")                           # A's request, before B's load_engine runs
threads.process_threads(1)                 # B's load_engine
request("torch")                           # B's request on the same worker
requests.put(None); w.join()
assert seen == [1], f"B synthesizes on {seen} threads under --threads 1"
"""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    run = _run(code)
    assert run.returncode == 0, run.stderr[-600:]


def test_a_request_of_a_voice_without_torch_does_not_wait_for_another_voices_torch_import() -> None:
    """The worker's load_threads finds libgomp mapped and runs ``import torch``, which waits for the
    job's import to end (a review's probe: 1.5 s unpaced, ~110 s paced)."""
    code = """
import importlib.abc, sys, threading, time
from ttsd.engines import threads
took = []
class Pause(importlib.abc.MetaPathFinder):
    fired = False
    def find_spec(self, name, path, target=None):
        if name == "torch.functional" and not self.fired:   # late in torch's import, libraries mapped
            self.fired = True
            def request():
                t0 = time.perf_counter()
                with threads.load_threads(iter([b"audio"])) as steps:
                    list(steps)
                took.append(time.perf_counter() - t0)
            w = threading.Thread(target=request); w.start(); w.join(3.0)   # the import goes on after 3 s
        return None
sys.meta_path.insert(0, Pause())
job = threading.Thread(target=lambda: __import__("torch")); job.start(); job.join()
time.sleep(0.5)
assert took and took[0] < 1.0, f"the request took {took} s"
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr[-400:]


def test_a_job_called_off_while_it_imports_torch_finishes_the_import_and_stops_after() -> None:
    """A VITS voice's first load imports torch paced (a request of the daemon's other voice, whose
    engine is not torch, is in flight) and is called off mid-import (a rollback, a newer version),
    after torch's native part has loaded. Stopped there, torch was left half-imported and every
    later load of a VITS voice failed until a restart ("partially initialized module 'torch'"); it
    now finishes the import and stops at its next call."""
    code = """
import importlib.abc, sys, threading
from ttsd.serving.pacing import Superseded, Ticket, paced
ticket = Ticket("test")
ticket.hurried = True                           # a request waits for the load: paced lightly, still called off
class CallOff(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch._torch_docs":         # half-way: torch._C loaded, torch.nn not yet
            ticket.cancel("a rollback")
        return None
sys.meta_path.insert(0, CallOff())
seen = {}
def job():
    try:
        with paced(ticket, lambda: True):       # a request is in flight: the job is paced
            import torch
            seen["imported"] = True
            torch.zeros(1)                      # its next call: called off here
            seen["went on"] = True
    except Superseded as exc:
        seen["stopped"] = str(exc)
thread = threading.Thread(target=job); thread.start(); thread.join(120)
assert seen == {"imported": True, "stopped": "a rollback"}, seen
import torch                                    # the next load's import
assert torch.nn.functional.relu(torch.ones(2)).sum().item() == 2.0
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr[-600:]
