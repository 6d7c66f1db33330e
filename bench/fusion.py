"""Is fusing the elementwise work the missing fp32 speed? The vits engine's three parts timed as
ttsd runs them (eager torch; the decoder with oneDNN's fused convolution ops), and compiled by
torch's own compiler (``torch.compile``, inductor, with freezing: it fuses every chain of
elementwise ops into generated C++ loops), on the built-in voice in fp32.

* decoder: one window of the widest width (``decoder.WIDTHS[-1]``, 128 frames), as ttsd runs it (oneDNN's convolutions with
  leaky ReLU / residual add fused in), as plain ``conv2d`` with every leaky ReLU and add a pass of
  its own, and that plain form compiled;
* text encoder: its 6 layers on 256 ids (the paragraph's sentences pad to 224-256), eager and compiled;
* prior flow: its 4 coupling layers on 512 frames, eager and compiled.

Inductor needs a C++ compiler on the box, which ttsd does not require; this script is a yardstick,
not a proposal. Compiling takes about a minute. Best and median of ``--runs`` each, 2 threads::

    .venv/bin/python bench/fusion.py [--runs 20] [--threads 2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(best, median) seconds of ``runs`` calls, after 3 untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or a temp dir)")
    args = parser.parse_args()
    import torch
    import torch._inductor.config as inductor

    from ttsd.engines.vits.decoder import WIDTHS
    from ttsd.malloc import tune
    from ttsd.speak import open_engine
    from ttsd.testing import cpu_name
    from ttsd.voices import builtin_model

    tune()
    env_cache = os.environ.get("TTSD_CACHE")
    cache: Path = args.cache or (Path(env_cache) if env_cache else Path(tempfile.gettempdir()) / "ttsd-bench-cache")
    engine = open_engine(builtin_model(cache), threads=args.threads, precision="fp32")
    model = engine.model
    decoder = model.decoder
    width, radius = WIDTHS[-1], decoder.radius

    plain = copy.copy(decoder)  # the same weights, every convolution a plain conv2d, every op a pass

    def unfused(conv: Any) -> Any:
        return conv.unfused()

    plain.pre = unfused(decoder.pre)
    plain.stages = [(unfused(up), [[tuple(unfused(c) for c in step) for step in steps] for steps in blocks])
                    for up, blocks in decoder.stages]

    class Window(torch.nn.Module):
        def __init__(self, hifigan: Any) -> None:
            super().__init__()
            self.hifigan = hifigan

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.hifigan._window(latents, 0, width, None, radius)

    class Encoder(torch.nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
            for layer in model.layers:
                x = layer(x, mask, key_bias)
            return x

    class Flow(torch.nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            for coupling in model.flows:
                x = coupling.reverse(torch.flip(x, [1]), mask, None)
            return x

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 192, width, generator=generator)
    ids, padded = 240, 256
    x = torch.randn(padded, 192, generator=generator)
    mask = torch.zeros(padded, 1)
    mask[:ids] = 1
    key_bias = torch.zeros(1, 1, padded)  # (sentences, 1, keys), as NativeVits.encode makes it
    key_bias[..., ids:] = torch.finfo(torch.float32).min
    frames = torch.randn(512, 192, generator=generator)
    frame_mask = torch.zeros(512, 1)
    frame_mask[:500] = 1
    parts: dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.nn.Module | None]] = {
        f"decoder window ({WIDTHS[-1]} frames)": (Window(decoder), (latents,), Window(plain)),
        "text encoder (256 ids)": (Encoder(), (x, mask, key_bias), None),
        "prior flow (512 frames)": (Flow(), (frames, frame_mask), None),
    }
    inductor.freezing = True
    rows = []
    with torch.inference_mode():
        for name, (module, inputs, unfused_module) in parts.items():
            ours = timed(lambda m=module, i=inputs: m(*i), args.runs)
            reference = module(*inputs)
            source = unfused_module or module
            split = timed(lambda m=source, i=inputs: m(*i), args.runs) if unfused_module is not None else None
            print(f"{name}: compiling…", file=sys.stderr, flush=True)
            try:
                compiled = torch.compile(source, dynamic=False)
                difference = float((compiled(*inputs) - reference).abs().max())
                fused = timed(lambda m=compiled, i=inputs: m(*i), args.runs)
            except Exception as exc:  # noqa: BLE001 - no compiler, or inductor cannot build it here
                print(f"{name}: torch.compile failed: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
                fused, difference = None, float("nan")
            rows.append((name, ours, split, fused, difference))
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"`{command}`\n\n{cpu_name()}, {args.threads} threads, torch {torch.__version__}; "
          f"best / median of {args.runs} runs, ms\n")
    print("| part | ttsd (eager) | plain ops, unfused | inductor | inductor / ttsd (median) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")

    def ms(pair: tuple[float, float] | None) -> str:
        return "-" if pair is None else f"{pair[0] * 1e3:.1f} / {pair[1] * 1e3:.1f}"

    for name, ours, split, fused, difference in rows:
        ratio = "-" if fused is None else f"{fused[1] / ours[1]:.2f}x"
        print(f"| {name} | {ms(ours)} | {ms(split)} | {ms(fused)} | {ratio} | {difference:.1e} |")


if __name__ == "__main__":
    main()
