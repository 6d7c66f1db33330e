"""transformers' VITS, extended so voices trained with Piper load with ``from_pretrained``.

transformers' ``VitsModel`` only builds HiFi-GAN's ResBlock1. Piper's medium and low voices use
ResBlock2 (one dilated convolution per step instead of a dilated/plain pair). This module adds:

* ``PiperVitsConfig``: ``VitsConfig`` plus ``resblock`` ("1" or "2");
* ``PiperVitsModel``: ``VitsModel`` that builds ResBlock2 when asked, with the flow WaveNets'
  weight norm already folded (Piper's export folded it) and without the training-only parts
  (posterior encoder, duration-predictor post-flows) that a converted voice does not carry.

Both are registered with ``AutoConfig``/``AutoModel`` under ``model_type = "piper_vits"`` when this
module is imported, so a converted folder loads with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModel, VitsConfig, VitsModel
from transformers.utils import logging as hf_logging

# ttsd draws its own progress; transformers' bars would garble the CLI's one-line output.
hf_logging.disable_progress_bar()


class PiperVitsConfig(VitsConfig):
    """``VitsConfig`` with the HiFi-GAN residual block type Piper voices need."""

    model_type = "piper_vits"

    def __init__(self, resblock: str = "1", **kwargs: Any) -> None:
        if str(resblock) not in ("1", "2"):
            raise ValueError(f"resblock must be '1' or '2', not {resblock!r}")
        self.resblock = str(resblock)
        super().__init__(**kwargs)


class HifiGanResidualBlock2(nn.Module):
    """HiFi-GAN ResBlock2: for each dilation, ``x = x + conv(leaky_relu(x))``."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        dilation: tuple[int, ...] = (1, 3),
        leaky_relu_slope: float = 0.1,
    ) -> None:
        super().__init__()
        self.leaky_relu_slope = leaky_relu_slope
        self.convs = nn.ModuleList(
            nn.Conv1d(
                channels,
                channels,
                kernel_size,
                stride=1,
                dilation=d,
                padding=(kernel_size * d - d) // 2,
            )
            for d in dilation
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            residual = hidden_states
            hidden_states = nn.functional.leaky_relu(hidden_states, self.leaky_relu_slope)
            hidden_states = conv(hidden_states) + residual
        return hidden_states


class PiperVitsModel(VitsModel):
    """``VitsModel`` for Piper voices: ResBlock2 decoder when configured, inference parts only."""

    config_class = PiperVitsConfig

    def __init__(self, config: PiperVitsConfig) -> None:
        super().__init__(config)
        # Training-only parts: never used at inference and absent from Piper's ONNX export.
        del self.posterior_encoder
        sdp = self.duration_predictor
        for name in ("post_conv_pre", "post_conv_proj", "post_conv_dds", "post_flows"):
            if hasattr(sdp, name):
                delattr(sdp, name)
        # Piper's exporter folded weight norm into plain weights; store them that way.
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if config.resblock == "2":
            decoder = self.decoder
            decoder.resblocks = nn.ModuleList()
            for i in range(len(decoder.upsampler)):
                channels = config.upsample_initial_channel // (2 ** (i + 1))
                for kernel_size, dilation in zip(
                    config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True
                ):
                    decoder.resblocks.append(
                        HifiGanResidualBlock2(channels, kernel_size, tuple(dilation), config.leaky_relu_slope)
                    )


AutoConfig.register(PiperVitsConfig.model_type, PiperVitsConfig, exist_ok=True)
AutoModel.register(PiperVitsConfig, PiperVitsModel, exist_ok=True)
