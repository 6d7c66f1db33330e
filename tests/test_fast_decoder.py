"""The windowed channels-last HiFi-GAN (``ttsd.engines.vits.decoder``) against transformers' own
decoder: same output for every length, window boundary and speaker, on a fixed set of shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_vits_config
from transformers import VitsConfig, VitsModel
from vits_helpers import phoneme_ids

from ttsd.engines.vits import decoder
from ttsd.engines.vits.decoder import WIDTHS, FastHifiGan

LENGTHS = (1, 7, 31, 32, 33, 200, WIDTHS[-1], WIDTHS[-1] + 1, 700, 1500)


def tiny_model(**overrides: object) -> VitsModel:
    torch.manual_seed(3)
    # three kernels per stage, as real voices have, so the folded 1/n averaging is exercised
    config = tiny_vits_config(resblock_kernel_sizes=[3, 5, 7], resblock_dilation_sizes=[[1, 3], [1, 3], [1, 2]],
                              **overrides)
    model = VitsModel(VitsConfig(**config)).eval()
    with torch.no_grad():  # random biases too, so that zero padding is not accidentally harmless
        for module in model.decoder.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0, 0.2)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["onednn-fused", "plain-conv2d"])
def test_same_output_as_transformers_for_every_length(fused: bool) -> None:
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config, fused=fused)
    with torch.inference_mode():
        for frames in LENGTHS:
            latents = torch.randn(1, model.config.flow_size, frames)
            reference = model.decoder(latents).reshape(-1)
            assert max_diff(fast(latents), reference) < 1e-5, frames


def test_multi_speaker_conditioning() -> None:
    model = tiny_model(num_speakers=3, speaker_embedding_size=4)
    fast = FastHifiGan(model.decoder, model.config)
    with torch.inference_mode():
        for sid in range(3):
            speaker = model.embed_speaker(torch.tensor([sid])).unsqueeze(-1)
            latents = torch.randn(1, model.config.flow_size, 900)
            assert max_diff(fast(latents, speaker), model.decoder(latents, speaker).reshape(-1)) < 1e-5


def test_windows_only_work_because_of_the_receptive_field() -> None:
    """Control: with too small an overlap, the long-input comparison above would fail."""
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    fast.radius = 2
    with torch.inference_mode():
        latents = torch.randn(1, model.config.flow_size, 1500)
        assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) > 1e-3


def test_crops_only_work_because_of_the_margins() -> None:
    """Control: cropping each stage to less than the later layers need changes the output."""
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    assert all(m > 0 for m in fast.margins)
    fast.margins = [0] * len(fast.margins)
    with torch.inference_mode():
        latents = torch.randn(1, model.config.flow_size, 1500)
        assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) > 1e-3


# measured window times (ms) of two kinds: a fixed part per window that dominates (as measured in
# bf16 on 2 cores: 48, 64, 128 frames took 2.9, 3.8, 6.6 ms), and a middle width cheapest per frame
FIXED_HEAVY = {48: 2.9, 64: 3.8, 128: 6.6}
MIDDLE_CHEAPEST = {48: 6.0, 64: 8.0, 128: 40.0}


def cheapest_cover(fast: FastHifiGan, frames: int) -> float:
    """The least total ``window_cost`` of any windows that keep ``frames`` frames (exhaustive)."""
    kept = {w: w - 2 * fast.radius for w in WIDTHS if w > 2 * fast.radius}
    best = [0.0] + [float("inf")] * frames
    for n in range(1, frames + 1):
        best[n] = min(best[max(0, n - k)] + fast.window_cost(w) for w, k in kept.items())
    return best[frames]


@pytest.mark.parametrize("radius", [2, 14, 40])
@pytest.mark.parametrize("measured", [None, FIXED_HEAVY, MIDDLE_CHEAPEST], ids=["work-model", "fixed-heavy", "middle"])
def test_plans_cover_every_frame_once_within_the_widths(radius: int, measured: dict[int, float] | None) -> None:
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    fast.radius = radius
    fast.window_seconds = dict(measured or {})

    def cost(widths: list[int]) -> float:
        return sum(fast.window_cost(w) for w in widths)

    for frames in (*range(1, 700, 3), 1500, 5000):
        for first in (None, 1, 20, 10_000):
            windows = fast.plan(frames, first)
            assert windows[0][2] == 0 and windows[-1][3] == frames
            for (start, width, keep_from, keep_to), nxt in zip(windows, [*windows[1:], None], strict=True):
                assert width in WIDTHS and start == keep_from - radius
                assert 0 < keep_to - keep_from <= width - 2 * radius
                assert nxt is None or nxt[2] == keep_to
            if first is not None:
                assert windows[0][3] == min(frames, first, WIDTHS[-1] - 2 * radius)
            else:  # no costlier than widest windows and then the narrowest width that fits the rest
                greedy, rest = [], frames
                while rest > 0:
                    greedy.append(next((w for w in WIDTHS if w - 2 * radius >= rest), WIDTHS[-1]))
                    rest -= greedy[-1] - 2 * radius
                assert cost([w for _, w, _, _ in windows]) <= cost(greedy) + 1e-9
                if frames <= 700:  # and within a window's cost of the cheapest cover there is
                    cheapest = cheapest_cover(fast, frames)
                    assert cost([w for _, w, _, _ in windows]) <= cheapest + max(map(fast.window_cost, WIDTHS)) + 1e-9


def test_the_plans_follow_the_measured_window_times() -> None:
    """measure_windows times each usable width; plans then use those times: where a window's fixed
    part dominates they use fewer windows, and the audio is the reference's whatever the plan."""
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    usable = [w for w in WIDTHS if w > 2 * fast.radius]
    seconds = fast.measure_windows(repeats=1)
    assert sorted(seconds) == usable and all(t > 0 for t in seconds.values())
    assert fast.window_seconds == seconds and fast.window_cost(usable[0]) == seconds[usable[0]]

    def counts() -> list[int]:
        return [len(fast.plan(n)) for n in range(1, 600)]

    fast.window_seconds = {}
    by_work = counts()
    fast.window_seconds = dict(FIXED_HEAVY)
    by_time = counts()
    assert all(t <= w for t, w in zip(by_time, by_work, strict=True)) and sum(by_time) < sum(by_work)
    fast.window_seconds = dict(MIDDLE_CHEAPEST)  # long stretches in the middle width
    assert {w for _, w, _, _ in fast.plan(1000)[:-4]} == {64}
    with torch.inference_mode():
        for measured in (FIXED_HEAVY, MIDDLE_CHEAPEST):
            fast.window_seconds = dict(measured)
            for frames in (33, 150, 176, 700):
                latents = torch.randn(1, model.config.flow_size, frames)
                assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) < 1e-5, (measured, frames)


def test_streamed_pieces_join_to_the_whole() -> None:
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    with torch.inference_mode():
        latents = torch.randn(1, model.config.flow_size, 800)
        pieces = list(fast.stream(latents, first=20))
        assert len(pieces) >= 3 and len(pieces[0]) == 20 * fast.hop
        assert max_diff(torch.cat(pieces), model.decoder(latents).reshape(-1)) < 1e-5


@pytest.mark.slow
def test_only_a_fixed_set_of_shapes_reaches_the_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    seen: set[int] = set()
    window = fast._window

    def spy(latents: torch.Tensor, *args: object) -> torch.Tensor:
        seen.add(latents.shape[-1])
        return window(latents, *args)

    monkeypatch.setattr(fast, "_window", spy)
    with torch.inference_mode():
        for frames in range(1, 1300, 7):
            out = fast(torch.randn(1, model.config.flow_size, frames))
            assert out.shape == (frames * fast.hop,)
        for first in (5, 40):
            list(fast.stream(torch.randn(1, model.config.flow_size, 600), first=first))
    assert seen <= set(WIDTHS), seen - set(WIDTHS)


def test_falls_back_to_plain_convolutions_without_onednn_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoder.torch.backends.mkldnn, "is_available", lambda: False)
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    assert not fast.fused
    with torch.inference_mode():
        latents = torch.randn(1, model.config.flow_size, 500)
        assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) < 1e-5


@pytest.mark.slow
def test_the_piper_voice(joe_folder: Path) -> None:
    from reference.vits_forward import decode
    from transformers import AutoModel

    from ttsd.convert import piper_vits  # noqa: F401  (registers the Piper variant with AutoModel)
    from ttsd.engines.vits.model import NativeVits

    model = AutoModel.from_pretrained(str(joe_folder)).eval()
    fast = NativeVits(joe_folder).decoder  # built from the safetensors file, not from the module
    with torch.inference_mode():
        for frames in (90, 481):
            latents = torch.randn(1, model.config.flow_size, frames) * 0.8
            assert max_diff(fast(latents), decode(model, latents, None)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("noise", [0.0, 0.667])
def test_padded_text_and_frames_give_the_same_latents(noise: float, joe_folder: Path) -> None:
    """The serving path pads text to BUCKET and frames to FRAME_BUCKET and masks, as VITS pads a
    batch: same frames, same values, and the same seeded noise as without padding."""
    from ttsd.speak import open_engine

    engine = open_engine(joe_folder, precision="fp32")
    for text in ("Hi.", "Turn on the kitchen lights.", "The quick brown fox jumps over the lazy dog, twice."):
        ids = phoneme_ids(engine, text)[0]
        assert len(ids) % 32, "pick texts whose length is not already a multiple of the bucket"
        with torch.inference_mode():
            plain, padded = (engine.model.latent_frames(ids, noise_scale=noise, noise_scale_duration=0.8 * bool(noise),
                                                        length_scale=1.0, generator=torch.Generator().manual_seed(5),
                                                        bucket=bucket)[0] for bucket in (1, None))
        assert max_diff(padded, plain) < 1e-3, text


def test_padding_with_a_multi_speaker_hf_model() -> None:
    from reference.vits_forward import latent_frames

    model = tiny_model(num_speakers=2, speaker_embedding_size=4)
    ids = torch.randint(1, model.config.vocab_size, (1, 21))
    with torch.inference_mode():
        plain, padded = (latent_frames(model, ids, noise_scale=0.5, noise_scale_duration=0.5, length_scale=1.0,
                                       speaker_id=1, generator=torch.Generator().manual_seed(2), bucket=bucket)[0]
                         for bucket in (1, 32))
    assert max_diff(padded, plain) < 1e-4


def test_a_receptive_field_wider_than_the_windows_decodes_whole() -> None:
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    fast.radius = WIDTHS[-1]
    with torch.inference_mode():
        latents = torch.randn(1, model.config.flow_size, 900)
        assert fast.plan(900) == [(0, 900, 0, 900)]
        assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) < 1e-5


def test_the_flow_on_a_prefix_gives_its_first_frames_exactly(tmp_path: Path) -> None:
    """Streaming's first window runs the flow on the frames it reads plus ``flow_radius``: those
    frames must be the whole sentence's, and the radius must be the flow's real reach (dilated
    WaveNet layers, several couplings): a shorter prefix gets the frames near its end wrong."""
    from conftest import save_tiny_vits

    from ttsd.engines.vits.model import NativeVits

    folder = save_tiny_vits(tmp_path / "v", prior_encoder_num_flows=3, prior_encoder_num_wavenet_layers=3,
                            wavenet_dilation_rate=2, wavenet_kernel_size=3)
    model = NativeVits(folder)
    assert model.flow_radius == 3 * (1 + 2 + 4)
    torch.manual_seed(1)
    prior = torch.randn(500, model.config.flow_size)
    with torch.inference_mode():
        whole = model.flow(prior, None)[0]
        for cut in (60, 130, 300):
            part = model.flow(prior[:cut], None)[0]
            exact = cut - model.flow_radius
            assert max_diff(part[..., :exact], whole[..., :exact]) < 1e-5, cut
            # the reach is tight: the first frame past it feels the first frame the prefix lacks.
            # Shown with a large change to that frame: its effect there passes through three
            # couplings, and the cut alone may change it by less than a float32 step (it did on an
            # AMD EPYC with AVX2 only)
            bumped = prior.clone()
            bumped[cut] += 100.0
            moved = model.flow(bumped, None)[0]
            assert max_diff(moved[..., exact : exact + 1], whole[..., exact : exact + 1]) > 0, cut
            assert max_diff(moved[..., :exact], whole[..., :exact]) < 1e-6, cut
            # as a head (what streaming runs), each coupling drops what it got wrong at the end,
            # coarsely padded too: the same first frames and no others
            for bucket in (None, 128):
                head = model.flow(prior[:cut], None, head=True, bucket=bucket)[0]
                assert head.shape[-1] == exact and max_diff(head, whole[..., :exact]) < 1e-5, (cut, bucket)
        with pytest.raises(ValueError, match="within the flow's reach"):
            model.flow(prior[: model.flow_radius], None, head=True)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_requests_first_sentence_streams_the_same_audio_from_the_early_flow(joe_folder: Path, precision: str) -> None:
    """The first sentence's first window is decoded from a flow run on its first frames only (the
    first audio comes sooner): the audio is the same as from the whole sentence's flow, which a
    later sentence gets at once, in the cheapest windows."""
    import numpy as np

    from ttsd.engines import precision as precisions
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine

    if precision == "bf16" and precisions.native_bf16() is None:
        pytest.skip("bf16 needs a CPU with native bf16")
    engine = open_engine(joe_folder, precision=precision)
    options = SynthesisOptions(seed=4)
    unit = engine._units("The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
                         options)[0]
    calls: list[int] = []
    flow = engine.model.flow

    def counting(prior: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(prior.shape[0])
        return flow(prior, *args, **kwargs)

    engine.model.flow = counting
    early = list(engine._render_first_pieces(unit, options))
    frames = calls[-1]
    assert len(calls) == 2 and calls[0] < frames, calls  # the early flow ran, on fewer frames
    calls.clear()
    late = list(engine._render_pieces(unit, options))
    assert calls == [frames]
    decoder = engine.model.decoder
    assert len(early[0]) == decoder.first_piece * decoder.hop  # a small first piece
    assert len(late) < len(early)  # a later sentence: the cheapest windows, no small first one
    # fp32: the same frames; bf16: a product's rounding may differ by a step with its row count
    # (one bf16 step of a latent, about -37 dBFS in the audio, was seen on a 727-frame sentence)
    tolerance = 1e-5 if precision == "fp32" else 0.05
    assert float(np.abs(np.concatenate(early) - np.concatenate(late)).max()) < tolerance
    engine.warmup()  # a gain for pieces
    calls.clear()
    stacks: list[int] = []
    flow_many = engine.model.flow_many

    def stacked(priors: list[torch.Tensor], *args: object, **kwargs: object) -> object:
        stacks.append(len(priors))
        return flow_many(priors, *args, **kwargs)

    engine.model.flow_many = stacked
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away. " * 3
    list(engine.synthesize_stream(text, options, pieces=True))
    assert len(calls) == 2 and calls[0] < calls[1]  # only the request's first sentence flows early
    assert stacks == [2]  # the later two: together (engine.py's _Flows)


def test_packed_weights_give_the_same_numbers() -> None:
    """Every convolution the windows run keeps its weight in oneDNN's layout (fused path): the same
    output to the bit, for lengths other than the one it was packed for, transposed ones too; the
    plain weight comes back from it exactly."""
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    plain = FastHifiGan(model.decoder, model.config)
    convs = list(fast.convolutions())
    if not fast.fused:
        pytest.skip("torch has no fused oneDNN convolution ops here")
    assert fast.packed_convolutions == len(convs) and all(conv.packed for conv, _ in convs)
    for (conv, _), (other, _) in zip(convs, plain.convolutions(), strict=True):
        unpacked = conv.unfused()
        assert not unpacked.packed and not unpacked.fused and unpacked.weight.layout == torch.strided
        assert torch.equal(unpacked.weight, other.unfused().weight)
        other.weight, other.packed = unpacked.weight, False  # `plain` runs the fused ops on plain weights
    with torch.inference_mode():
        for frames in (7, 150, 333):
            latents = torch.randn(1, model.config.flow_size, frames)
            assert torch.equal(fast(latents), plain(latents)), frames
            assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) < 1e-5


def test_a_weight_that_does_not_pack_stays_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reorder that fails (an op this torch lacks or refuses) leaves the plain weight."""
    mkldnn = torch.ops.mkldnn

    def broken(weight: torch.Tensor, *args: object) -> torch.Tensor:
        raise RuntimeError("no such primitive")

    class Ops:  # torch.ops.mkldnn with one op replaced
        def __getattr__(self, name: str) -> object:
            return broken if name == "_reorder_convolution_weight" else getattr(mkldnn, name)

    monkeypatch.setattr(decoder.torch.ops, "mkldnn", Ops())
    model = tiny_model()
    fast = FastHifiGan(model.decoder, model.config)
    if not fast.fused:
        pytest.skip("torch has no fused oneDNN convolution ops here")
    convs = [conv for conv, _ in fast.convolutions()]
    assert [c.packed for c in convs] == [c.transposed for c in convs]  # only the transposed ones packed
    assert all(c.weight.layout == torch.strided for c in convs if not c.transposed)
    with torch.inference_mode():
        latents = torch.randn(1, model.config.flow_size, 150)
        assert max_diff(fast(latents), model.decoder(latents).reshape(-1)) < 1e-5
