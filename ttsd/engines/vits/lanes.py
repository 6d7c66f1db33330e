"""Lanes: a request of several sentences spread over the cores as independent one-core tasks.

One sentence runs as a chain: the text side (encoder, durations, flow) and then the decoder's
windows. With every step on all cores (2 threads), the text side's many small products and its
layer norms and attention use the second core poorly; measured on the built-in voice's 5-sentence
paragraph on 2 cores, the text side took 197 ms on 2 threads and 313 ms on 1 (63 % of the second
core used), the decoder 443 and 834 ms (94 %). Held to one core each, two lanes waste neither: while
one decodes a window of sentence *i*, the other prepares sentence *i + 1*'s text side or decodes
another window, since windows are independent (``FastHifiGan.window``). The first sentence's text
side has nothing to overlap with, so it runs on the calling thread with all of its cores.

The output is the same as the sequential path's: the same windows of the same latents.

``pipelined`` keeps at most one sentence's text side ahead of the one being decoded, and at most
``count`` tasks run at once, so the memory peak is one decoder window per lane. A request that ends
early (an error, a closed stream) cancels what has not started and waits for what has.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any, TypeVar

import torch

from ..threads import one_core
from .decoder import FastHifiGan

Unit = TypeVar("Unit")
Latents = tuple[torch.Tensor, torch.Tensor | None]  # (1, C, frames) latents, speaker embedding


class Lanes:
    """``count`` threads, each held to one core (``threads.one_core``), started on first use and
    shared by every request of one engine. ``close()`` (the engine's ``unload``) stops them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="ttsd-lane", initializer=one_core)
            return self._pool.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _decode(decoder: FastHifiGan, latents: torch.Tensor, bias: torch.Tensor | None,
            planned: tuple[int, int, int, int]) -> torch.Tensor:
    with torch.inference_mode():  # per thread: a lane does not inherit the caller's
        return decoder.window(latents, bias, planned)


def pipelined(lanes: Lanes, units: Sequence[Unit], latents_of: Callable[[Unit], Latents],
              decoder: FastHifiGan) -> Iterator[torch.Tensor]:
    """Each unit's waveform ``(samples,)``, in order. ``latents_of(unit)`` is the text side; it is
    called on the caller's thread for the first unit and on a lane for the others."""
    live: list[Future[Any]] = []

    def submit(fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future = lanes.submit(fn, *args)
        live.append(future)
        return future

    try:
        current = latents_of(units[0])
        ahead = submit(latents_of, units[1]) if len(units) > 1 else None
        for index in range(len(units)):
            latents, speaker = current
            bias = decoder.speaker_bias(speaker)
            plan = decoder.plan(latents.shape[-1])
            # widest first: the short windows start last, which evens out where the lanes end
            windows = {k: submit(_decode, decoder, latents, bias, plan[k])
                       for k in sorted(range(len(plan)), key=lambda k: -plan[k][1])}
            if ahead is not None:  # submitted before these windows, so it runs beside the first of them
                current = ahead.result()
                ahead = submit(latents_of, units[index + 2]) if index + 2 < len(units) else None
            pieces = [windows[k].result() for k in range(len(plan))]
            live = [f for f in live if not f.done()]
            yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    finally:  # ended early: nothing of this request may run on after it
        started = [f for f in live if not f.cancel()]
        wait_all(started)
