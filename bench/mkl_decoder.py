"""A yardstick for the decoder's windows in a second library (``bench/decoder_plans.py``): the same
HiFi-GAN windows, every convolution run on MKL instead of oneDNN.

oneDNN builds and keeps kernels for every input length it meets, which is why the decoder runs on
three fixed widths. MKL's float32 products build nothing per shape, so on MKL a sentence can be
decoded whole, or in pieces of any width, with nothing kept afterwards: what stands between the
windows and a whole-sentence decode is then only MKL's rate against oneDNN's on these convolutions,
and the memory a wider piece takes while it runs.

A channels-last ``(1, C, 1, L)`` tensor is, in memory, ``L`` rows of ``C`` channels, so each
convolution here is one ``(rows, C_in) @ (C_in, C_out)`` product per tap over rows shifted by the
tap (rows past an end are skipped: the zero padding); a transposed one (kernel twice its stride,
as in HiFi-GAN) is two products, each tap's rows landing in its output block and the next. These
plug into ``FastHifiGan``'s own windows (zeroing outside the sentence, the crops after each stage),
so the output is the decoder's to float rounding (``decoder_plans.py`` checks it to 1e-5).

Bench-only, float32."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``(1, C, 1, L)`` tensor as its ``(L, C)`` rows (a view)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[-1], x.shape[1])


def _channels_last(rows: torch.Tensor) -> torch.Tensor:
    """``(L, C)`` rows as a channels-last ``(1, C, 1, L)`` tensor (a view)."""
    return rows.t().unsqueeze(0).unsqueeze(2)


class MklConv:
    """One of the decoder's convolutions (``ttsd.engines.vits.conv.Conv``'s calls) on MKL products."""

    def __init__(self, conv: Any) -> None:
        weight = conv.unfused().weight.contiguous()[:, :, 0, :].float()  # (out, in, k); transposed (in, out, k)
        self.bias, self.kernel, self.transposed = conv.bias, conv.kernel, conv.transposed
        self.padding, self.dilation, self.stride = conv.padding, conv.dilation, conv.stride  # [1, n], as Conv's
        if self.transposed:
            s = self.stride[1]
            if conv.kernel != 2 * s or self.padding[1] != s // 2:
                raise ValueError("MklConv: a transposed convolution's kernel must be twice its stride")
            self.out = int(weight.shape[1])
            # taps [0, s) land in the input row's own output block, [s, 2s) in the next one's
            self.blocks = [weight[:, :, a:a + s].permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()
                           for a in (0, s)]
        else:
            self.out = int(weight.shape[0])
            self.taps = [weight[:, :, j].t().contiguous() for j in range(conv.kernel)]

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """``out += conv(x)`` without the bias, on rows."""
        length = x.shape[0]
        for j, tap in enumerate(self.taps):
            shift = j * self.dilation[1] - self.padding[1]  # out[t] += x[t + shift] @ tap
            lo, hi = max(0, -shift), min(length, length - shift)
            if lo < hi:
                out[lo:hi].addmm_(x[lo + shift:hi + shift], tap)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, post: str = "none",
                 slope: float = 0.0) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        rows = _rows(x)
        length = rows.shape[0]
        if self.transposed:
            s = self.stride[1]
            full = torch.empty(length + 1, s * self.out)
            torch.mm(rows, self.blocks[0], out=full[:length])
            full[length].zero_()
            full[1:].addmm_(rows, self.blocks[1])
            out = full.view(-1, self.out)[s // 2:s // 2 + length * s]
            if bias is not None:
                out.add_(bias)
            return _channels_last(out)
        out = torch.zeros(length, self.out) if bias is None else bias.expand(length, self.out).clone()
        self._accumulate(out, rows)
        if post == "leaky_relu":
            F.leaky_relu_(out, slope)
        return _channels_last(out)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``conv(x) + other`` as a new tensor."""
        out = _rows(other).clone()
        self.add_into(_channels_last(out), x)
        return _channels_last(out)

    def add_into(self, acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``acc += conv(x)`` in place."""
        rows = _rows(acc)
        self._accumulate(rows, _rows(x))
        if self.bias is not None:
            rows.add_(self.bias)
        return acc


class MklDecoder:
    """``FastHifiGan``'s windows on MKL: a sentence whole (``most=None``) or in pieces keeping at
    most ``most`` frames each, split evenly (on MKL any width costs nothing to build)."""

    def __init__(self, decoder: Any, most: int | None = None) -> None:
        if decoder.dtype != torch.float32:
            raise ValueError("MklDecoder: float32 only")
        on_mkl = copy.copy(decoder)
        on_mkl.pre = MklConv(decoder.pre)
        on_mkl.stages = [(MklConv(up), [[tuple(MklConv(c) for c in step) for step in steps] for steps in blocks])
                         for up, blocks in decoder.stages]
        self.decoder, self.most = on_mkl, most

    def __call__(self, latents: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        frames, r = latents.shape[-1], self.decoder.radius
        count = 1 if self.most is None else -(-frames // self.most)
        pieces, keep = [], 0
        for i in range(count):
            kept = -(-(frames - keep) // (count - i))
            window = (0, frames, 0, frames) if count == 1 else (keep - r, kept + 2 * r, keep, keep + kept)
            pieces.append(self.decoder.decode(latents, frames, window, bias))
            keep += kept
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
