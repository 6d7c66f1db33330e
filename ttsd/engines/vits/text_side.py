"""The text side of VITS, inference only: the text encoder layer (relative-position self-attention,
convolutional feed-forward), the stochastic duration predictor's reverse pass (rational-quadratic
spline flows) or the deterministic predictor, and the prior flow's reverse pass (WaveNet coupling
layers), each built from a checkpoint's weights. They all run *time-major* (``(time, channels)``
matrices): a convolution is, in float32, one GEMM per tap over shifted rows added in place, and in
bf16 one GEMM over an im2col view (``weights._TimeConv``; a depthwise one, shifted sums), which
measured faster on 2 cores than torch's 1-D convolutions at these sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import _ACTIVATIONS, VitsConfig
from .weights import Dense, _TimeConv, _Weights


def _layer_norm(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), params[0], params[1], eps)


class _EncoderLayer:
    def __init__(self, w: _Weights, prefix: str, c: VitsConfig) -> None:
        h, self.heads = c.hidden_size, c.num_attention_heads
        self.head_dim = h // self.heads
        a = f"{prefix}.attention"
        q, k, v, self.out = (w.linear(f"{a}.{n}_proj", h, h, c.use_bias) for n in ("q", "k", "v", "out"))
        # one (h, 3h) product for queries, keys and values, with the 1/sqrt(head_dim) of the
        # scores folded into the query weights
        scale = self.head_dim**-0.5
        self.qkv = Dense(
            torch.cat([q.matrix() * scale, k.matrix(), v.matrix()], dim=1),
            None if q.bias is None or k.bias is None or v.bias is None else torch.cat([q.bias * scale, k.bias, v.bias]),
        )
        self.window = c.window_size or 0
        if self.window:
            shape = (1, 2 * self.window + 1, self.head_dim)
            self.rel_k = w.take(f"{a}.emb_rel_k", shape)[0]
            self.rel_v = w.take(f"{a}.emb_rel_v", shape)[0]
        self.norm1 = (w.take(f"{prefix}.layer_norm.weight", (h,)), w.take(f"{prefix}.layer_norm.bias", (h,)))
        self.norm2 = (
            w.take(f"{prefix}.final_layer_norm.weight", (h,)),
            w.take(f"{prefix}.final_layer_norm.bias", (h,)),
        )
        kernel = c.ffn_kernel_size
        ff = f"{prefix}.feed_forward"
        # transformers pads the feed-forward convolutions (k-1)//2 left and k//2 right
        self.ff1 = _TimeConv(
            w.take(f"{ff}.conv_1.weight", (c.ffn_dim, h, kernel)),
            w.take(f"{ff}.conv_1.bias", (c.ffn_dim,)),
            1,
            (kernel - 1) // 2,
            kernel // 2,
        )
        self.ff2 = _TimeConv(
            w.take(f"{ff}.conv_2.weight", (h, c.ffn_dim, kernel)),
            w.take(f"{ff}.conv_2.bias", (h,)),
            1,
            (kernel - 1) // 2,
            kernel // 2,
        )
        self.act = _ACTIVATIONS[c.hidden_act]
        self.eps = c.layer_norm_eps

    def _band(self, padded: torch.Tensor) -> torch.Tensor:
        """The ``(heads, T, 2w+1)`` band of ``(heads, T, T+2w)`` scores or probabilities padded by the
        window ``w`` on both sides: ``[h, i, d]`` is key ``i + d - w`` of query ``i``, the relative
        offset ``d - w`` (zero padding where no key is at that offset). A strided view, no copy."""
        heads, t, width = padded.shape
        return padded.as_strided((heads, t, 2 * self.window + 1), (t * width, width + 1, 1), padded.storage_offset())

    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor, key_bias: torch.Tensor | None, batch: int = 1
    ) -> torch.Tensor:
        """``batch`` sentences of ``T`` rows each, stacked: ``x`` ``(batch * T, C)``, ``mask``
        ``(batch * T, 1)``, ``key_bias`` ``(batch, 1, T)``, each sentence's own (None: no
        padding). Each sentence attends only to itself; the feed-forward convolutions reach into
        the neighbouring sentence's rows, so each must end in at least ``reach`` masked rows."""
        t, nh, hd = x.shape[0] // batch, self.heads, self.head_dim
        qkv = self.qkv(x)
        # (batch * heads, T, hd); one sentence's is a view, no copy
        q, k, v = (
            part.view(batch, t, nh, hd).transpose(1, 2).reshape(batch * nh, t, hd) for part in qkv.split(nh * hd, dim=1)
        )
        scores = q @ k.transpose(1, 2)  # (batch * heads, T, T)
        w = self.window
        if w:
            # relative positions reach w keys either side: their logits (heads, T, 2w+1) go onto the
            # band of the scores, padded so that the band is one strided view (transformers skews
            # (heads, T, 2T-1) logits against an embedding table padded with zeros to 2T-1 offsets)
            padded = F.pad(scores, (w, w))
            self._band(padded).add_(q @ self.rel_k.t())
            scores = padded[..., w : w + t]
        if key_bias is not None:
            scores.unflatten(0, (batch, nh)).add_(key_bias[:, None])
        probs = torch.softmax(scores, dim=-1)
        out = probs @ v  # (batch * heads, T, hd)
        if w:  # the attention on each relative offset, times its value embedding
            out += self._band(F.pad(probs, (w, w))) @ self.rel_v
        out = out.view(batch, nh, t, hd).transpose(1, 2).reshape(batch * t, nh * hd)
        out = self.out(out)
        x = _layer_norm(x + out, self.norm1, self.eps)
        h = self.ff2(self.act(self.ff1(x * mask)) * mask) * mask
        return _layer_norm(x + h, self.norm2, self.eps)

    @property
    def reach(self) -> int:
        """Rows on either side a feed-forward convolution reads."""
        return max(self.ff1.left, self.ff1.right, self.ff2.left, self.ff2.right)


class _DepthSeparable:
    """VITS's dilated depth-separable conv stack (duration predictor), time-major."""

    def __init__(self, w: _Weights, prefix: str, c: VitsConfig) -> None:
        h, k = c.hidden_size, c.duration_predictor_kernel_size
        self.layers = []
        for i in range(c.depth_separable_num_layers):
            dilation = k**i
            depthwise = w.take(f"{prefix}.convs_dilated.{i}.weight", (h, 1, k))[:, 0].t().contiguous()  # (k, C)
            self.layers.append(
                (
                    depthwise,
                    w.take(f"{prefix}.convs_dilated.{i}.bias", (h,)),
                    dilation,
                    w.pointwise(f"{prefix}.convs_pointwise.{i}", h, h),
                    (w.take(f"{prefix}.norms_1.{i}.weight", (h,)), w.take(f"{prefix}.norms_1.{i}.bias", (h,))),
                    (w.take(f"{prefix}.norms_2.{i}.weight", (h,)), w.take(f"{prefix}.norms_2.{i}.bias", (h,))),
                )
            )

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + condition
        t = x.shape[0]
        for depthwise, bias, dilation, pointwise, norm1, norm2 in self.layers:
            k = depthwise.shape[0]
            pad = (k - 1) * dilation // 2
            xp = F.pad(x * mask, (0, 0, pad, pad))
            h = torch.addcmul(bias, xp[:t], depthwise[0])  # the taps' products summed in place
            for j in range(1, k):
                h.addcmul_(xp[j * dilation : j * dilation + t], depthwise[j])
            h = F.gelu(F.layer_norm(h, (h.shape[1],), *norm1))  # nn.LayerNorm's default eps
            h = pointwise(h)
            x = x + F.gelu(F.layer_norm(h, (h.shape[1],), *norm2))
        return x * mask


def _spline_inverse(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    tail: float,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> torch.Tensor:
    """Inverse of the monotonic rational-quadratic spline on [-tail, tail], identity outside
    (Durkan et al., Neural Spline Flows). ``x`` (...), bin parameters (..., bins) / (..., bins-1).

    Written for few operations: on a sentence's few hundred values each costs its dispatch rather
    than its arithmetic, and the duration predictor runs this three times per sentence."""
    bins = widths.shape[-1]
    edge = math.log(math.exp(1 - min_derivative) - 1)  # softplus^-1(1 - min_derivative): slope 1 at the tails
    derivatives = F.softplus(F.pad(derivatives, (1, 1), value=edge)).add_(min_derivative)

    def knots(raw: torch.Tensor, minimum: float) -> torch.Tensor:
        # 2 * tail * cumsum(minimum + (1 - minimum * bins) * softmax) - tail, from -tail to tail
        sizes = torch.softmax(raw, dim=-1).mul_(2 * tail * (1 - minimum * bins)).add_(2 * tail * minimum)
        cum = F.pad(torch.cumsum(sizes, dim=-1), (1, 0)).sub_(tail)
        cum[..., -1] = tail
        return cum

    cumw, cumh = knots(widths, min_width), knots(heights, min_height)
    w, h = cumw[..., 1:] - cumw[..., :-1], cumh[..., 1:] - cumh[..., :-1]
    # the bin each x falls in on the heights' side (clamped: x at or past the last knot is in the
    # last bin, or outside, where the identity applies)
    index = (torch.searchsorted(cumh, x[..., None].contiguous(), right=True) - 1).clamp_(0, bins - 1)
    # the seven per-bin values at that bin, in one gather
    table = torch.stack([cumw[..., :-1], w, cumh[..., :-1], h, h / w, derivatives[..., :-1], derivatives[..., 1:]], -2)
    at = table.gather(-1, index[..., None, :].expand(*table.shape[:-1], 1))[..., 0]
    x0, bw, y0, bh, delta, d0, d1 = at.unbind(-1)
    shifted = x - y0
    dy = torch.add(d0, d1).sub_(delta, alpha=2).mul_(shifted)  # (d0 + d1 - 2 delta)(x - y0)
    a = torch.sub(delta, d0).mul_(bh).add_(dy)
    b = torch.mul(bh, d0).sub_(dy)
    c = torch.mul(delta, shifted).neg_()
    # the root (-b - sqrt(b^2 - 4ac)) / 2a written as 2c / (-b - sqrt(b^2 - 4ac)), stable near a = 0
    denominator = torch.mul(a, c).mul_(-4).addcmul_(b, b).sqrt_().add_(b).neg_()
    root = c.mul_(2).div_(denominator)
    return torch.where(x.abs() <= tail, root.mul_(bw).add_(x0), x)


class _ConvFlow:
    def __init__(self, w: _Weights, prefix: str, c: VitsConfig) -> None:
        h, self.bins = c.hidden_size, c.duration_predictor_flow_bins
        self.pre = w.pointwise(f"{prefix}.conv_pre", h, 1)
        self.dds = _DepthSeparable(w, f"{prefix}.conv_dds", c)
        proj = w.take(f"{prefix}.conv_proj.weight", (3 * self.bins - 1, h, 1))[:, :, 0].clone()
        proj_bias = w.take(f"{prefix}.conv_proj.bias", (3 * self.bins - 1,)).clone()
        # VITS divides the bins' widths and heights by sqrt(hidden) before the spline: folded in here
        proj[: 2 * self.bins] /= math.sqrt(h)
        proj_bias[: 2 * self.bins] /= math.sqrt(h)
        self.proj = Dense(proj.t(), proj_bias)
        self.tail = c.duration_predictor_tail_bound

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        first, second = x[:, :1], x[:, 1:]
        h = self.pre(first)
        h = self.dds(h, mask, condition)
        p = self.proj(h) * mask  # (T, 3*bins-1)
        b = self.bins
        second = _spline_inverse(second[:, 0], p[:, :b], p[:, b : 2 * b], p[:, 2 * b :], self.tail)
        return torch.cat([first, second[:, None]], dim=1) * mask


class _StochasticDuration:
    def __init__(self, w: _Weights, prefix: str, c: VitsConfig) -> None:
        h = c.hidden_size
        self.pre = w.pointwise(f"{prefix}.conv_pre", h, h)
        self.proj = w.pointwise(f"{prefix}.conv_proj", h, h)
        self.dds = _DepthSeparable(w, f"{prefix}.conv_dds", c)
        self.cond = w.pointwise(f"{prefix}.cond", h, c.speaker_embedding_size) if c.speaker_embedding_size else None
        self.affine = (
            w.take(f"{prefix}.flows.0.translate", (2, 1))[:, 0],
            w.take(f"{prefix}.flows.0.log_scale", (2, 1))[:, 0],
        )
        # reversed, and without the first conv flow, which VITS never uses at inference
        count = c.duration_predictor_num_flows
        self.flows = [_ConvFlow(w, f"{prefix}.flows.{i}", c) for i in range(count, 1, -1)]
        for name in [n for n in w.tensors if n.startswith((f"{prefix}.flows.1.", f"{prefix}.post_"))]:
            del w.tensors[name]  # the unused flow and the training-only posterior flows

    def __call__(
        self, hidden: torch.Tensor, mask: torch.Tensor, speaker: torch.Tensor | None, noise: torch.Tensor
    ) -> torch.Tensor:
        x = self.pre(hidden)
        if speaker is not None and self.cond is not None:
            x = x + self.cond(speaker)
        x = self.dds(x, mask)
        condition = self.proj(x) * mask
        latents = noise
        for flow in self.flows:
            latents = flow.reverse(torch.flip(latents, [1]), mask, condition)
        latents = torch.flip(latents, [1])
        translate, log_scale = self.affine
        latents = (latents - translate) * torch.exp(-log_scale) * mask
        return latents[:, :1]  # log durations (T, 1)


class _Duration:
    """The deterministic duration predictor."""

    def __init__(self, w: _Weights, prefix: str, c: VitsConfig) -> None:
        h, f, k = c.hidden_size, c.duration_predictor_filter_channels, c.duration_predictor_kernel_size
        self.conv1 = w.conv(f"{prefix}.conv_1", f, h, k, padding=k // 2)
        self.conv2 = w.conv(f"{prefix}.conv_2", f, f, k, padding=k // 2)
        self.norm1 = (w.take(f"{prefix}.norm_1.weight", (f,)), w.take(f"{prefix}.norm_1.bias", (f,)))
        self.norm2 = (w.take(f"{prefix}.norm_2.weight", (f,)), w.take(f"{prefix}.norm_2.bias", (f,)))
        proj = w.take(f"{prefix}.proj.weight", (1, f, 1))[:, :, 0]
        self.proj = Dense(proj.t(), w.take(f"{prefix}.proj.bias", (1,)))
        self.cond = w.pointwise(f"{prefix}.cond", h, c.speaker_embedding_size) if c.speaker_embedding_size else None
        self.eps = c.layer_norm_eps

    def __call__(
        self, hidden: torch.Tensor, mask: torch.Tensor, speaker: torch.Tensor | None, noise: torch.Tensor
    ) -> torch.Tensor:
        x = hidden
        if speaker is not None and self.cond is not None:
            x = x + self.cond(speaker)
        x = _layer_norm(torch.relu(self.conv1(x * mask)), self.norm1, self.eps)
        x = _layer_norm(torch.relu(self.conv2(x * mask)), self.norm2, self.eps)
        return self.proj(x * mask) * mask


class _Coupling:
    """One residual coupling layer of the prior flow (mean only), reverse direction. ``dtype``: what
    its WaveNet (the mean it subtracts) runs in; the flow's own values stay float32."""

    def __init__(self, w: _Weights, prefix: str, c: VitsConfig, dtype: torch.dtype = torch.float32) -> None:
        h, half = c.hidden_size, c.flow_size // 2
        self.hidden, self.half, self.dtype = h, half, dtype
        pre = w.take(f"{prefix}.conv_pre.weight", (h, half, 1))[:, :, 0]
        self.pre = Dense(pre.t(), w.take(f"{prefix}.conv_pre.bias", (h,)))
        post = w.take(f"{prefix}.conv_post.weight", (half, h, 1))[:, :, 0]
        self.post = Dense(post.t(), w.take(f"{prefix}.conv_post.bias", (half,)))
        n, k = c.prior_encoder_num_wavenet_layers, c.wavenet_kernel_size
        wn = f"{prefix}.wavenet"
        # WaveNet's gate tanh(x) * sigmoid(y) runs as (sigmoid(2x) - 0.5) * sigmoid(y), half of it:
        # one sigmoid over both halves instead of torch's tanh, which is ~5x slower than its sigmoid
        # on CPU (0.4 vs 0.05 ms per layer of a sentence). The 2 is folded into the rows that make x
        # (in-layer and speaker condition), the 1/2 into the residual/skip weights.
        self.layers = []
        for i in range(n):
            out = 2 * h if i < n - 1 else h
            res = w.take(f"{wn}.res_skip_layers.{i}.weight", (out, h, 1))[:, :, 0]
            conv = w.conv(f"{wn}.in_layers.{i}", 2 * h, h, k, dilation=c.wavenet_dilation_rate**i)
            assert conv.bias is not None
            conv.weight[:, :h] *= 2
            conv.bias[:h] *= 2
            self.layers.append((conv, Dense(res.t() * 2, w.take(f"{wn}.res_skip_layers.{i}.bias", (out,)))))
        self.cond = None
        if c.speaker_embedding_size:
            cond = w.take(f"{wn}.cond_layer.weight", (2 * h * n, c.speaker_embedding_size, 1))[:, :, 0]
            cond_bias = w.take(f"{wn}.cond_layer.bias", (2 * h * n,))
            gate = (torch.arange(2 * h * n) % (2 * h)) < h  # the rows that make each layer's x
            cond[gate] *= 2
            cond_bias[gate] *= 2
            self.cond = Dense(cond.t(), cond_bias)
        if dtype != torch.float32:
            for product in (self.pre, self.post, *(p for layer in self.layers for p in layer)):
                product.to(dtype)

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, speaker: torch.Tensor | None) -> torch.Tensor:
        first, second = x[:, : self.half], x[:, self.half :]
        out_mask, mask = mask, mask.to(self.dtype)
        h = self.pre(first.to(self.dtype)) * mask
        hid = self.hidden
        conditions = None
        if speaker is not None and self.cond is not None:
            conditions = self.cond(speaker).to(self.dtype)  # (1, 2*hidden*layers)
        out: torch.Tensor | None = None
        last = len(self.layers) - 1
        for i, (conv, res) in enumerate(self.layers):
            a = conv(h)
            if conditions is not None:
                a += conditions[:, 2 * hid * i : 2 * hid * (i + 1)]
            gates = torch.sigmoid(a)
            acts = (gates[:, :hid] - 0.5).mul_(gates[:, hid:])  # tanh(x) * sigmoid(y) / 2, see __init__
            r = res(acts)
            if i < last:
                h = (h + r[:, :hid]) * mask
                out = r[:, hid:] if out is None else out + r[:, hid:]
            else:
                out = r if out is None else out + r
        assert out is not None
        mean = self.post(out * mask).float()
        return torch.cat([first, (second - mean) * out_mask], dim=1)
