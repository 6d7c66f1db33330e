"""A fake engine for manager tests: a tone per word, told by its folder's ``fake.json`` to fail on
load, on warm-up, on unload, or on its Nth request, to sleep or compute (``load_spin``: seconds of CPU in
Python calls, where a job is paced and called off) while loading, or to take its time unloading.
Registered under the engine name ``fake`` through a real ``ttsd.engines`` entry point (see the
``fake_engines`` fixture)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ttsd.engines.base import Engine
from ttsd.errors import LoadError
from ttsd.options import SynthesisOptions


class FakeEngine(Engine[str]):
    name = "fake"
    live = 0  # loaded and not yet unloaded, across all instances
    peak = 0
    loads = 0  # load() calls, failed ones included
    unloaded_on: list[str] = []  # the thread each unload ran on (names)
    _lock = threading.Lock()

    def load(self) -> None:
        with FakeEngine._lock:
            FakeEngine.loads += 1
        self.settings: dict[str, Any] = json.loads((self.folder / "fake.json").read_text())
        import time

        time.sleep(float(self.settings.get("load_delay", 0.0)))
        spin_until = time.thread_time() + float(self.settings.get("load_spin", 0.0))
        while time.thread_time() < spin_until:
            sum(range(200))
        if self.settings.get("fail_on") == "load":
            raise LoadError("fake engine told to fail on load")
        self.requests = 0
        self.delay = float(self.settings.get("delay", 0.0))
        with FakeEngine._lock:
            FakeEngine.live += 1
            FakeEngine.peak = max(FakeEngine.peak, FakeEngine.live)
        self.loaded = True

    def unload(self) -> None:
        if getattr(self, "loaded", False):
            import time

            time.sleep(float(self.settings.get("unload_delay", 0.0)))
            FakeEngine.unloaded_on.append(threading.current_thread().name)
            self.loaded = False
            with FakeEngine._lock:
                FakeEngine.live -= 1
            if self.settings.get("fail_on") == "unload":
                raise RuntimeError("fake engine told to fail on unload")

    def warmup(self) -> None:
        import time

        time.sleep(float(self.settings.get("warmup_delay", 0.0)))
        if self.settings.get("fail_on") == "warmup":
            raise LoadError("fake engine told to fail on warm-up")
        super().warmup()

    def _units(self, text: str, options: SynthesisOptions) -> Sequence[str]:
        if self.settings.get("sentences"):  # one unit a sentence: a job can stop between them
            return [s for s in text.split(". ") if s.strip()]
        return [text]

    def _render(self, unit: str, options: SynthesisOptions) -> np.ndarray:
        import time

        if not getattr(self, "loaded", False):  # as the vits engine's _require
            raise LoadError(f"{self.folder}: engine used before load()")
        with FakeEngine._lock:
            self.requests += 1
            n = self.requests
        if self.settings.get("fail_on") == f"request:{n}" or n >= int(self.settings.get("fail_from", 1 << 30)):
            raise RuntimeError(f"fake engine told to fail on request {n}")
        if self.delay:
            time.sleep(self.delay)
        seconds = 0.06 * max(len(unit), 1)
        t = np.arange(int(seconds * self.sample_rate)) / self.sample_rate
        return (0.5 * np.sin(2 * np.pi * float(self.settings.get("tone", 440)) * t)).astype(np.float32)
