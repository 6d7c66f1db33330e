"""One decoder convolution as the fast HiFi-GAN runs it (``decoder.py``): a 1-D convolution kept
as a channels-last (out, in, 1, k) 2-D weight, with oneDNN's fused convolution + leaky ReLU /
residual add where torch has them (``fused_ops_work``), the plain ops otherwise. On the fused path
the weight is kept in oneDNN's own layout for this CPU (``Conv.pack``)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

CL = torch.channels_last


def fused_ops_work(dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch has oneDNN's fused convolution ops and they run here in ``dtype``."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(1, 2, 1, 4, dtype=dtype).contiguous(memory_format=CL)
        w = torch.ones(2, 2, 1, 3, dtype=dtype).contiguous(memory_format=CL)
        y = ops._convolution_pointwise(x, w, None, [0, 1], [1, 1], [1, 1], 1, "leaky_relu", [0.1], "")
        ops._convolution_pointwise_.binary(y, x, w, None, [0, 1], [1, 1], [1, 1], 1, "add", None, None, [], None)
        t = ops._convolution_transpose_pointwise(x, w, None, [0, 0], [0, 0], [1, 1], [1, 1], 1, "none", [], "")
        return bool(torch.isfinite(y).all()) and t.shape[-1] == 6
    except Exception:  # any failure means: use the plain path
        return False


class Conv:
    """One convolution's weights in channels-last 2-D form, with fused and plain entry points.
    ``weight`` is in torch's layout: (out, in, k), or (in, out, k) when ``transposed``. Weights and
    bias are kept in ``dtype``, the dtype of the activations they are applied to."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        padding: int,
        dilation: int = 1,
        stride: int = 1,
        transposed: bool = False,
        scale: float = 1.0,
        fused: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.transposed = transposed
        self.weight = (weight.detach().float() * scale).to(dtype).unsqueeze(2).contiguous(memory_format=CL)
        self.bias = None if bias is None else bias.detach().to(dtype, copy=True)
        self.kernel = int(weight.shape[-1])
        self.padding = [0, int(padding)]
        self.dilation = [1, int(dilation)]
        self.stride = [1, int(stride)]
        self.fused = fused
        self.in_channels = int(weight.shape[0 if transposed else 1])
        self.packed = False  # self.weight is in oneDNN's layout (pack)

    def pack(self, width: int) -> bool:
        """Keep the weight in the layout oneDNN's kernels read on this CPU, reordered once here rather
        than at every call: the fused ops reorder a plain channels-last weight each time they run
        (``bench/decoder_plans.py`` times the difference). torch's own weight prepacking for these
        ops (what its compiler does when it freezes a model); the numbers are the same to the bit,
        for any input length (the layout is chosen for ``width`` samples; others read it too), as
        ``tests/test_fast_decoder.py`` checks. No probe run here: one per convolution at the width
        built oneDNN kernels for shapes no window uses, 20 MB of peak RSS. Only on the fused path;
        a weight that does not pack stays plain. Returns whether it packed."""
        if not self.fused or self.packed:
            return self.packed
        ops = torch.ops.mkldnn
        size = [1, self.in_channels, 1, int(width)]
        try:
            if self.transposed:
                packed = ops._reorder_convolution_transpose_weight(
                    self.weight, self.padding, [0, 0], self.stride, self.dilation, 1, size
                )
            else:
                packed = ops._reorder_convolution_weight(self.weight, self.padding, self.stride, self.dilation, 1, size)
        except Exception:  # an op this torch lacks or refuses: keep the plain weight
            return False
        self.weight, self.packed = packed, True
        return True

    def unfused(self) -> Conv:
        """A copy that runs torch's plain convolution ops, on a plain channels-last weight."""
        plain = copy.copy(self)
        if self.packed:  # a packed transposed weight reads back as (out, in, 1, k)
            dense = self.weight.to_dense()
            plain.weight = (dense.transpose(0, 1) if self.transposed else dense).contiguous(memory_format=CL)
        plain.fused, plain.packed = False, False
        return plain

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, post: str = "none", slope: float = 0.0
    ) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        if self.transposed:
            if self.fused:
                return torch.ops.mkldnn._convolution_transpose_pointwise(
                    x, self.weight, bias, self.padding, [0, 0], self.stride, self.dilation, 1, "none", [], ""
                )
            return F.conv_transpose2d(x, self.weight, bias, stride=self.stride, padding=self.padding)
        if self.fused:
            scalars = [slope] if post == "leaky_relu" else []
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, bias, self.padding, self.stride, self.dilation, 1, post, scalars, ""
            )
        y = F.conv2d(x, self.weight, bias, padding=self.padding, dilation=self.dilation)
        if post == "leaky_relu":
            return F.leaky_relu_(y, slope)
        return y

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``conv(x) + other`` as a new tensor."""
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x,
                other,
                self.weight,
                self.bias,
                self.padding,
                self.stride,
                self.dilation,
                1,
                "add",
                None,
                None,
                [],
                None,
            )
        return self(x).add_(other)

    def add_into(self, acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``acc += conv(x)`` in place."""
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                acc, x, self.weight, self.bias, self.padding, self.stride, self.dilation, 1, "add", None, None, [], None
            )
        return acc.add_(self(x))
