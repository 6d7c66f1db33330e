"""Where the built-in voice's memory goes while it loads and speaks, in one process per precision,
each part measured as the rise of the process's resident high-water mark over its resident size
just before (the mark reset with ``/proc/self/clear_refs``, freed memory trimmed first):

* **one decoder window** of each width, on random latents: its working set, also as a count of
  tensors of its last stage's size (the largest it allocates);
* **a request**: the Wyoming bench's four sentences streamed, as the daemon speaks them;
* **a load beside a serving voice**, measured last (a load leaves freed memory behind), as an
  upgrade loads the new version while the old one serves: what the load peaks at against what it
  keeps (the weights, converted);
* whether loading the voice brought onnxruntime into the process (piper-tts's phonemizer is all
  ttsd uses of it), and if not, what importing it would add.

Linux only. Run it on two commits to compare them (a worktree per commit)::

    .venv/bin/python bench/memory_parts.py [--threads 2] [--precision fp32,bf16]
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FOUR = ("The kitchen lights are now off. The front door is locked. Tomorrow will be sunny with a high of "
        "twenty-two degrees. Your next meeting starts at ten.")


def rise(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """(how far the resident high-water mark rose over the resident size before ``call``, and that
    size, in MB; what ``call`` returned)."""
    from ttsd.malloc import trim
    from ttsd.testing.probes import rss_mb

    gc.collect()
    trim()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    before = rss_mb(os.getpid())
    result = call()
    return rss_mb(os.getpid(), "VmHWM") - before, before, result


def measure(precision: str, threads: int, cache: Path | None) -> list[str]:
    import torch
    from common import cache_dir

    from ttsd.malloc import trim, tune
    from ttsd.speak import open_engine
    from ttsd.testing.probes import rss_mb
    from ttsd.voices import builtin_model

    tune()
    folder = builtin_model(cache_dir(cache))
    options = {"threads": threads, "precision": precision, "kernel_cache": cache_dir(cache) / "kernels.json"}
    engine = open_engine(folder, **options)
    engine.warmup()
    list(engine.synthesize_stream(FOUR, pieces=True))  # the first request's one-off costs, off the record
    lines = [f"### {precision} ({engine.info()['precision']}), {threads} threads", "",
             "| part | peak above the process before | |", "|---|---:|---:|"]
    onnxruntime = "onnxruntime" in sys.modules

    decoder = engine.model.decoder
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for width in decoder.usable_widths():
            x = torch.randn(1, decoder.pre.in_channels, width, generator=generator)
            window = (0, width, decoder.radius, width - decoder.radius)
            peak, _, samples = rise(lambda x=x, w=width, at=window: decoder.decode(x, w, at, None))
            # the largest tensors a window allocates: its last stage's, cropped to the kept samples
            # and the margins the last layer needs
            size = decoder.post_taps.shape[1] * (samples.numel() + 2 * decoder.margins[-1])
            one = size * torch.tensor([], dtype=decoder.dtype).element_size()
            lines.append(f"| one {width}-frame decoder window | {peak:.1f} MB | {peak / (one / 2**20):.1f} tensors "
                         f"of its last stage ({one / 2**20:.1f} MB) |")
    peak, _, _ = rise(lambda: list(engine.synthesize_stream(FOUR, pieces=True)))
    lines.append(f"| a 4-sentence request, streamed | {peak:.1f} MB | |")
    peak, before, second = rise(lambda: open_engine(folder, **options))
    gc.collect()
    trim()
    kept = rss_mb(os.getpid()) - before
    del second
    lines.append(f"| a load beside the serving voice | {peak:.0f} MB | {peak / kept:.2f}x the {kept:.0f} MB it keeps |")

    if onnxruntime:
        lines += ["", "onnxruntime imported by loading the voice: yes"]
    else:  # what it would have cost: imported now, after torch, as loading the voice once did
        peak, _, _ = rise(lambda: __import__("onnxruntime"))
        lines += ["", f"onnxruntime imported by loading the voice: no (importing it now: {peak:.0f} MB)"]
    return lines


def main() -> None:
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("memory_parts.py needs Linux's /proc/self/clear_refs")
    from common import precision_main

    precision_main(__file__, __doc__, measure)


if __name__ == "__main__":
    main()
