"""The decoder's two knobs that do not change its output, each against what it replaced, on the
built-in voice, in one process:

* **packed weights**: each convolution's weight kept in oneDNN's own layout (``Conv.pack``) against
  the same decoder with plain channels-last weights, which the fused ops reorder at every call;
* **measured plans**: windows planned by each width's time measured at the warm-up
  (``FastHifiGan.measure_windows``) against the work model that planned them before.

And what the windows themselves cost: the same sentences each decoded whole, in one window at its
own length, the ceiling the windows give up for bounded shapes. oneDNN builds and keeps kernels for
every length it meets, so the script also prints what the first whole decode of each new length
took and kept (the reason the decoder runs on a few fixed widths: ``decoder.py``).

And whether the windows' recomputed context is what they cost: the same sentences decoded in pieces
of the same widths that carry each layer's context to the next piece instead (``carried_decoder.py``,
float32 only), nothing computed twice.

And the same in a second library: the decoder's own windows with every convolution on MKL
(``mkl_decoder.py``, float32 only), which builds nothing per length, so a sentence can be decoded
whole (each sentence in one window at its own length) or in pieces of any width; the script prints
the resident peak each takes on the longest sentence beside the windows'.

All are timed on the same sentences' frame counts (the Wyoming bench's four short sentences as
this voice speaks them, a 150-frame one-sentence reply, the rtf bench's four long sentences) and on
one window of each width, the variants alternated call by call (the box is shared: a slow moment
hits both), medians of ``--runs``. The outputs are checked equal: packed to the bit, plans to 1e-5 in fp32
(in bf16 a product's rounding may differ by a step with its row count: the largest difference is
printed, and must stay under 0.05).
One process per precision (``--precision fp32,bf16``, bf16 where the CPU has it natively)::

    .venv/bin/python bench/decoder_plans.py [--runs 15] [--threads 2] [--precision fp32,bf16]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# frame counts of real sentences of the built-in voice (noise at the voice's defaults)
SENTENCES = {
    "4 short sentences (Wyoming bench)": [206, 178, 194, 176],
    "1 short sentence": [150],
    "4 long sentences (rtf bench)": [363, 308, 376, 376],
}
MKL_PIECE = 100  # frames kept per piece on MKL: about the widest window's (128 frames less its context)


def alternated(variants: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median seconds per variant, the variants called in turn ``runs`` times after one untimed round."""
    for call in variants.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, call in variants.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(precision: str, runs: int, threads: int, cache: Path | None) -> list[str]:
    import torch
    from common import cache_dir

    from ttsd.malloc import resident_bytes, trim, tune
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    tune()
    engine = open_engine(builtin_model(cache_dir(cache)), threads=threads, precision=precision)
    engine.warmup()  # measures the windows, as the daemon's warm-up does
    decoder = engine.model.decoder
    measured = dict(decoder.window_seconds)
    carried = None
    if precision == "fp32" and decoder.usable_widths():
        from carried_decoder import CarriedDecoder

        carried = CarriedDecoder(decoder, decoder.usable_widths())
        carried.measure()
    on_mkl = {}
    if precision == "fp32":
        from mkl_decoder import MklDecoder

        on_mkl = {"MKL whole": MklDecoder(decoder), f"MKL pieces of <= {MKL_PIECE}": MklDecoder(decoder, MKL_PIECE)}

    def variant(plan: dict[int, float]) -> Any:
        """The same decoder (its weights shared) planning by ``plan`` ({}: the work model)."""
        other = copy.copy(decoder)
        other.window_seconds, other._cover_table = plan, None
        return other

    model, plain = variant({}), variant({})

    def unpacked(conv: Any) -> Any:
        plain_conv = conv.unfused()
        plain_conv.fused = conv.fused  # the fused ops still, on the plain weight
        return plain_conv

    plain.pre = unpacked(decoder.pre)
    plain.stages = [(unpacked(up), [[tuple(unpacked(c) for c in step) for step in steps] for steps in blocks])
                    for up, blocks in decoder.stages]
    generator = torch.Generator().manual_seed(0)
    lines = [f"### {precision} ({engine.info()['precision']}), {threads} threads; "
             f"windows measured at warm-up: " + ", ".join(f"{w} frames {t * 1e3:.2f} ms" for w, t in measured.items()),
             "", "| what | new | before | new / before |", "|---|---:|---:|---:|"]

    notes: list[str] = []
    # fp32: the same audio to 1e-5 whatever the plan; bf16: a product's rounding may differ by a step
    # with its row count (tests/test_fast_decoder.py allows 0.05 between a sentence's two plans)
    tolerance = 1e-5 if precision == "fp32" else 0.05

    def row(label: str, new: float, old: float) -> None:
        lines.append(f"| {label} | {new * 1e3:.1f} ms | {old * 1e3:.1f} ms | {new / old:.2f}x |")

    with torch.inference_mode():
        for width in sorted(measured):
            x = torch.randn(1, 192, width, generator=generator)
            window = (0, width, decoder.radius, width - decoder.radius)
            assert torch.equal(decoder.decode(x, width, window, None), plain.decode(x, width, window, None))
            t = alternated({"packed": lambda x=x, w=width, at=window: decoder.decode(x, w, at, None),
                            "plain": lambda x=x, w=width, at=window: plain.decode(x, w, at, None)}, runs)
            row(f"packed weights: one {width}-frame window", t["packed"], t["plain"])
        for label, frames in SENTENCES.items():
            latents = [torch.randn(1, 192, n, generator=generator) for n in frames]

            def by(which: Any, latents: list[Any] = latents) -> Callable[[], Any]:
                return lambda: [which(x) for x in latents]

            def whole(latents: list[Any] = latents, frames: list[int] = frames) -> list[Any]:
                return [decoder.decode(x, n, (0, n, 0, n), None) for x, n in zip(latents, frames, strict=True)]

            trim()
            before, started = resident_bytes(), time.perf_counter()
            at_length = whole()  # builds oneDNN's kernels for each new length
            first_call = time.perf_counter() - started
            trim()
            kept = resident_bytes() - before
            new, old = by(decoder)(), by(model)()
            largest = max(float((a - b).abs().max()) for a, b in [*zip(new, old, strict=True),
                                                                   *zip(new, at_length, strict=True)])
            assert largest < tolerance, (label, largest)
            if precision != "fp32":
                notes.append(f"* {label}: the largest difference between plans, and from whole, {largest:.4f}")
            variants = {"measured": by(decoder), "model": by(model), "plain": by(plain), "whole": whole}
            if carried is not None:
                assert all(float((carried(x) - b).abs().max()) < 1e-5 for x, b in zip(latents, new, strict=True))
                variants["carried"] = by(carried)
            for name, other in on_mkl.items():
                assert all(float((other(x) - b).abs().max()) < 1e-5 for x, b in zip(latents, new, strict=True))
                variants[name] = by(other)
            t = alternated(variants, runs)
            row(f"measured plans: {label}, frames {frames}", t["measured"], t["model"])
            row(f"both: {label}", t["measured"], t["plain"])
            row(f"windows against each sentence whole: {label}", t["measured"], t["whole"])
            if carried is not None:
                row(f"windows against carried pieces: {label} ({', '.join(str(carried.plan(n)) for n in frames)})",
                    t["measured"], t["carried"])
            for name in on_mkl:
                row(f"windows against {name} frames: {label}".replace("whole frames", "whole"), t["measured"], t[name])
            notes.append(f"* {label}: decoding them whole the first time took {first_call * 1e3:.0f} ms "
                         f"(later {t['whole'] * 1e3:.0f} ms) and kept {kept / 2**20:.1f} MB")
    if on_mkl:
        from memory_parts import rise

        longest = torch.randn(1, 192, max(max(f) for f in SENTENCES.values()), generator=generator)
        with torch.inference_mode():
            peaks = {name: rise(lambda d=d: d(longest))[0] for name, d in [("windows", decoder), *on_mkl.items()]}
        notes.append(f"* resident peak decoding one {longest.shape[-1]}-frame sentence (rise over the process): "
                     + ", ".join(f"{name} {mb:.1f} MB" for name, mb in peaks.items()))
    else:
        notes.append(f"* MKL: not measured in {precision} (float32 only)")
    if carried is not None:
        notes.append(f"* carried pieces (audio {carried.lag} frames behind their input): "
                     + ", ".join(f"{w} frames {t * 1e3:.2f} ms" for w, t in carried.seconds.items()))
    else:
        notes.append(f"* carried pieces: not measured in {precision} (float32 only)")
    return [*lines, "", "New lengths, decoded whole (the cost of unbounded shapes), and the carried pieces:", "",
            *notes]


def main() -> None:
    from common import precision_main

    precision_main(__file__, __doc__, measure, runs=15)


if __name__ == "__main__":
    main()
