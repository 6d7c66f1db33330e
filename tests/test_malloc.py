"""ttsd.malloc: a worker thread that frees and re-allocates large blocks reuses the memory instead of
faulting it back in, which is what a synthesis does with its decoder windows; the user's glibc
settings win. Each case runs in a fresh process, because malloc settings are per process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only")

# Four 8 MiB blocks alive at once, then freed, six times over, on a thread (as the daemon's workers
# do): the page faults of each round.
PROBE = """
import json, resource, threading
from ttsd.malloc import tune
applied = tune()
faults = []
def work():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [bytearray(8 << 20) for _ in range(4)]
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES = 4 * (8 << 20) // 4096  # pages in one round's blocks


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "TTSD_MALLOC")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                          capture_output=True, text=True, timeout=60)
    return {**json.loads(proc.stdout), "stderr": proc.stderr}


def test_tuned_process_reuses_freed_blocks() -> None:
    result = probe()
    assert result["applied"] == {"arena_max": 1, "mmap_threshold": 32 << 20, "trim_threshold": 128 << 20}
    assert result["stderr"] == ""
    assert result["faults"][0] >= PAGES // 2  # the first round maps its memory...
    assert max(result["faults"][1:]) < PAGES // 20  # ...and the later rounds reuse it


def test_system_defaults_fault_every_round() -> None:
    """Control: without the settings the same probe faults its blocks in again every round, so the
    test above can fail."""
    result = probe(TTSD_MALLOC="system")
    assert result["applied"] == {}
    assert min(result["faults"][1:]) > PAGES // 2


def test_user_settings_are_left_alone() -> None:
    result = probe(MALLOC_ARENA_MAX="4", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
    assert result["applied"] == {"mmap_threshold": 32 << 20}


def test_an_unknown_choice_is_warned_about_and_keeps_the_settings() -> None:
    result = probe(TTSD_MALLOC="off")
    assert result["applied"] == {"arena_max": 1, "mmap_threshold": 32 << 20, "trim_threshold": 128 << 20}
    assert result["stderr"].strip() == ("ttsd: warning: TTSD_MALLOC='off' is neither 'system' nor 'ttsd'; "
                                        "using ttsd's malloc settings")


UNLOAD = """
import gc, json, sys
from pathlib import Path
from ttsd.malloc import resident_bytes, tune
tune()
from ttsd.manifest import verify
from ttsd.serving.loader import unload_engine
from ttsd.speak import open_engine
folder = Path(sys.argv[1])
verify(folder)
import torch  # noqa: F401 - the runtime's own memory is not the voice's
import ttsd.engines.vits.engine  # noqa: F401
before = resident_bytes()
engine = open_engine(folder, threads=1)
engine.warmup()
engine.synthesize("Hello there. How are you today?")
loaded = resident_bytes()
full = []
gc.callbacks.append(lambda phase, info: full.append(info["generation"]) if phase == "start" else None)
unload_engine(engine)
after = resident_bytes()
gc.callbacks.clear()
from ttsd.malloc import trim
gc.collect()
trim()
print(json.dumps({"before": before, "loaded": loaded, "after": after, "after_full": resident_bytes(),
                  "generations": full}))
"""


@pytest.mark.slow
def test_an_unload_gives_the_memory_back_without_a_full_collection(joe_folder) -> None:  # type: ignore[no-untyped-def]
    """Unloading the built-in voice returns its weights to the OS, and runs no full garbage
    collection (about 50 ms holding Python's lock with torch loaded: the event loop stood still
    that long at every unload): the tensors go with their last reference, and a full collection
    afterwards returns nothing more. (What stays is torch's and oneDNN's own: kernels, pools.)"""
    proc = subprocess.run([sys.executable, "-c", UNLOAD, str(joe_folder)], check=True, capture_output=True,
                          text=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] - result["before"] > 60 << 20, result  # control: the voice took memory
    assert result["loaded"] - result["after"] > 50 << 20, result  # the weights went back
    assert result["after"] - result["after_full"] < 4 << 20, result
    assert 2 not in result["generations"], result


FREEZE = """
import gc, json
import torch  # noqa: F401
import ttsd.daemon  # noqa: F401  (what the daemon imports)
from ttsd.malloc import freeze_heap
before = len(gc.get_objects())
frozen = freeze_heap()
left = len(gc.get_objects())
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a
del a, b  # a reference cycle made after the freeze
print(json.dumps({"before": before, "frozen": frozen, "left": left, "collected": gc.collect()}))
"""


def test_the_heap_made_at_start_up_is_left_out_of_later_collections() -> None:
    """What the daemon calls once its voices are up: every object made so far is frozen (a full
    collection no longer walks torch's hundreds of thousands), and garbage made afterwards is still
    collected. In a fresh process: freezing the test runner's own heap would outlive the test."""
    done = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(done.stdout)
    assert out["before"] > 20_000 and out["frozen"] >= out["before"] - 1000, out
    assert out["left"] < 200, out
    assert out["collected"] >= 2, out  # the cycle's two objects (and their __dict__s)
