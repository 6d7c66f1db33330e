"""A request's later sentences through the prior flow together (``_Flows`` in
``ttsd/engines/vits/engine.py``, ``NativeVits.flow_many``) against one by one, on the built-in voice.

The later sentences of two texts, as the engine makes them (noise at the voice's defaults, seed
0): the four after the first of ``bench/rtf.py``'s paragraph and the three after the first of the
Wyoming bench's four-sentence answer. Each text's flows run stacked, as the engine runs them, and
one sentence at a time, as before, alternated call by call (the box is shared: a slow moment hits
both), medians of ``--runs``; the latents are checked equal (fp32 to 1e-6 of their scale; bf16's
largest difference is printed: a product's rounding may differ by a step with its row count).

And the reason it pays, where it does: the rate of the flow's widest convolution (a WaveNet
in-layer, time-major, as the engine runs it: in the voice's precision, on the path the engine
chose on this box) at each row count a stack can have. One process per precision (``--precision fp32,bf16``, bf16
where the CPU has it natively)::

    .venv/bin/python bench/flows.py [--runs 15] [--threads 2] [--precision fp32,bf16]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

def measure(precision: str, runs: int, threads: int, cache: Path | None) -> list[str]:
    import torch
    from common import FOUR, cache_dir
    from rtf import PARAGRAPH

    from ttsd.malloc import tune
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    tune()
    engine = open_engine(builtin_model(cache_dir(cache)), threads=threads, precision=precision)
    engine.warmup()
    model = engine.model
    options = SynthesisOptions(seed=0)
    kinds = {c: k.path for c, k in engine.kernels.items()}
    lines = [f"### {precision}, {threads} threads; flow products on {kinds.get('flow', '?')}, frames padded to "
             f"{model.frame_bucket}, at least {model.flow_gap} masked rows after each stacked sentence", "",
             "| later sentences | frames | stacked rows | together | one by one | together / one by one "
             "| largest difference |", "|---|---|---:|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for label, text in (("rtf paragraph, 4", PARAGRAPH), ("Wyoming answer, 3", FOUR)):
            units = engine._units(text, options)[1:]
            priors = [engine._prior(unit, options) for unit in units]
            speaker = priors[0][1]
            priors_ = [p for p, _ in priors]

            def together() -> list[torch.Tensor]:
                return [latents for latents, _ in model.flow_many(priors_, speaker)]

            def alone() -> list[torch.Tensor]:
                return [model.flow(p, speaker)[0] for p in priors_]

            worst = max(float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
                        for a, b in zip(together(), alone(), strict=True))
            if precision == "fp32" and worst > 1e-6:
                raise SystemExit(f"{label}: stacked latents differ from each sentence's alone by {worst:.1e}")
            times: dict[str, list[float]] = {"together": [], "alone": []}
            for _ in range(runs):
                for name, call in (("together", together), ("alone", alone)):
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
            t, a = statistics.median(times["together"]), statistics.median(times["alone"])
            frames = [p.shape[0] for p in priors_]
            rows = sum(model.stack_layout(frames))
            lines.append(f"| {label} | {', '.join(map(str, frames))} | {rows} | {t * 1e3:.1f} ms | {a * 1e3:.1f} ms "
                         f"| {t / a:.2f}x | {worst:.1e} |")
        conv = model.flows[0].layers[0][0]  # the first coupling's first WaveNet in-layer, as the engine runs it
        inp, out = conv.inp, conv.dense.shape[1]
        how = "one product per tap" if precision == "fp32" and conv.path == "mkl" else "one product over an im2col view"
        lines += ["", f"The flow's in-layer convolution ({inp} -> {out} channels, kernel {conv.kernel}; {precision} on "
                  f"{conv.path}, {how}) by rows, best of 20:", "", "| rows | us | us per row | GFLOP/s |",
                  "|---:|---:|---:|---:|"]
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for rows in range(128, 1536 + 1, 128):
            x = torch.randn(rows, inp).to(dtype)
            conv(x)
            best = min(_timed(lambda x=x: conv(x)) for _ in range(20))
            lines.append(f"| {rows} | {best * 1e6:.0f} | {best * 1e6 / rows:.2f} | "
                         f"{2 * rows * conv.kernel * inp * out / best / 1e9:.0f} |")
    return lines


def _timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    from common import precision_main

    precision_main(__file__, __doc__, measure, runs=15)


if __name__ == "__main__":
    main()
