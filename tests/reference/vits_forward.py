"""The tests' reference VITS inference: transformers' ``VitsModel`` run through its own submodules,
with every knob an argument.

Serving computes VITS itself (``ttsd.engines.vits``, no transformers); the conformance tests
(``tests/test_native.py``, ``tests/test_fast_decoder.py``) compare it with this. ``VitsModel.forward``
reads the noise scales from attributes of the model object; this is the same computation for one
utterance (batch of one), with ``noise_scale``, ``noise_scale_duration``, ``length_scale``,
``speaker_id`` and the noise generator passed per call. It only reads the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import VitsModel

BUCKET = 32  # text and frame lengths are padded to a multiple of this (see latent_frames)


def _padded(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket if bucket > 1 else length


def latent_frames(
    model: VitsModel,
    input_ids: torch.Tensor,
    *,
    noise_scale: float,
    noise_scale_duration: float,
    length_scale: float,
    speaker_id: int | None = None,
    generator: torch.Generator | None = None,
    bucket: int = BUCKET,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text ids ``(1, T)`` -> decoder input ``(1, flow_size, frames)`` and the speaker embedding.

    The text and the frames are padded to a multiple of ``bucket`` and masked, exactly as VITS
    pads a batch: the result is the same (noise included: it is drawn for the real length), but
    oneDNN sees a few dozen shapes instead of one per sentence length, so its per-shape kernel
    cache (memory and build time for every new shape) stays bounded. ``bucket=1`` turns padding off.
    """
    config = model.config
    length = input_ids.shape[1]
    padded = _padded(length, bucket)
    mask = torch.zeros(1, 1, padded, dtype=torch.float32)
    mask[..., :length] = 1.0
    if padded > length:
        input_ids = torch.nn.functional.pad(input_ids, (0, padded - length), value=int(config.pad_token_id or 0))
    speaker = None
    if config.num_speakers > 1:
        sid = torch.tensor([speaker_id or 0], dtype=torch.long)
        speaker = model.embed_speaker(sid).unsqueeze(-1)

    encoded = model.text_encoder(input_ids=input_ids, padding_mask=mask.transpose(1, 2),
                                 attention_mask=mask[:, 0].long() if padded > length else None, return_dict=True)
    hidden = encoded.last_hidden_state.transpose(1, 2)
    means = encoded.prior_means.transpose(1, 2)[..., :length]
    log_vars = encoded.prior_log_variances.transpose(1, 2)[..., :length]

    predictor = model.duration_predictor
    if config.use_stochastic_duration_prediction:
        log_duration = _sdp_reverse(predictor, hidden, mask, speaker, noise_scale_duration, generator, length)
    else:
        log_duration = predictor(hidden, mask, speaker)
    duration = torch.ceil(torch.exp(log_duration[..., :length]) * length_scale)  # (1, 1, T)
    frames = duration.flatten().long()
    # Expanding each text position by its duration is what VITS's monotonic path matmul does.
    means = torch.repeat_interleave(means, frames, dim=2)
    log_vars = torch.repeat_interleave(log_vars, frames, dim=2)
    if means.shape[2] == 0:
        means = torch.zeros(1, means.shape[1], 1)
        log_vars = torch.zeros_like(means)
    noise = torch.randn(means.shape, generator=generator) if noise_scale else torch.zeros_like(means)
    prior = means + noise * torch.exp(log_vars) * noise_scale
    count = prior.shape[2]
    frames_padded = _padded(count, bucket)
    out_mask = torch.zeros(1, 1, frames_padded)
    out_mask[..., :count] = 1.0
    prior = torch.nn.functional.pad(prior, (0, frames_padded - count))
    latents = model.flow(prior, out_mask, speaker, reverse=True)
    return latents[..., :count], speaker


def _sdp_reverse(
    predictor: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    speaker: torch.Tensor | None,
    noise_scale: float,
    generator: torch.Generator | None,
    length: int | None = None,
) -> torch.Tensor:
    """The stochastic duration predictor's reverse pass (transformers' code, with our RNG).
    ``length``: real positions of a padded input; noise is drawn for those only."""
    inputs = predictor.conv_pre(hidden)
    if speaker is not None:
        inputs = inputs + predictor.cond(speaker)
    inputs = predictor.conv_dds(inputs, mask)
    inputs = predictor.conv_proj(inputs) * mask
    flows = list(reversed(predictor.flows))
    flows = flows[:-2] + [flows[-1]]  # VITS never uses the first ConvFlow at inference
    real = inputs.shape[2] if length is None else length
    latents = torch.randn((1, 2, real), generator=generator) * noise_scale if noise_scale else torch.zeros(1, 2, real)
    latents = torch.nn.functional.pad(latents, (0, inputs.shape[2] - real))
    for flow in flows:
        latents = torch.flip(latents, [1])
        latents, _ = flow(latents, mask, global_conditioning=inputs, reverse=True)
    log_duration, _ = torch.split(latents, [1, 1], dim=1)
    return log_duration


def decode(model: VitsModel, latents: torch.Tensor, speaker: torch.Tensor | None) -> torch.Tensor:
    """Decoder input ``(1, flow_size, frames)`` -> waveform ``(samples,)`` in [-1, 1], by
    transformers' own decoder: the reference ``ttsd.engines.vits.decoder.FastHifiGan`` is tested against."""
    return model.decoder(latents, speaker).reshape(-1)
