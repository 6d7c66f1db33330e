"""``config.json`` -> ``VitsConfig``: the hyper-parameters VITS inference needs, with transformers'
defaults for the fields a checkpoint leaves out (``save_pretrained`` writes only the values that
differ from them), checked for values and combinations the native model cannot run, which are
refused (``LoadError``) with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import LoadError
from .files import read_json

# hidden_act -> the function the text encoder's feed-forward applies (check() refuses other names)
_ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


@dataclass(frozen=True)
class VitsConfig:
    """The hyper-parameters inference needs; defaults are transformers' ``VitsConfig`` defaults,
    because ``save_pretrained`` writes only the values that differ from them."""

    model_type: str = "vits"
    vocab_size: int = 38
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 2
    window_size: int | None = 4
    use_bias: bool = True
    ffn_dim: int = 768
    ffn_kernel_size: int = 3
    flow_size: int = 192
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5
    use_stochastic_duration_prediction: bool = True
    num_speakers: int = 1
    speaker_embedding_size: int = 0
    upsample_initial_channel: int = 512
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    resblock: str = "1"  # Piper's medium/low voices use HiFi-GAN's ResBlock2 ("2")
    leaky_relu_slope: float = 0.1
    depth_separable_channels: int = 2
    depth_separable_num_layers: int = 3
    duration_predictor_flow_bins: int = 10
    duration_predictor_tail_bound: float = 5.0
    duration_predictor_kernel_size: int = 3
    duration_predictor_num_flows: int = 4
    duration_predictor_filter_channels: int = 256
    prior_encoder_num_flows: int = 4
    prior_encoder_num_wavenet_layers: int = 4
    wavenet_kernel_size: int = 5
    wavenet_dilation_rate: int = 1
    speaking_rate: float = 1.0
    noise_scale: float = 0.667
    noise_scale_duration: float = 0.8
    sampling_rate: int = 16_000
    pad_token_id: int | None = None

    @classmethod
    def read(cls, path: Path) -> VitsConfig:
        try:
            data = read_json(path)
        except FileNotFoundError as exc:
            raise LoadError(f"{path}: missing") from exc
        if not isinstance(data, dict):
            raise LoadError(f"{path}: not a JSON object")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config.json") -> VitsConfig:
        if data.get("model_type") not in ("vits", "piper_vits"):
            raise LoadError(f"{where}: model_type {data.get('model_type')!r} is not vits")
        values: dict[str, Any] = {}
        try:
            for f in fields(cls):
                if f.name not in data or (data[f.name] is None and f.name not in ("window_size", "pad_token_id")):
                    continue
                default, value = getattr(cls, f.name), data[f.name]
                if f.name == "resblock_dilation_sizes":
                    value = tuple(tuple(int(d) for d in ds) for ds in value)
                elif isinstance(default, tuple):
                    value = tuple(int(v) for v in value)
                elif isinstance(default, bool):
                    value = bool(value)
                elif isinstance(default, float):
                    value = float(value)
                elif isinstance(default, str):
                    value = str(value)
                elif value is not None:
                    value = int(value)
                values[f.name] = value
        except (TypeError, ValueError) as exc:
            raise LoadError(f"{where}: bad value ({exc})") from exc
        config = cls(**values)
        config.check(where)
        return config

    def check(self, where: str) -> None:
        problems = []
        # values no weight's shape bounds: a speaking_rate near 0 made warm-up's durations (and
        # memory) endless, upsample rates over their kernels spun the decoder's set-up for minutes
        # (the noise scales in the range a request may ask for: a checked option never makes the model raise)
        ranges = (("speaking_rate", 0.1, 10.0), ("noise_scale", 0.0, 2.0), ("noise_scale_duration", 0.0, 2.0))
        for name, low, high in ranges:
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                problems.append(f"{name} must be between {low:g} and {high:g}, not {value!r}")
        for rate, size in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=False):
            if not 1 <= rate <= size:
                problems.append(f"upsample rate {rate} must be from 1 to its kernel size {size}")
        counts = (
            *self.upsample_kernel_sizes,
            *self.resblock_kernel_sizes,
            *(d for ds in self.resblock_dilation_sizes for d in ds),
            self.wavenet_kernel_size,
            self.wavenet_dilation_rate,
            self.ffn_kernel_size,
            self.duration_predictor_kernel_size,
            self.num_attention_heads,
            self.num_speakers,
        )
        if any(n < 1 for n in counts):
            problems.append("kernel sizes, dilations, attention heads and speakers must be at least 1")
        if self.window_size is not None and self.window_size < 1:
            problems.append("window_size must be at least 1 (or null)")
        if self.hidden_size % max(self.num_attention_heads, 1):
            problems.append("hidden_size is not divisible by num_attention_heads")
        if self.hidden_act not in _ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not supported")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            problems.append("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.resblock not in ("1", "2"):
            problems.append(f"resblock must be '1' or '2', not {self.resblock!r}")
        if self.flow_size % 2 or self.depth_separable_channels != 2:
            problems.append("flow_size must be even and depth_separable_channels 2")
        if self.num_speakers > 1 and self.speaker_embedding_size <= 0:
            problems.append("several speakers need speaker_embedding_size > 0")
        if problems:
            raise LoadError(f"{where}: {'; '.join(problems)}")
