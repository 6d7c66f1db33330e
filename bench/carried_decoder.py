"""A yardstick for the decoder's windows (``bench/decoder_plans.py``): the same HiFi-GAN, on the same
bounded widths, decoded in pieces that carry each layer's context from one piece to the next, so
that nothing is computed twice (the windows recompute their context on both sides).

Every convolution runs "valid" (no padding) on its input with the last ``(k - 1) * dilation``
samples of the previous piece in front of it; each residual block works in place on one buffer
indexed by position, so a block's steps, each later by half its kernel's reach, overwrite earlier
values only where no later piece needs them; the blocks' sums are taken where the latest block is
done. Inputs outside the sentence are zeroed before each convolution, which is the reference's
zero padding at both ends. So a piece of ``width`` frames gives ``width`` frames of audio, late by
about half the receptive field (``lag``), and a sentence of ``n`` frames is fed ``n + lag`` frames,
rounded up to a cover of the widths (the cheapest, by each width's measured time).

Bench-only: float32, the decoder's own (packed, fused) convolutions re-packed for valid inputs; its
output equals ``FastHifiGan``'s to float rounding (decoder_plans.py checks it to 1e-5)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from ttsd.engines.vits.conv import CL, Conv

_leaky_into = torch.ops.aten.leaky_relu.out


def _reach(conv: Conv) -> int:
    """Samples on each side one output of ``conv`` reads."""
    return (conv.kernel - 1) * conv.dilation[1] // 2


def _valid(conv: Conv, length: int) -> Conv:
    """``conv`` without its padding (a transposed one cropped to the samples its input fully
    determines: ``kernel - stride`` on each side), its weight packed for inputs of ``length``."""
    plain = conv.unfused()
    plain.fused = conv.fused
    plain.padding = [0, conv.kernel - conv.stride[1]] if conv.transposed else [0, 0]
    plain.pack(length)
    return plain


def _zero_outside(x: torch.Tensor, first: int, lo: int, hi: int) -> None:
    """Zero the samples of ``x`` (its first at position ``first``) outside positions ``[lo, hi)``."""
    if lo > first:
        x[..., : min(lo - first, x.shape[-1])].zero_()
    if hi < first + x.shape[-1]:
        x[..., max(hi - first, 0) :].zero_()


class _Carry:
    """A stream's last ``depth`` samples, put in front of the next piece: ``open(n)`` returns a new
    ``(1, C, 1, depth + n)`` buffer holding them, ``close()`` keeps the new last ``depth``."""

    def __init__(self, channels: int, depth: int, dtype: torch.dtype) -> None:
        self.depth = depth
        self.tail = torch.zeros(1, channels, 1, depth, dtype=dtype).contiguous(memory_format=CL)
        self.buffer: torch.Tensor | None = None

    def open(self, n: int) -> torch.Tensor:
        c = self.tail.shape[1]
        self.buffer = torch.empty(1, c, 1, self.depth + n, dtype=self.tail.dtype, memory_format=CL)
        self.buffer[..., : self.depth].copy_(self.tail)
        return self.buffer

    def close(self) -> None:
        assert self.buffer is not None
        self.tail = self.buffer[..., self.buffer.shape[-1] - self.depth :].clone()
        self.buffer = None


class CarriedDecoder:
    """``decoder`` (a float32 ``FastHifiGan``) decoding in carried pieces of its widths."""

    def __init__(self, decoder: Any, widths: list[int]) -> None:
        if decoder.dtype != torch.float32:
            raise ValueError("the carried decoder is measured in float32 only")
        self.decoder, self.widths = decoder, sorted(widths)
        self.plans: dict[int, tuple[Conv, list[tuple[Conv, list[list[tuple[Conv, ...]]]]]]] = {}
        for width in self.widths:
            pre = _valid(decoder.pre, width + decoder.pre.kernel - 1)
            stages, scale = [], 1
            for upsample, blocks in decoder.stages:
                up = _valid(upsample, width * scale + upsample.kernel // upsample.stride[1] - 1)
                scale *= upsample.stride[1]
                stages.append((up, [[tuple(_valid(c, width * scale + 2 * _reach(c)) for c in step) for step in steps]
                                    for steps in blocks]))
            self.plans[width] = (pre, stages)
        lag = float(_reach(decoder.pre))  # frames by which a piece's audio trails its input
        scale = 1
        for upsample, blocks in decoder.stages:
            scale *= upsample.stride[1]
            late = (upsample.kernel - upsample.stride[1]) // 2
            late += max(sum(_reach(c) for step in steps for c in step) for steps in blocks)
            lag += late / scale
        self.lag = math.ceil(lag + _reach(decoder.post) / scale)
        self.seconds = {w: float(w) for w in self.widths}  # a piece's cost: its frames until measured

    def measure(self, repeats: int = 3) -> dict[int, float]:
        """Best time of one piece of each width (after one untimed), the plans' costs from then on."""
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for width in self.widths:
                state = _State(self, 10**6, None)
                x = torch.randn(1, self.decoder.pre.in_channels, width, generator=generator)
                state.feed(x, width)
                best = math.inf
                for _ in range(repeats):
                    started = time.perf_counter()
                    state.feed(x, width)
                    best = min(best, time.perf_counter() - started)
                self.seconds[width] = best
        return dict(self.seconds)

    def plan(self, frames: int) -> list[int]:
        """The widest pieces first, covering ``frames + lag`` frames at the least measured cost."""
        need = frames + self.lag
        best: list[tuple[float, list[int]]] = [(0.0, [])]
        for n in range(1, need + 1):
            best.append(min(((best[max(0, n - w)][0] + self.seconds[w], [*best[max(0, n - w)][1], w])
                             for w in self.widths), key=lambda t: t[0]))
        return sorted(best[need][1], reverse=True)

    def __call__(self, latents: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(1, C, frames)`` -> the waveform ``(frames * hop,)``."""
        frames = latents.shape[-1]
        state, start, pieces = _State(self, frames, bias), 0, []
        for width in self.plan(frames):
            piece = latents[..., start : start + width]
            if piece.shape[-1] < width:
                piece = F.pad(piece, (0, width - piece.shape[-1]))
            pieces.append(state.feed(piece, width))
            start += width
        return torch.cat(pieces)


class _State:
    """One sentence's carried context: each convolution's last input samples, each residual
    block's buffer (``depth`` = the stage's longest block delay)."""

    def __init__(self, carried: CarriedDecoder, frames: int, bias: torch.Tensor | None) -> None:
        d = carried.decoder
        self.carried, self.frames, self.bias, self.fed = carried, frames, bias, 0
        self.pre = _Carry(d.pre.in_channels, d.pre.kernel - 1, d.dtype)
        self.stages = []
        for upsample, blocks in d.stages:
            channels = blocks[0][0][0].in_channels
            depth = max(sum(_reach(c) for step in steps for c in step) for steps in blocks)
            self.stages.append((
                _Carry(upsample.in_channels, upsample.kernel // upsample.stride[1] - 1, d.dtype),
                [_Carry(channels, depth, d.dtype) for _ in blocks],
                [[[_Carry(channels, 2 * _reach(c), d.dtype) for c in step] for step in steps] for steps in blocks],
                depth,
            ))
        self.post = _Carry(d.post.in_channels, d.post.kernel - 1, torch.float32)

    def feed(self, latents: torch.Tensor, width: int) -> torch.Tensor:
        """The next ``width`` frames (zeros past the sentence) -> the samples they complete."""
        d, slope = self.carried.decoder, self.carried.decoder.slope
        pre, stages = self.carried.plans[width]
        start, self.fed = self.fed, self.fed + width
        buffer = self.pre.open(width)
        buffer[..., self.pre.depth :].copy_(latents.unsqueeze(2))
        _zero_outside(buffer, start - self.pre.depth, 0, self.frames)
        x = pre(buffer, self.bias, "leaky_relu", slope)
        self.pre.close()
        first = start - _reach(d.pre)  # position of x's first sample, at this stage's rate
        scale, last = 1, len(stages) - 1
        into = self.stages[0][0].open(width)
        into[..., self.stages[0][0].depth :].copy_(x)
        for i, ((upsample, blocks), (up_carry, block_carries, conv_carries, depth)) in enumerate(
            zip(stages, self.stages, strict=True)
        ):
            _zero_outside(into, first - up_carry.depth, 0, self.frames * scale)
            u = upsample(into)
            up_carry.close()
            rate = upsample.stride[1]
            first = first * rate - (upsample.kernel - rate) // 2
            scale *= rate
            end, n = self.frames * scale, u.shape[-1]
            for b, steps in enumerate(blocks):
                h = block_carries[b].open(n)
                h[..., depth:].copy_(u)
                at = depth  # where the block's current value starts in h
                for k, step in enumerate(steps):
                    t_carry = conv_carries[b][k][0]
                    t = t_carry.open(n)
                    _leaky_into(h[..., at : at + n], slope, out=t[..., t_carry.depth :])
                    offset = at - t_carry.depth  # t's first sample, relative to h's
                    _zero_outside(t, first - depth + offset, 0, end)
                    for m, conv in enumerate(step[:-1]):  # ResBlock1: leaky_relu(conv1(t)) into conv2
                        y = conv(t, None, "leaky_relu", slope)
                        offset += _reach(conv)
                        y_carry = conv_carries[b][k][m + 1]
                        t_next = y_carry.open(n)
                        t_next[..., y_carry.depth :].copy_(y)
                        offset -= y_carry.depth
                        _zero_outside(t_next, first - depth + offset, 0, end)
                        conv_carries[b][k][m].close()
                        t, t_carry = t_next, y_carry
                    at = offset + _reach(step[-1])
                    step[-1].add_into(h[..., at : at + n], t)
                    t_carry.close()
            del u
            acc = block_carries[-1].buffer
            assert acc is not None and all(c.buffer is not None for c in block_carries)
            acc = acc[..., :n]  # the blocks' values where the slowest is done
            for carry in block_carries[:-1]:
                assert carry.buffer is not None
                acc.add_(carry.buffer[..., :n])
            first -= depth
            if i == last:
                into = self.post.open(n)
                out = into[..., self.post.depth :]
                out.copy_(acc)
                F.leaky_relu_(out, 0.01)
            else:
                nxt = self.stages[i + 1][0]
                into = nxt.open(n)
                _leaky_into(acc, slope, out=into[..., nxt.depth :])
            for carry in block_carries:
                carry.close()
        _zero_outside(into, first - self.post.depth, 0, self.frames * scale)
        samples = d._last(into, self.post.depth // 2, n)
        self.post.close()
        first += self.post.depth // 2 - self.post.depth  # the first sample's position
        lo, hi = max(0, -first), min(n, self.frames * d.hop - first)
        return samples[lo:hi] if hi > lo else samples[:0]
