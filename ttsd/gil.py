"""Keep a background thread's Python work from stalling live requests (the GIL "convoy").

The model loader runs Python between torch ops: it builds the voice (for the ``vits`` engine,
``NativeVits`` takes each of a few hundred tensors by name, checks and lays it out: about 4,000
function calls and 0.2 s for the built-in voice) and then warms it up by synthesizing sentences,
the same Python glue around short torch ops as a request. While one thread runs Python, a
synthesis worker that comes back from each short torch op must wait for the GIL, up to
``sys.getswitchinterval()`` (5 ms) per op, and a short sentence is ~1,000 ops. Measured when voices
were still built with transformers' ``from_pretrained`` (~0.3 s of pure Python: module
constructors, weight-norm set-up, key matching), requests overlapping a load ran up to 2x slower.
Lowering the loader's ``nice`` does not help (it holds the GIL while descheduled), and neither
does a shorter switch interval (every op still waits behind the loader).

``yielding_gil(busy)`` makes the calling thread hand the GIL over on purpose: a trace function,
called on each Python function call of *this thread only*, sleeps ``pause`` seconds after every
``run`` seconds of work while ``busy()`` says requests are being served. With the defaults the
loader uses at most a quarter of the GIL under load, and runs at full speed when the box is idle.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

RUN_S = 0.001
PAUSE_S = 0.003


@contextmanager
def yielding_gil(busy: Callable[[], bool], run: float = RUN_S, pause: float = PAUSE_S) -> Iterator[None]:
    clock = time.perf_counter
    sleep = time.sleep
    slice_start = clock()

    def tracer(_frame: object, _event: str, _arg: object) -> None:
        nonlocal slice_start
        now = clock()
        if now - slice_start > run:
            if busy():
                sleep(pause)  # releases the GIL: waiting workers run their torch glue
            slice_start = clock()
        # returning None: no per-line tracing inside the called function

    previous = sys.gettrace()
    if previous is not None:  # a debugger or coverage tool owns tracing: leave it alone
        yield
        return
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)
