"""VITS inference in plain torch, straight from ``config.json`` + ``model.safetensors``:
``NativeVits`` loads a voice folder, turns text ids into the decoder's input (``latent_frames``)
and holds the decoder that turns those into a waveform.

transformers' ``VitsModel`` is the reference (the conformance tests compare against it), but
serving through it costs: importing transformers adds about a third to the process's memory and
two seconds to every cold start, its modules hold the weights a second time next to the fast
decoder's copies, and its 1-D convolutions are not the fastest way to run VITS on a CPU. This
package computes the same thing from the same files: ``config`` reads the hyper-parameters,
``weights`` takes the tensors (weight norm folded, shapes checked), ``text_side`` holds the text
encoder, duration predictors and prior flow, ``decoder`` is HiFi-GAN (``FastHifiGan``); this module
puts them together, refuses tensors the config does not use, and runs them. Padding and masking
follow the tests' reference (``tests/reference/vits_forward.py``): text and frames are padded to
multiples of ``BUCKET`` and ``frame_bucket`` and masked exactly as VITS masks a batch, so the
output is the same for every length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import AudioTooLongError, LoadError
from .config import VitsConfig
from .decoder import FastHifiGan
from .text_side import _Coupling, _Duration, _EncoderLayer, _StochasticDuration
from .weights import Dense, FileTensors, _Weights

MAX_UNIT_SECONDS = 1800.0  # one sentence's audio, where the request sets no lower limit
BUCKET = 32  # text lengths are padded to a multiple of this (bounded shapes for oneDNN)
# Frame counts are padded to a multiple of this. The flow runs on frames, and in bf16 its products
# are oneDNN matmuls, which compile and keep kernels for each shape they meet: frames padded to 32
# left about 30 shapes over 100 varied requests, 83 MB more peak RSS than padded to 128, with no
# measurable speed difference (a soak of 100 texts of 1-60 words, bf16, Intel Xeon with AMX).
FRAME_BUCKET = 128
# ... unless the flow's products are MKL's float32 GEMM, which compiles nothing per shape: then
# frames are not padded at all. Padding to 32 had cost a short sentence's flow up to 31 frames, and
# kept a paragraph's first sentence from its early flow (engine.py: the early flow pays where three
# of its buckets fit in the sentence): the four-sentence Wyoming text's first audio took 35.6 ms
# padded to 32 and 27.7 unpadded, its total the same (in-process, fp32, Intel Xeon with AMX, 2
# threads, alternated in fresh processes). Padding to 128 before that: a 2-second reply's flow took
# 13.4 ms, 9.3 at 32; peak RSS over 100 varied requests did not change at either step.
GEMM_FRAME_BUCKET = 1
# Several sentences' frames stacked for one pass of the flow (``flow_many``) are padded, in all, to a
# multiple of this where frames are padded at all (oneDNN, which keeps kernels per row count):
# stacks padded only to 128 met up to twelve new row counts, and a 100-request soak of 1-3
# sentences peaked 14-20 MB higher in bf16 than one sentence at a time; padded to 512, 5-9 MB
# (rtf.py's memory child, Intel Xeon with AMX, 2 threads).
STACK_BUCKET = 512


def frame_bucket_for(dtype: torch.dtype, path: str) -> int:
    """What the flow pads a sentence's frames to a multiple of, for its products' ``dtype`` and
    kernel path: ``GEMM_FRAME_BUCKET`` for float32 on MKL, else ``FRAME_BUCKET``."""
    return GEMM_FRAME_BUCKET if dtype == torch.float32 and path == "mkl" else FRAME_BUCKET


def _padded(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket if bucket > 1 else length


@dataclass(frozen=True)
class Encoded:
    """One sentence's text encoding (``NativeVits.encode``): its padded rows of the encoder's
    output and their mask, ``(padded, hidden)`` and ``(padded, 1)``, and the prior's statistics
    (means, then log-variances) for its real rows, ``(length, 2 * flow_size)``."""

    hidden: torch.Tensor
    stats: torch.Tensor
    mask: torch.Tensor


class NativeVits:
    """A VITS voice loaded from a folder, inference only. Read-only after construction, so any
    number of synthesis threads may share it."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: what the prior flow's WaveNets and the decoder compute in (``torch.bfloat16``
        where the CPU has bf16 dot products); the text encoder and the durations stay float32, so
        a sentence has the same length in either."""
        folder = Path(folder)
        self.dtype = dtype
        self.config = c = VitsConfig.read(folder / "config.json")
        where = str(folder / "model.safetensors")
        with FileTensors(folder / "model.safetensors") as tensors:
            w = _Weights(tensors, where)
            h = c.hidden_size
            self.embed = w.take("text_encoder.embed_tokens.weight", (c.vocab_size, h))
            self.layers = [_EncoderLayer(w, f"text_encoder.encoder.layers.{i}", c) for i in range(c.num_hidden_layers)]
            project = w.take("text_encoder.project.weight", (2 * c.flow_size, h, 1))[:, :, 0]
            self.project = Dense(project.t(), w.take("text_encoder.project.bias", (2 * c.flow_size,)))
            speakers = (c.num_speakers, c.speaker_embedding_size)
            self.speakers = w.take("embed_speaker.weight", speakers) if c.num_speakers > 1 else None
            self.duration = (_StochasticDuration if c.use_stochastic_duration_prediction else _Duration)(
                w, "duration_predictor", c
            )
            self.flows = [_Coupling(w, f"flow.flows.{i}", c, dtype) for i in range(c.prior_encoder_num_flows)][::-1]
            self.decoder = FastHifiGan(lambda name, shape: w.take(f"decoder.{name}", shape), c, dtype=dtype)
            leftover = [n for n in w.tensors if not n.startswith("posterior_encoder.")]
            if leftover:
                unused = sorted(leftover)[0]
                raise LoadError(f"{where}: config.json does not match the weights (unused tensor {unused})")

    @property
    def frame_bucket(self) -> int:
        """What ``flow`` pads frames to a multiple of: ``GEMM_FRAME_BUCKET`` where the flow runs in
        float32 on MKL's GEMM (the kernel path ``kernels.choose`` set), else ``FRAME_BUCKET``."""
        first = self.flows[0].layers[0][0] if self.flows and self.flows[0].layers else None
        return frame_bucket_for(self.dtype, "mkl" if first is None else first.path)

    @property
    def flow_radius(self) -> int:
        """Frames on each side of a frame that the prior flow's output there depends on: each
        coupling's WaveNet reaches ``(k - 1) * d // 2`` frames per layer, and the couplings chain.
        The flow run on the first ``n`` frames alone gives the whole sentence's latents for the
        first ``n - flow_radius`` of them (what streaming's first window needs: ``engine.py``)."""
        c = self.config
        reach = sum(
            (c.wavenet_kernel_size - 1) * c.wavenet_dilation_rate**i // 2
            for i in range(c.prior_encoder_num_wavenet_layers)
        )
        return reach * len(self.flows)

    @property
    def flow_gap(self) -> int:
        """Masked rows that must follow a sentence in a stack of several (``flow_many``): the widest
        WaveNet layer's reach on each side. Masked rows are zero at every layer's input, so that
        many of them stand for the zero padding the sentence has alone."""
        c = self.config
        return max(
            (
                (c.wavenet_kernel_size - 1) * c.wavenet_dilation_rate**i // 2
                for i in range(c.prior_encoder_num_wavenet_layers)
            ),
            default=0,
        )

    def stack_rows(self, frames: int, *, bucket: int | None = None) -> int:
        """The rows a sentence of ``frames`` frames takes in ``flow_many``'s stack."""
        return _padded(frames + self.flow_gap, self.frame_bucket if bucket is None else bucket)

    def latent_frames(
        self, ids: list[int], *, bucket: int | None = None, **knobs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text ids -> decoder input ``(1, flow_size, frames)`` and the speaker embedding ``(1, E, 1)``:
        ``flow(prior(...))``, ``knobs`` as ``prior`` takes them. Noise is drawn in the same order and
        shapes as the tests' reference ``latent_frames``."""
        prior, speaker = self.prior(ids, bucket=bucket, **knobs)
        return self.flow(prior, speaker, bucket=bucket)

    def encode_rows(self, lengths: Sequence[int], *, bucket: int | None = None) -> int:
        """The rows ``encode`` gives each of sentences this long when it encodes them together."""
        reach = max((layer.reach for layer in self.layers), default=0) if len(lengths) > 1 else 0
        return _padded(max(lengths) + reach, BUCKET if bucket is None else bucket)

    def encode(self, batch: Sequence[list[int]], *, bucket: int | None = None) -> list[Encoded]:
        """The text encoder over one or more sentences' ids at once, each sentence's result as
        ``prior`` takes it. A sentence is padded to a multiple of ``bucket`` (``BUCKET``) and its
        result is that of the sentence encoded alone: several sentences are stacked in rows of
        the longest's padded length plus the feed-forward convolutions' reach, so that each ends in
        masked rows, and each attends only to itself. Encoding a request's later sentences together
        runs the layers' few hundred small operations once for all of them (``engine.py``)."""
        c = self.config
        bucket = BUCKET if bucket is None else bucket
        lengths = [len(ids) for ids in batch]
        rows = self.encode_rows(lengths, bucket=bucket)
        mask = torch.zeros(len(batch), rows, 1)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1.0
        pad = int(c.pad_token_id or 0)
        index = torch.tensor([ids + [pad] * (rows - len(ids)) for ids in batch], dtype=torch.long).reshape(-1)
        mask = mask.reshape(-1, 1)
        x = F.embedding(index, self.embed) * math.sqrt(c.hidden_size) * mask
        key_bias = None  # each sentence's keys past its end, out of its attention
        if min(lengths) < rows:
            key_bias = (1.0 - mask.reshape(len(batch), 1, rows)) * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, mask, key_bias, len(batch))
        hidden = x * mask
        stats = self.project(hidden) * mask
        out = []
        for i, length in enumerate(lengths):
            own = slice(i * rows, i * rows + _padded(length, bucket))  # the rows it has alone
            out.append(Encoded(hidden[own], stats[own.start : own.start + length], mask[own]))
        return out

    def prior(
        self,
        ids: list[int],
        *,
        noise_scale: float,
        noise_scale_duration: float,
        length_scale: float,
        speaker_id: int | None = None,
        generator: torch.Generator | None = None,
        bucket: int | None = None,
        encoded: Encoded | None = None,
        max_seconds: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text ids -> the flow's input, time-major ``(frames, flow_size)`` (text encoder, durations,
        the prior's noise), and the speaker embedding ``(1, E)``. ``bucket``: the text padding.
        ``encoded``: the ids' ``encode`` result, where it was made with other sentences'.
        Durations longer than ``max_seconds`` of audio in all (``MAX_UNIT_SECONDS`` when None) are
        ``AudioTooLongError`` before anything that long is made: a duration predictor gone wild
        asked for more memory than the box has."""
        c = self.config
        enc = self.encode([ids], bucket=bucket)[0] if encoded is None else encoded
        length, padded, hidden, mask = len(ids), enc.hidden.shape[0], enc.hidden, enc.mask
        means, log_vars = enc.stats[:, : c.flow_size], enc.stats[:, c.flow_size :]
        speaker = None
        if self.speakers is not None:
            speaker = self.speakers[speaker_id or 0][None]  # (1, E)

        if c.use_stochastic_duration_prediction:
            noise = (
                torch.randn((1, 2, length), generator=generator) * noise_scale_duration
                if noise_scale_duration
                else torch.zeros(1, 2, length)
            )
            noise = F.pad(noise[0].t(), (0, 0, 0, padded - length))
        else:
            noise = torch.zeros(padded, 2)
        log_duration = self.duration(hidden, mask, speaker, noise)
        lengths = torch.exp(log_duration[:length, 0]) * length_scale
        if not bool(torch.isfinite(lengths).all()):
            raise RuntimeError("the duration predictor gave durations that are not finite")
        limit = MAX_UNIT_SECONDS if max_seconds is None else min(max_seconds, MAX_UNIT_SECONDS)
        if float(lengths.sum()) > limit * c.sampling_rate / self.decoder.hop + length:
            raise AudioTooLongError(f"the audio of one sentence would be longer than {limit:g} s")
        frames = torch.ceil(lengths).long()
        means = torch.repeat_interleave(means, frames, dim=0)
        log_vars = torch.repeat_interleave(log_vars, frames, dim=0)
        if means.shape[0] == 0:
            means = torch.zeros(1, c.flow_size)
            log_vars = torch.zeros_like(means)
        if noise_scale:
            noise = torch.randn((1, c.flow_size, means.shape[0]), generator=generator)[0].t()
            return means + noise * torch.exp(log_vars) * noise_scale, speaker
        return means, speaker

    def flow(
        self, prior: torch.Tensor, speaker: torch.Tensor | None, *, bucket: int | None = None, head: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prior flow, reversed: ``prior(...)``'s ``(frames, flow_size)`` -> the decoder's input
        ``(1, flow_size, frames)`` and the speaker embedding ``(1, E, 1)``. Frames are padded to a
        multiple of ``bucket`` (``frame_bucket``) and masked.

        ``head``: ``prior`` is only the first frames of a longer sentence (streaming's early flow,
        ``engine.py``). Each coupling's output is then right only up to its WaveNet's reach from
        the end, so the next coupling runs on that much less, and the latents returned are the
        first ``frames - flow_radius``, the same as the whole sentence's there."""
        count = prior.shape[0]
        bucket = self.frame_bucket if bucket is None else bucket
        step = self.flow_radius // len(self.flows) if head and self.flows else 0
        if count <= step * len(self.flows):
            raise ValueError(f"a head of {count} frames is within the flow's reach of its end")
        x = prior
        for i, coupling in enumerate(self.flows):
            if i == 0 or step:  # padded and masked at the start, and again after each coupling of a head
                rows = _padded(count, bucket)
                mask = torch.zeros(rows, 1)
                mask[:count] = 1.0
                x = F.pad(x[:count], (0, 0, 0, rows - count))
            x = coupling.reverse(torch.flip(x, [1]), mask, speaker)
            count -= step
        latents = x[:count].t()[None]  # (1, flow_size, frames), a time-major view: channels-last for the decoder
        return latents, None if speaker is None else speaker[..., None]

    def stack_layout(self, frames: Sequence[int], *, bucket: int | None = None) -> list[int]:
        """The rows each of several sentences takes in ``flow_many``'s stack: ``stack_rows`` each,
        and, where frames are padded at all, the last one's extended to bring the whole to a
        multiple of ``STACK_BUCKET`` (few distinct row counts for oneDNN)."""
        bucket = self.frame_bucket if bucket is None else bucket
        rows = [self.stack_rows(n, bucket=bucket) for n in frames]
        if bucket > 1 and len(rows) > 1:
            rows[-1] += _padded(sum(rows), STACK_BUCKET) - sum(rows)
        return rows

    def flow_many(
        self, priors: Sequence[torch.Tensor], speaker: torch.Tensor | None, *, bucket: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``flow`` for several sentences of one request at once, each sentence's result that of
        ``flow`` on it alone: they are stacked, each in ``stack_rows`` rows (its frames, then at
        least ``flow_gap`` masked rows, padded to a multiple of ``bucket``; where ``bucket`` pads
        at all, the whole stack to a multiple of ``STACK_BUCKET``), so that no WaveNet layer
        reaches from one into the next. A flow's time is not all in its products: each
        call also runs the couplings' few hundred small operations (gates, masks, slices) and
        their launches whatever the rows, and one pass over several sentences pays those once
        (``bench/flows.py``: the later sentences of a paragraph took 0.53-0.77x the time one by
        one in bf16 and 0.89-0.93x in fp32, Intel Xeon with AMX, 2 threads). The latents returned
        are views into one tensor."""
        counts = [p.shape[0] for p in priors]
        rows = self.stack_layout(counts, bucket=bucket)
        mask = torch.zeros(sum(rows), 1)
        start = 0
        for n, r in zip(counts, rows, strict=True):
            mask[start : start + n] = 1.0
            start += r
        x = torch.cat([F.pad(p, (0, 0, 0, r - p.shape[0])) for p, r in zip(priors, rows, strict=True)])
        for coupling in self.flows:
            x = coupling.reverse(torch.flip(x, [1]), mask, speaker)
        column = None if speaker is None else speaker[..., None]
        out, start = [], 0
        for n, r in zip(counts, rows, strict=True):
            out.append((x[start : start + n].t()[None], column))
            start += r
        return out
