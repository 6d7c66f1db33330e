"""Lanes (``ttsd.engines.vits.lanes``): a request of several sentences spread over one-core threads.

The real voice gives the same audio with and without lanes; ``pipelined`` is driven with a fake
decoder to show the order of its work, that an early end leaves nothing running, and that a lane's
error reaches the caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ttsd.engines import threads
from ttsd.engines.vits.engine import VitsEngine
from ttsd.engines.vits.lanes import Lanes, pipelined
from ttsd.options import SynthesisOptions

TEXT = ("The first sentence is short. The second one is a little longer than the first. "
        "A third, to keep both lanes busy.")


@pytest.fixture
def engine(joe_folder: Path) -> Iterator[VitsEngine]:
    from ttsd.speak import open_engine

    engine = open_engine(joe_folder, threads=2, precision="fp32")
    assert isinstance(engine, VitsEngine)
    yield engine
    engine.unload()


def lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ttsd-lane")]


def test_the_same_audio_with_and_without_lanes(engine: VitsEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. Three sentences spoken with lanes run their text sides on lane threads.
    2. Spoken again with lanes turned off, the audio is the same, sample for sample within float
       rounding (the same windows of the same latents)."""
    if threads.cores_here() < 2:
        pytest.skip("lanes need 2 cores for the calling thread")
    options = SynthesisOptions(seed=4, sentence_pause=0.1)
    where: list[str] = []
    latents = engine._latents
    monkeypatch.setattr(engine, "_latents", lambda unit, o: (where.append(threading.current_thread().name),
                                                             latents(unit, o))[1])
    with_lanes = engine.synthesize(TEXT, options).samples
    assert len(where) == 3
    assert where[0] == threading.current_thread().name and all(n.startswith("ttsd-lane") for n in where[1:])
    assert engine._lanes is not None and len(lane_threads()) >= 1

    monkeypatch.setattr(engine, "_lanes_for", lambda cores: None)
    where.clear()
    without = engine.synthesize(TEXT, options).samples
    assert set(where) == {threading.current_thread().name}
    assert without.shape == with_lanes.shape
    assert float(np.abs(without - with_lanes).max()) < 1e-5


def test_one_sentence_and_a_one_core_caller_stay_on_the_calling_thread(engine: VitsEngine,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A single sentence has nothing to overlap; a caller held to one core (the loader's warm-up
    beside serving) must not spread onto more."""
    where: list[str] = []
    latents = engine._latents
    monkeypatch.setattr(engine, "_latents", lambda unit, o: (where.append(threading.current_thread().name),
                                                             latents(unit, o))[1])
    engine.synthesize("Just one sentence here.", SynthesisOptions(seed=1))
    with threads.thread_cores(1):
        assert threads.cores_here() == 1
        engine.synthesize(TEXT, SynthesisOptions(seed=1))
    assert set(where) == {threading.current_thread().name}


def test_unload_stops_the_lane_threads(engine: VitsEngine) -> None:
    if threads.cores_here() < 2:
        pytest.skip("lanes need 2 cores for the calling thread")
    engine.synthesize(TEXT, SynthesisOptions(seed=1))
    assert lane_threads()
    engine.unload()
    assert not lane_threads()


class FakeDecoder:
    """``FastHifiGan``'s planning and window surface: windows of 4 frames, one sample per frame,
    each taking ``delay`` seconds and logged as it starts and ends."""

    def __init__(self, delay: float = 0.02, fail_on: int | None = None) -> None:
        self.delay, self.fail_on = delay, fail_on
        self.log: list[str] = []
        self.lock = threading.Lock()

    def speaker_bias(self, speaker: torch.Tensor | None) -> None:
        return None

    def plan(self, frames: int) -> list[tuple[int, int, int, int]]:
        return [(s, 4, s, min(s + 4, frames)) for s in range(0, frames, 4)]

    def window(self, latents: torch.Tensor, bias: None, planned: tuple[int, int, int, int]) -> torch.Tensor:
        start, _, keep_from, keep_to = planned
        unit = int(latents[0, 0, 0])
        with self.lock:
            self.log.append(f"start {unit}:{start}")
        time.sleep(self.delay)
        if unit == self.fail_on:
            raise MemoryError(f"window {start} of unit {unit}")
        with self.lock:
            self.log.append(f"end {unit}:{start}")
        return latents[0, 0, keep_from:keep_to].clone()


def fake_latents(log: list[str]):  # type: ignore[no-untyped-def]
    def latents_of(unit: int) -> tuple[torch.Tensor, None]:
        log.append(f"text {unit} on {threading.current_thread().name}")
        return torch.full((1, 1, 8 + unit), float(unit)), None
    return latents_of


def test_pipelined_yields_every_unit_in_order() -> None:
    lanes, log = Lanes(2), []
    decoder = FakeDecoder(delay=0.005)
    try:
        pieces = list(pipelined(lanes, [0, 1, 2, 3], fake_latents(log), decoder))  # type: ignore[arg-type]
    finally:
        lanes.close()
    assert [p.tolist() for p in pieces] == [[float(u)] * (8 + u) for u in range(4)]
    assert log[0] == f"text 0 on {threading.current_thread().name}"
    assert all("on ttsd-lane" in line for line in log[1:]) and len(log) == 4


def test_an_early_end_leaves_nothing_running() -> None:
    """1. Four units of 2-3 windows each; the caller stops after the first unit.
    2. When ``close()`` returns, every window that started has ended, and nothing starts later:
       not the queued windows, not the text side of a unit further ahead."""
    lanes, text_log = Lanes(2), []
    decoder = FakeDecoder(delay=0.05)
    try:
        pieces = pipelined(lanes, [0, 1, 2, 3], fake_latents(text_log), decoder)  # type: ignore[arg-type]
        next(pieces)
        pieces.close()
        snapshot = (list(decoder.log), list(text_log))
        starts = [e.split()[1] for e in decoder.log if e.startswith("start")]
        ends = [e.split()[1] for e in decoder.log if e.startswith("end")]
        assert sorted(starts) == sorted(ends)
        time.sleep(0.3)
        assert (decoder.log, text_log) == snapshot
        assert len(text_log) <= 3  # the first unit, the next one ahead, and at most one more
    finally:
        lanes.close()


def test_a_lane_error_reaches_the_caller_and_stops_the_rest() -> None:
    lanes, text_log = Lanes(2), []
    decoder = FakeDecoder(delay=0.02, fail_on=1)
    try:
        pieces = pipelined(lanes, [0, 1, 2, 3], fake_latents(text_log), decoder)  # type: ignore[arg-type]
        assert next(pieces).tolist() == [0.0] * 8
        with pytest.raises(MemoryError, match="unit 1"):
            next(pieces)
        snapshot = list(decoder.log)
        time.sleep(0.2)
        assert decoder.log == snapshot
        assert not any(e.startswith("start 3:") for e in decoder.log)
    finally:
        lanes.close()


def test_thread_cores_holds_mkl_too() -> None:
    """Within ``thread_cores(1)`` MKL's own per-thread count is 1 as well (float32 products would
    otherwise start a team of the process-wide size), and the thread's count is restored after."""
    mkl = threads._mkl_local()
    if mkl is None:
        pytest.skip("torch here has no MKL")
    before = mkl(0)  # each call returns the count it replaces
    mkl(before)
    with threads.thread_cores(1):
        inside = mkl(0)
        mkl(inside)
    after = mkl(0)
    mkl(after)
    assert (inside, after) == (1, before)
