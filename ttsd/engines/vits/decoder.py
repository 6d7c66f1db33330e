"""A faster HiFi-GAN decoder for VITS voices: transformers' ``VitsHifiGan`` with the same weights,
the same output and bounded shapes.

transformers' ``VitsHifiGan`` runs 1-D convolutions on (batch, channels, time) tensors. On CPU,
oneDNN is much faster on *channels-last 2-D* convolutions (measured on 2 cores: 180-200 GFLOP/s
against 70-120 for the same 1-D convolutions), so this decoder keeps the same weights as
(out, in, 1, k) channels-last tensors and, where torch has them, uses oneDNN's fused convolutions
(``torch.ops.mkldnn._convolution_pointwise``: conv + leaky ReLU / residual add in one pass).
The decoder's averaging of its residual blocks is folded into the next layer's weights
(``leaky_relu(x / n) == leaky_relu(x) / n``).

**Bounded shapes.** oneDNN compiles and caches kernels per input shape: measured, each new sentence
length costs ~100 ms of kernel creation and ~4 MB that is never returned. So the decoder only ever
runs on a few fixed window widths (``WIDTHS``). A latent is decoded in windows that each keep a
stretch of frames and see the decoder's receptive field (``radius`` frames, computed from the
config) on both sides; frames outside the sentence are zeros, and every intermediate tensor is
zeroed outside the sentence, which is exactly the zero padding the reference sees at its ends.
After each upsampling stage a window is cropped to its kept frames plus what the later layers
still need (``margins``): the context is mostly used up by the first stage, which is the cheapest,
so the overlap costs a few percent instead of ``2 * radius / width``. The crops depend only on the
width, so the shapes stay bounded. A sentence is covered by the windows that cost least per
kept frame and then the cheapest mix of widths for the rest, costed by each width's time measured
on the box (``measure_windows``, at the engine's warm-up; a work model before that). The output
equals ``VitsHifiGan`` up to float rounding (tested to 1e-5) whatever the plan.

Windows also give streaming below the sentence: ``stream()`` yields each window's samples as soon
as it is decoded, and can start with a short first window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import CL, Conv, fused_ops_work

# Window widths in latent frames. Each width keeps its own kernels and, while it runs, a working
# set that grows with it, so there are few and none wide; 48 is the first-piece window of a
# streamed sentence for radius-14 voices. Up to 128: windows of 192 and 256 frames raised the
# built-in voice's peak RSS by 62 MB in bf16 and 90 MB in fp32 (a 12-sentence paragraph, Intel
# Xeon with AMX, 2 threads) and were not measurably faster (0-4 %, within that box's noise):
# the crops after the first stage already keep the overlap's cost small. No 96: its kernels cost
# 10 MB per thread count in bf16 (32: 1 MB, and it keeps too little to be used), and without it
# 100 varied requests peaked 14-17 MB lower in bf16 and 2-17 MB lower in fp32, taking the same
# time in fp32 and 2-3 % more in bf16 (3 alternated runs each, same box).
WIDTHS = (48, 64, 128)


Take = Callable[[str, tuple[int, ...]], torch.Tensor]  # (state-dict name, expected shape) -> tensor


def _module_source(decoder: nn.Module) -> Take:
    """``take`` over a torch decoder module: its (weight-norm-applied) tensors by name."""

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        value = getattr(decoder.get_submodule(module_name), attr)
        if tuple(value.shape) != shape:
            raise ValueError(f"decoder {name} is {tuple(value.shape)}, the config says {shape}")
        return value.detach()

    return take


def _zero_outside(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Zero ``x`` along time outside ``[lo, hi)`` (in place)."""
    if lo > 0:
        x[..., : min(lo, x.shape[-1])].zero_()
    if hi < x.shape[-1]:
        x[..., max(hi, 0) :].zero_()
    return x


class FastHifiGan:
    """``VitsHifiGan`` (ResBlock1 or Piper's ResBlock2) as windowed channels-last convolutions."""

    def __init__(
        self, decoder: nn.Module | Take, config: Any, *, fused: bool | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        """``decoder``: transformers' ``VitsHifiGan`` (or ttsd's Piper variant), or a function
        ``take(name, shape)`` returning its tensors by state-dict name with weight norm folded
        (``model.NativeVits``). The geometry (kernels, strides, dilations) comes from ``config``.
        ``dtype``: what the convolutions run in (``torch.bfloat16`` on CPUs with bf16 dot products);
        the input and the last layer (``_last``) stay float32 either way."""
        take = _module_source(decoder) if isinstance(decoder, nn.Module) else decoder
        self.dtype = dtype
        self.fused = fused_ops_work(dtype) if fused is None else fused
        self.slope = float(config.leaky_relu_slope)
        self.kernels = len(config.resblock_kernel_sizes)
        self.hop = math.prod(int(r) for r in config.upsample_rates)  # samples per latent frame
        resblock2 = str(getattr(config, "resblock", "1")) == "2"
        channels = int(config.upsample_initial_channel)

        def conv(
            name: str,
            out: int,
            inp: int,
            kernel: int,
            dilation: int = 1,
            scale: float = 1.0,
            bias: bool = True,
            dtype: torch.dtype = dtype,
        ) -> Conv:
            return Conv(
                take(f"{name}.weight", (out, inp, kernel)),
                take(f"{name}.bias", (out,)) if bias else None,
                padding=(kernel - 1) * dilation // 2,
                dilation=dilation,
                scale=scale,
                fused=self.fused,
                dtype=dtype,
            )

        self.pre = conv("conv_pre", channels, int(config.flow_size), 7)
        self.cond: tuple[torch.Tensor, torch.Tensor] | None = None
        if int(config.speaker_embedding_size):
            e = int(config.speaker_embedding_size)
            self.cond = (take("cond.weight", (channels, e, 1))[:, :, 0], take("cond.bias", (channels,)))
        self.stages: list[tuple[Conv, list[list[tuple[Conv, ...]]]]] = []
        kernel_sizes = [int(k) for k in config.resblock_kernel_sizes]
        dilations = [[int(d) for d in ds] for ds in config.resblock_dilation_sizes]
        for i, (rate, size) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)):
            rate, size, out = int(rate), int(size), channels // 2
            # stage i > 0 gets the previous stage's residual-block sum: its 1/n is folded in here
            upsample = Conv(
                take(f"upsampler.{i}.weight", (channels, out, size)),
                take(f"upsampler.{i}.bias", (out,)),
                padding=(size - rate) // 2,
                stride=rate,
                transposed=True,
                scale=1.0 if i == 0 else 1.0 / self.kernels,
                fused=self.fused,
                dtype=dtype,
            )
            channels = out
            blocks: list[list[tuple[Conv, ...]]] = []
            for j, (k, ds) in enumerate(zip(kernel_sizes, dilations, strict=True)):
                name = f"resblocks.{i * self.kernels + j}"
                steps: list[tuple[Conv, ...]]
                if resblock2:  # one dilated conv per step
                    steps = [(conv(f"{name}.convs.{m}", out, out, k, d),) for m, d in enumerate(ds)]
                else:  # ResBlock1: dilated conv, leaky ReLU, plain conv
                    steps = [
                        (conv(f"{name}.convs1.{m}", out, out, k, d), conv(f"{name}.convs2.{m}", out, out, k))
                        for m, d in enumerate(ds)
                    ]
                blocks.append(steps)
            self.stages.append((upsample, blocks))
        # the last layer stays float32 in any dtype: its 7 x C products sum to a sample far smaller
        # than its terms, and computed in bf16 (torch's bf16 product, or its taps rounded to bf16)
        # it left a hiss at -40 dBFS (tests/test_precision.py's gate catches that)
        self.post = conv("conv_post", 1, channels, 7, scale=1.0 / self.kernels, bias=False, dtype=torch.float32)
        self.post_taps = self.post.weight[0, :, 0, :].t().contiguous()  # (kernel, channels), see _last
        self.radius, self.margins = self._receptive_margins()
        # every convolution the windows run, weights in oneDNN's layout (the last layer is _last's)
        self.packed_convolutions = sum(conv.pack(WIDTHS[-1] * scale) for conv, scale in self.convolutions())
        self.window_seconds: dict[int, float] = {}  # width -> measured time of one window, see measure_windows
        self._cover_table: tuple[Any, list[list[int]]] | None = None  # (what it was made for, covers), see _covers

    def convolutions(self) -> Iterator[tuple[Conv, int]]:
        """Each convolution the windows run, with the samples per latent frame of its input."""
        yield self.pre, 1
        scale = 1
        for upsample, blocks in self.stages:
            yield upsample, scale
            scale *= upsample.stride[1]
            yield from ((conv, scale) for steps in blocks for step in steps for conv in step)

    def _receptive_margins(self) -> tuple[int, list[int]]:
        """Latent frames on each side that can influence one output sample (an upper bound), and,
        per stage, the samples on each side of its output that the layers after it still need."""

        def half(conv: Conv) -> int:
            return (conv.kernel - 1) * conv.dilation[1] // 2 + 1

        radius = half(self.post)
        margins = [0] * len(self.stages)
        for i in reversed(range(len(self.stages))):
            margins[i] = radius
            upsample, blocks = self.stages[i]
            radius += max(sum(half(c) for step in steps for c in step) for steps in blocks)
            radius = math.ceil((radius + upsample.kernel) / upsample.stride[1])
        return radius + half(self.pre), margins

    # -- one window -------------------------------------------------------------------------------
    def _window(self, latents: torch.Tensor, lo: int, hi: int, bias: torch.Tensor | None, context: int) -> torch.Tensor:
        """Decode a ``(1, C, width)`` window whose frames ``[lo, hi)`` are real (the rest stand for
        the zeros the reference pads a sentence with) -> the samples of its kept frames, ``[context,
        width - context)``, in full even where they are padding.

        Every intermediate tensor is zeroed outside the real frames, which is exactly the reference's
        zero padding at a sentence's ends. After each stage the window is cropped to the kept frames
        plus what the later layers still need on each side (``margins``): most of the overlap is in
        the first, cheapest stage. The crops depend on the width only, so the shapes stay bounded."""
        s, width = self.slope, latents.shape[-1]
        x = latents.to(self.dtype).unsqueeze(2).contiguous(memory_format=CL)
        x = self.pre(x, bias, "leaky_relu", s)  # the first upsampler only ever sees leaky_relu(x)
        scale, offset, last = 1, 0, len(self.stages) - 1  # samples per frame here; frame 0 is at -offset
        for i, (upsample, blocks) in enumerate(self.stages):
            _zero_outside(x, lo * scale - offset, hi * scale - offset)
            u = upsample(x)
            del x  # not needed past the upsampler: one tensor less in the stage's working set
            scale, offset = scale * upsample.stride[1], offset * upsample.stride[1]
            real = (lo * scale - offset, hi * scale - offset)
            _zero_outside(u, *real)
            shared: torch.Tensor | None = F.leaky_relu(u, s)  # every block's first step starts from it
            acc: torch.Tensor | None = None  # the sum of the blocks' outputs
            for b, steps in enumerate(blocks):
                last_block = b == len(blocks) - 1
                # h: the block's running value, u at first (u is written in place only in the last
                # block: no later block reads it); t: leaky_relu(h), the next convolution's input
                h: torch.Tensor | None = u
                t: torch.Tensor | None = shared
                for k, step in enumerate(steps):
                    final = k == len(steps) - 1
                    if final and acc is not None:  # the block's output goes into acc: h first
                        assert h is not None
                        acc.add_(h)
                        if t is None:  # h is the block's own: leaky_relu in place
                            t = F.leaky_relu_(h, s)
                        h = None
                    elif t is None:
                        assert h is not None
                        t = F.leaky_relu(h, s)
                    if len(step) == 2:  # ResBlock1: t = conv2(leaky_relu(conv1(t)))
                        t = _zero_outside(step[0](t, None, "leaky_relu", s), *real)
                    if last_block:
                        shared = None
                    conv = step[-1]
                    if h is None:
                        assert acc is not None
                        conv.add_into(acc, t)
                    elif h is u and not last_block:
                        h = conv.add(t, h)
                    else:
                        conv.add_into(h, t)
                    t = None
                    if not final:
                        assert h is not None
                        _zero_outside(h, *real)
                    elif h is not None:
                        acc = h
            del u, shared  # free before the next stage allocates its own
            assert acc is not None
            # HiFi-GAN's last leaky ReLU uses 0.01; the last layer (_last) is float32
            x = F.leaky_relu_(acc.float(), 0.01) if i == last else F.leaky_relu_(acc, s)
            if context:  # keep the kept frames and the margin the later layers need
                crop = max(0, context * scale - offset - self.margins[i])
                x = x[..., crop : x.shape[-1] - crop]
                offset += crop
        _zero_outside(x, lo * scale - offset, hi * scale - offset)
        return self._last(x, context * scale - offset, (width - 2 * context) * self.hop)

    def _last(self, x: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """``tanh(conv_post(x))`` for output samples ``[start, start + count)`` of the channels-last
        ``(1, C, 1, L)`` x. A convolution with one output channel is a poor fit for oneDNN (measured
        ~10 GFLOP/s, 2-4 ms per widest window), so: one ``(k, C) @ (C, rows)`` product over the
        rows those samples need (1.5 ms), then its k rows summed, each shifted by its tap."""
        k = self.post_taps.shape[0]
        half = (k - 1) // 2
        rows = x.permute(0, 2, 3, 1).reshape(x.shape[-1], x.shape[1])  # (L, C): channels-last's memory
        lo, hi = start - half, start + count + half
        taps = self.post_taps @ rows[max(lo, 0) : min(hi, rows.shape[0])].t()  # (k, rows)
        if lo < 0 or hi > rows.shape[0]:  # the reference's zero padding at the ends
            taps = F.pad(taps, (max(-lo, 0), max(hi - rows.shape[0], 0)))
        out = taps[0, 0:count].clone()
        for j in range(1, k):
            out += taps[j, j : j + count]
        return out.tanh_()

    # -- whole latents ----------------------------------------------------------------------------
    @property
    def first_piece(self) -> int | None:
        """Frames to keep from the first window when streaming: what the narrowest window keeps that
        keeps at least as much as its context (20 frames, about 0.23 s, for Piper's medium voices)."""
        return next((w - 2 * self.radius for w in WIDTHS if w - 2 * self.radius >= max(8, self.radius)), None)

    def window_cost(self, width: int) -> float:
        """The cost of one window: its measured time where ``measure_windows`` ran, else its relative
        work (every stage sees its kept frames, only the first stage, about a fifth of the work,
        also sees its context)."""
        if width in self.window_seconds:
            return self.window_seconds[width]
        return width - 2 * self.radius + 0.2 * 2 * self.radius

    def usable_widths(self) -> list[int]:
        """The widths a window may have: wider than the context on both sides."""
        return [w for w in WIDTHS if w > 2 * self.radius]

    def warm_windows(self) -> None:
        """Decode one window of each usable width (oneDNN builds its kernels for each at the first)."""
        self.measure_windows(repeats=0)

    def measure_windows(self, repeats: int = 2) -> dict[int, float]:
        """Time one window of each usable width on this box, on the calling thread's core count,
        and plan with those times from now on; returns them (seconds).

        The work model above leaves out what a window costs whatever its width: a few dozen kernel
        launches and thread barriers, and small convolutions that run far below the CPU's rate.
        That fixed part is largest where the convolutions are fastest (bf16), and there the model's
        plan for 176 frames (48 + 128 + 48 + 64 frames: four windows) took longer than two
        128-frame windows; ``bench/decoder_plans.py`` compares the plans. How large that part is
        depends on the CPU, the precision and the thread count, so it is measured. Each width runs
        once untimed (its kernels may not be built yet), then ``repeats`` times, the widths
        interleaved; the best time counts. About 0.1 s on 2 cores. Call it on a loaded decoder,
        before it serves (the result replaces the plans' costs)."""
        r = self.radius
        widths = self.usable_widths()
        generator = torch.Generator().manual_seed(0)
        channels = self.pre.in_channels
        best: dict[int, float] = {}
        with torch.inference_mode():
            inputs = {w: torch.randn(1, channels, w, generator=generator) for w in widths}
            for round_ in range(repeats + 1):
                for w in widths:
                    started = time.perf_counter()
                    self.decode(inputs[w], w, (0, w, r, w - r), None)
                    elapsed = time.perf_counter() - started
                    if round_:
                        best[w] = min(best.get(w, elapsed), elapsed)
        if best and all(math.isfinite(t) and t > 0 for t in best.values()):
            self.window_seconds = best
        return dict(best)

    def _covers(self) -> list[list[int]]:
        """For each frame count up to two widest windows, the widths that cover it at the least
        ``window_cost``. Computed once per radius and set of measured times."""
        r = self.radius
        key = (r, tuple(sorted(self.window_seconds.items())))
        if self._cover_table is not None and self._cover_table[0] == key:
            return self._cover_table[1]
        usable = [w for w in WIDTHS if w > 2 * r]
        best: list[tuple[float, int]] = [(0.0, 0)]
        for n in range(1, 2 * (usable[-1] - 2 * r) + 1):
            best.append(min((best[max(0, n - (w - 2 * r))][0] + self.window_cost(w), w) for w in usable))
        covers: list[list[int]] = [[]]
        for n in range(1, len(best)):
            width = best[n][1]
            covers.append([*covers[max(0, n - (width - 2 * r))], width])
        self._cover_table = (key, covers)
        return covers

    def plan(self, frames: int, first: int | None = None) -> list[tuple[int, int, int, int]]:
        """Windows for ``frames`` latent frames: (start, width, keep_from, keep_to) in frames. A window
        decodes ``[start, start + width)`` (frames outside ``[0, frames)`` are zeros) and keeps
        ``[keep_from, keep_to)``, with ``radius`` frames of context on each side. ``first``: frames
        to keep from the first window (streaming); the windows after it grow 4x each up to the
        widest, so each is decoded well before the audio already sent has played. Otherwise, and
        for the rest: windows of the width that costs least per kept frame (the widest, unless
        measured otherwise), then the cheapest cover of the last stretch (``_covers``)."""
        r = self.radius
        usable = [w for w in WIDTHS if w > 2 * r]
        if not usable:  # a decoder too deep for the windows: decode it whole, at its own length
            return [(0, frames, 0, frames)]
        widest = usable[-1]
        windows: list[tuple[int, int, int, int]] = []
        keep = 0

        def add(width: int, kept: int) -> None:
            nonlocal keep
            keep_to = min(frames, keep + kept)
            windows.append((keep - r, width, keep, keep_to))
            keep = keep_to

        if first is not None:
            target = max(1, first) + 2 * r
            width = next((w for w in usable if w >= target), widest)
            add(width, min(max(1, first), width - 2 * r))
            while keep < frames and (target := 4 * target) < widest:
                width = next(w for w in usable if w >= target)
                add(width, width - 2 * r)
        bulk = min(usable, key=lambda w: (self.window_cost(w) / (w - 2 * r), -w))  # least cost per kept frame
        while frames - keep > 2 * (widest - 2 * r):
            add(bulk, bulk - 2 * r)
        for width in self._covers()[frames - keep] if keep < frames else []:
            add(width, width - 2 * r)
        return windows

    def speaker_bias(self, speaker: torch.Tensor | None) -> torch.Tensor | None:
        """The first layer's bias with the speaker's constant offset folded in (None: its own)."""
        if speaker is None or self.cond is None:
            return None
        weight, offset = self.cond
        bias = weight @ speaker.reshape(-1) + offset
        if self.pre.bias is not None:
            bias = bias + self.pre.bias
        return bias.to(self.dtype)

    def decode(
        self, latents: torch.Tensor, frames: int, window: tuple[int, int, int, int], bias: torch.Tensor | None
    ) -> torch.Tensor:
        """One window of ``plan(frames, ...)`` -> its kept samples. ``latents`` ``(1, C, n)`` must
        hold the sentence's frames up to where the window reads (``start + width``, or ``frames``);
        it may stop there."""
        start, width, keep_from, keep_to = window
        lo, hi = max(0, -start), min(width, frames - start)
        piece = latents[..., max(0, start) : start + hi]
        if lo or hi < width:
            piece = F.pad(piece, (lo, width - hi))
        samples = self._window(piece, lo, hi, bias, keep_from - start)
        return samples[: (keep_to - keep_from) * self.hop]

    def stream(
        self, latents: torch.Tensor, speaker: torch.Tensor | None = None, first: int | None = None
    ) -> Iterator[torch.Tensor]:
        """``(1, C, frames)`` latents -> waveform pieces ``(samples,)``, in order."""
        bias, frames = self.speaker_bias(speaker), latents.shape[-1]
        for window in self.plan(frames, first):
            yield self.decode(latents, frames, window, bias)

    def __call__(self, latents: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        pieces = list(self.stream(latents, speaker))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
