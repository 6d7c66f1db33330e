"""``ttsd.engines.vits.model`` (what serves) against transformers' ``VitsModel`` (the reference):
same latents, same waveform, same length, for Hugging Face checkpoints of several shapes, every way
a checkpoint stores weight norm, and the Piper voice; bad weights are refused with the reason."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_vits
from safetensors.torch import load_file, save_file
from vits_helpers import phoneme_ids

from ttsd.errors import LoadError

VARIANTS = {
    "default": {},
    "multi-speaker": {"num_speakers": 3, "speaker_embedding_size": 4},
    "deterministic-durations": {"use_stochastic_duration_prediction": False},
    "gelu-ffn-k1-4heads": {"hidden_act": "gelu", "ffn_kernel_size": 1, "num_attention_heads": 4},
    "wide-window-2layers": {"window_size": 4, "num_hidden_layers": 2, "prior_encoder_num_wavenet_layers": 3,
                            "wavenet_dilation_rate": 2, "prior_encoder_num_flows": 2},
}


def reference(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModel

    from ttsd.convert import piper_vits  # noqa: F401  (registers the Piper variant with AutoModel)

    return AutoModel.from_pretrained(str(folder)).eval()


@functools.cache
def loaded(folder: Path):  # type: ignore[no-untyped-def]
    from ttsd.engines.vits.model import NativeVits

    return reference(folder), NativeVits(folder)


def both(folder: Path, ids: list[int], *, noise: float = 0.0, speaker: int | None = None
         ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(latents, waveform) from the reference and from the native path, same seed."""
    from reference.vits_forward import decode, latent_frames

    model, native = loaded(folder)
    knobs = dict(noise_scale=noise, noise_scale_duration=noise, length_scale=1.0, speaker_id=speaker)
    with torch.inference_mode():
        ref, ref_speaker = latent_frames(model, torch.tensor([ids]), generator=torch.Generator().manual_seed(7),
                                         bucket=1, **knobs)
        ours, our_speaker = native.latent_frames(ids, generator=torch.Generator().manual_seed(7), **knobs)
        return (ref, decode(model, ref, ref_speaker)), (ours, native.decoder(ours, our_speaker))


def assert_close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> None:
    """Same shape, and the same values to ``tolerance`` relative to the largest of ``b`` (absolute
    below 1): float32 sums taken in another order differ by a few ulps of the values summed."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a - b).abs().max()) < tolerance * max(1.0, float(b.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("noise", [0.0, 0.667], ids=["noise-off", "seeded-noise"])
def test_same_output_as_transformers(variant: str, noise: float, tmp_path: Path) -> None:
    folder = save_tiny_vits(tmp_path / variant, pack_it=False, seed=4, **VARIANTS[variant])
    speaker = 2 if "speaker" in variant else None
    for length in (1, 5, 31, 32, 33, 90):
        ids = torch.randint(1, 20, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        (ref, ref_wave), (ours, wave) = both(folder, ids, noise=noise, speaker=speaker)
        assert_close(ours, ref, 1e-4)
        assert_close(wave, ref_wave, 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["weight_g/weight_v", "plain weight"])
def test_every_way_a_checkpoint_stores_weight_norm(style: str, tmp_path: Path) -> None:
    """This transformers saves ``parametrizations.weight.original0/1``; hub MMS checkpoints have
    ``weight_g``/``weight_v``; converted Piper voices plain folded weights. All load the same."""
    from ttsd.engines.vits.model import NativeVits

    folder = save_tiny_vits(tmp_path / "tiny", pack_it=False)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.inference_mode():
        before = NativeVits(folder).latent_frames(ids, noise_scale=0, noise_scale_duration=0, length_scale=1)[0]
    tensors = load_file(str(folder / "model.safetensors"))
    assert any(".parametrizations.weight.original1" in n for n in tensors)
    renamed = {}
    for name, value in tensors.items():
        stem, found, part = name.partition(".parametrizations.weight.original")
        if not found:
            renamed[name] = value
        elif style == "plain weight":
            if part == "1":
                g = tensors[f"{stem}.parametrizations.weight.original0"]
                renamed[f"{stem}.weight"] = torch._weight_norm(value, g, 0)
        else:
            renamed[f"{stem}.weight_{'g' if part == '0' else 'v'}"] = value
    save_file(renamed, str(folder / "model.safetensors"))
    with torch.inference_mode():
        after = NativeVits(folder).latent_frames(ids, noise_scale=0, noise_scale_duration=0, length_scale=1)[0]
    assert_close(after, before, 1e-5)


@pytest.mark.slow
def test_the_piper_voice(joe_engine) -> None:  # type: ignore[no-untyped-def]
    """The built-in voice, noise off: within 1e-3 and the same length (the issue's conformance rule)."""
    for text in ("Hi.", "Turn on the kitchen lights, please.",
                 "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."):
        ids = phoneme_ids(joe_engine, text)[0]
        (ref, ref_wave), (ours, wave) = both(joe_engine.folder, ids)
        assert_close(ours, ref, 1e-3)
        assert_close(wave, ref_wave, 1e-3)


def _edit(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case, reason", [
    ("missing", "missing text_encoder.project.bias"),
    ("extra", "unused tensor decoder.extra.weight"),
    ("shape", "does not match the weights (flow.flows.0.conv_pre.weight is (16, 4, 2)"),
    ("nan", "NaN or infinite values (embed_speaker.weight)"),
    ("config", "hidden_size is not divisible by num_attention_heads"),
    ("type", "model_type 'bert' is not vits"),
    ("truncated", "weights do not load"),
    ("int", "text_encoder.project.bias is I64, not a float type"),
])
def test_bad_weights_are_refused_with_the_reason(case: str, reason: str, tmp_path: Path) -> None:
    from ttsd.engines.vits.model import NativeVits

    folder = save_tiny_vits(tmp_path / case, pack_it=False, num_speakers=2, speaker_embedding_size=4)
    if case == "missing":
        _edit(folder, lambda t: t.pop("text_encoder.project.bias"))
    elif case == "extra":
        _edit(folder, lambda t: t.update({"decoder.extra.weight": torch.zeros(2)}))
    elif case == "shape":
        _edit(folder, lambda t: t.update({"flow.flows.0.conv_pre.weight": torch.zeros(16, 4, 2)}))
    elif case == "nan":
        _edit(folder, lambda t: t["embed_speaker.weight"].fill_(float("nan")))
    elif case == "int":
        _edit(folder, lambda t: t.update({"text_encoder.project.bias": t["text_encoder.project.bias"].long()}))
    elif case in ("config", "type"):
        config = json.loads((folder / "config.json").read_text())
        config.update({"num_attention_heads": 5} if case == "config" else {"model_type": "bert"})
        (folder / "config.json").write_text(json.dumps(config))
    else:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=re.escape(reason)):
        NativeVits(folder)


def test_weights_are_read_into_memory_of_their_own_not_mapped(tmp_path: Path) -> None:
    """A voice's tensors are read one by one as they are taken, never left mapped from the file
    (a mapped file's pages stay resident until the whole mapping goes: all of it, on top of the
    converted weights, while a voice loads), and have the file's values and dtypes."""
    from safetensors.torch import load

    from ttsd.engines.vits.weights import FileTensors

    folder = save_tiny_vits(tmp_path / "tiny", pack_it=False)
    path = folder / "model.safetensors"
    expected = load(path.read_bytes())  # from bytes: this one does not map the file either
    expected["decoder.conv_pre.bias"] = expected["decoder.conv_pre.bias"].bfloat16()
    save_file(expected, str(path))
    other = tmp_path / "other.safetensors"
    save_file({name: value + 1 for name, value in expected.items()}, str(other))
    with FileTensors(path) as tensors:
        assert set(tensors) == set(expected) and "decoder.conv_pre.bias" in tensors
        os.replace(other, path)  # a new file where the old one was: the one opened is still the one read
        taken = {name: tensors.pop(name) for name in sorted(expected)}
        assert str(path) not in Path("/proc/self/maps").read_text()
        assert list(tensors) == [] and tensors.pop("decoder.conv_pre.bias", None) is None
    for name, value in expected.items():
        assert taken[name].dtype == value.dtype and torch.equal(taken[name], value), name


def test_weights_that_are_cut_linked_or_hide_a_huge_header_are_refused(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ttsd.engines.vits import weights

    folder = save_tiny_vits(tmp_path / "tiny", pack_it=False)
    path = folder / "model.safetensors"
    with weights.FileTensors(path) as tensors:
        last = max(tensors, key=lambda name: tensors._entries[name].end)
        path.write_bytes(path.read_bytes()[:-8])  # cut after safetensors checked the file
        with pytest.raises(LoadError, match=re.escape(f"{last} ends early")):
            tensors.pop(last)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(LoadError, match="weights do not load \\(a symbolic link\\)"):
        weights.FileTensors(link)
    monkeypatch.setattr(weights, "MAX_HEADER", 64)
    with pytest.raises(LoadError, match=r"weights do not load \(a \d+-byte header \(ttsd reads up to 64, within the file\)"):
        weights.FileTensors(save_tiny_vits(tmp_path / "other", pack_it=False) / "model.safetensors")


@pytest.mark.daemon
def test_serving_does_not_import_transformers(tmp_path: Path) -> None:
    """The point of the native path: a voice loads and speaks without transformers in the process."""
    folder = save_tiny_vits(tmp_path / "tiny")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ttsd.speak import open_engine\n"
        f"engine = open_engine(Path({str(folder)!r}))\n"
        "audio = engine.synthesize('hello there')\n"
        "assert audio.duration > 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_spline_inverse_is_transformers_own() -> None:
    """The duration predictor's spline, written for few operations, against transformers' inverse:
    inside the tails, outside them, and at the tails and a knot exactly. The same function in
    float64; in float32 no further from float64's result than transformers' own float32 is."""
    from transformers.models.vits.modeling_vits import _unconstrained_rational_quadratic_spline

    from ttsd.engines.vits.text_side import _spline_inverse

    generator = torch.Generator().manual_seed(5)
    rows, bins, tail = 400, 10, 5.0
    x = torch.linspace(-7, 7, rows, dtype=torch.float64)
    x[:4] = torch.tensor([-tail, tail, 0.0, -0.0])
    widths, heights = (3 * torch.randn(rows, bins, generator=generator, dtype=torch.float64) for _ in range(2))
    derivatives = 2 * torch.randn(rows, bins - 1, generator=generator, dtype=torch.float64)

    def theirs(*args: torch.Tensor) -> torch.Tensor:
        return _unconstrained_rational_quadratic_spline(*args, reverse=True, tail_bound=tail)[0]

    exact = theirs(x, widths, heights, derivatives)
    ours = _spline_inverse(x, widths, heights, derivatives, tail)
    assert float((ours - exact).abs().max()) < 1e-9
    single = [t.float() for t in (x, widths, heights, derivatives)]
    ours32, theirs32 = _spline_inverse(*single, tail).double(), theirs(*single).double()
    assert torch.isfinite(ours32).all()
    assert float((ours32 - exact).abs().max()) <= max(1e-5, float((theirs32 - exact).abs().max()))
    outside = x.abs() > tail
    assert bool(outside.any()) and torch.equal(ours[outside], x[outside])
    assert float((ours[~outside] - x[~outside]).abs().max()) > 0.1  # control: inside, it transforms


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sentences_encoded_together_are_each_encoded_as_alone(variant: str, tmp_path: Path) -> None:
    """A request's later sentences are text-encoded together (``engine.py``): each one's encoding,
    and the prior made from it, is the one it has alone, whatever the lengths (one of a single id,
    and the longest, which sets everyone's rows, a multiple of the padding: it would end in no
    masked row of its own). A sentence that
    attended to its neighbours, or whose feed-forward convolutions read their rows, would not be."""
    from ttsd.engines.vits.model import NativeVits

    native = NativeVits(save_tiny_vits(tmp_path / variant, pack_it=False, seed=4, **VARIANTS[variant]))
    generator = torch.Generator().manual_seed(3)
    batch = [torch.randint(1, 20, (n,), generator=generator).tolist() for n in (32, 1, 33, 96, 64, 5)]
    knobs = dict(noise_scale=0.667, noise_scale_duration=0.8, length_scale=1.0,
                 speaker_id=2 if "speaker" in variant else None)
    with torch.inference_mode():
        together = native.encode(batch)
        assert len(together) == len(batch)
        for ids, encoded in zip(batch, together, strict=True):
            alone = native.encode([ids])[0]
            assert_close(encoded.hidden, alone.hidden, 1e-6)
            assert_close(encoded.stats, alone.stats, 1e-6)
            assert torch.equal(encoded.mask, alone.mask)
            mine = native.prior(ids, generator=torch.Generator().manual_seed(5), encoded=encoded, **knobs)[0]
            assert_close(mine, native.prior(ids, generator=torch.Generator().manual_seed(5), **knobs)[0], 1e-5)


def test_a_request_encodes_its_first_sentence_alone_and_the_rest_together(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The first sentence's encoding waits for no other (first audio); the later ones are encoded
    in groups that fit ``ENCODE_ROWS``, each once, in order; and the request sounds as each sentence
    does alone."""
    import numpy as np
    from conftest import plausible

    from ttsd.engines.vits import engine as vits_engine
    from ttsd.engines.vits.model import NativeVits
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine

    e = open_engine(save_tiny_vits(tmp_path / "tiny-1", edit=plausible, noise_scale_duration=0.0))
    groups: list[list[int]] = []
    encode = NativeVits.encode

    def recorded(self: NativeVits, batch: list[list[int]], **kw: object) -> object:
        groups.append([len(ids) for ids in batch])
        return encode(self, batch, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeVits, "encode", recorded)
    sentences = ["Hello there.", "How are you today?", "Fine, thanks.", "A " + "long " * 40 + "one.", "Bye."]
    quiet = SynthesisOptions(noise_scale=0.0, noise_scale_duration=0.0, normalize=False, sentence_pause=0.0)
    units = e._units(" ".join(sentences), quiet)
    n = [len(u.ids) for u in units]
    rows, limit = e.model.encode_rows, vits_engine.ENCODE_ROWS
    # the premises: the second and third fit together, not with the long fourth; the fourth and fifth do not fit
    assert len(units) == 5 and 2 * rows(n[1:3]) <= limit < 3 * rows(n[1:4]) and 2 * rows(n[3:5]) > limit
    together = np.concatenate([e._render(u, quiet) for u in units])
    assert groups == [n[0:1], n[1:3], n[3:4], n[4:5]]
    groups.clear()
    alone = np.concatenate([e._render(vits_engine.Unit(u.ids), quiet) for u in units])
    assert groups == [[k] for k in n]
    assert together.shape == alone.shape and float(np.abs(together - alone).max()) < 1e-5


@pytest.mark.parametrize("variant", ["default", "multi-speaker", "wide-window-2layers"])
@pytest.mark.parametrize("bucket", [1, 128], ids=["unpadded", "padded-128"])
def test_sentences_flowed_together_are_each_flowed_as_alone(variant: str, bucket: int, tmp_path: Path) -> None:
    """A request's later sentences run the prior flow stacked (``flow_many``): each one's latents are
    the ones ``flow`` gives it alone, whatever the lengths (a single frame; one that fills its rows
    but for the gap; dilated WaveNets, whose reach is widest; a speaker's condition). A sentence
    whose WaveNet read its neighbour's rows would not be (one that ends on a multiple of the padding
    has no masked row of its own)."""
    from ttsd.engines.vits.model import STACK_BUCKET, NativeVits

    native = NativeVits(save_tiny_vits(tmp_path / variant, pack_it=False, seed=6, **VARIANTS[variant]))
    gap = native.flow_gap
    assert gap == (5 - 1) * (2 ** 2 if "dilation" in str(VARIANTS[variant]) else 1) // 2  # the widest layer's reach
    generator = torch.Generator().manual_seed(2)
    counts = [37, 1, 128 - gap, 256, 129, 3 * gap, 64]
    priors = [torch.randn(n, native.config.flow_size, generator=generator) for n in counts]
    speaker = torch.randn(1, 4, generator=generator) if "speaker" in variant else None
    passes: list[int] = []
    for coupling in native.flows:  # the rows each coupling's pass runs on
        reverse = coupling.reverse
        coupling.reverse = lambda x, *a, reverse=reverse: passes.append(x.shape[0]) or reverse(x, *a)
    with torch.inference_mode():
        together = native.flow_many(priors, speaker, bucket=bucket)
        stack = passes[0]
        assert passes == [stack] * len(native.flows)
        assert stack % (STACK_BUCKET if bucket > 1 else 1) == 0  # few distinct row counts where oneDNN runs them
        assert len(together) == len(priors)
        for prior, (latents, column) in zip(priors, together, strict=True):
            alone, alone_column = native.flow(prior, speaker, bucket=bucket)
            assert_close(latents, alone, 1e-6)
            assert latents.stride() == alone.stride()  # time-major, as the decoder reads it
            assert (column is None) == (alone_column is None)
            if column is not None:
                assert torch.equal(column, alone_column)
    rows = sum(native.stack_rows(n, bucket=bucket) for n in counts)
    assert rows % bucket == 0 and rows >= sum(counts) + gap * len(counts)
    assert stack == sum(native.stack_layout(counts, bucket=bucket))
    assert stack == (rows if bucket == 1 else -(-rows // STACK_BUCKET) * STACK_BUCKET)


def test_a_request_runs_its_later_flows_together_within_flow_rows(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first sentence's flow waits for no other (first audio); the later ones run in groups
    that fit ``FLOW_ROWS``, each once, in order, whole or streamed by pieces; a unit whose noise
    was drawn for a group it did not fit keeps that noise; and the request sounds, to the bit
    in fp32, as each sentence does alone."""
    import numpy as np
    from conftest import plausible

    from ttsd.engines.vits import engine as vits_engine
    from ttsd.engines.vits.model import NativeVits
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine

    e = open_engine(save_tiny_vits(tmp_path / "tiny-1", edit=plausible))
    e.warmup()  # sets the gain that streaming by pieces uses
    flows: list[list[int]] = []
    priors: list[int] = []
    flow_many, prior = NativeVits.flow_many, vits_engine.VitsEngine._prior

    def recorded(self: NativeVits, batch: list[torch.Tensor], *a: object, **kw: object) -> object:
        flows.append([p.shape[0] for p in batch])
        return flow_many(self, batch, *a, **kw)  # type: ignore[arg-type]

    def counted(self: vits_engine.VitsEngine, unit: vits_engine.Unit, options: SynthesisOptions) -> object:
        priors.append(unit.index)
        return prior(self, unit, options)

    monkeypatch.setattr(NativeVits, "flow_many", recorded)
    monkeypatch.setattr(vits_engine.VitsEngine, "_prior", counted)
    sentences = ["Hello there.", "How are you today?", "Fine, thanks.", "A " + "long " * 12 + "one.", "Bye now.",
                 "See you."]
    seeded = SynthesisOptions(seed=11, normalize=False, sentence_pause=0.0)
    units = e._units(" ".join(sentences), seeded)
    frames = [e._latents(vits_engine.Unit(u.ids), seeded)[0].shape[-1] for u in units]
    need = [e.model.stack_rows(n) for n in frames]
    # room for the second and third together, not with the long fourth, nor the fifth with the fourth
    limit = need[1] + need[2]
    assert need[1] + need[2] + need[3] > limit and need[3] + need[4] > limit and need[4] + need[5] <= limit
    monkeypatch.setattr(vits_engine, "FLOW_ROWS", limit)
    alone = [e._render(vits_engine.Unit(u.ids), seeded) for u in units]
    for by_pieces in (False, True):
        flows.clear()
        priors.clear()
        got = np.concatenate([a.samples for a in e.synthesize_stream(" ".join(sentences), seeded, pieces=by_pieces)])
        assert flows == [frames[1:3], frames[3:4], frames[4:6]]
        assert sorted(priors) == list(range(len(units)))  # each unit's noise drawn once
        assert got.shape == np.concatenate(alone).shape
        assert float(np.abs(got - np.concatenate(alone)).max()) < 1e-6


def test_a_request_leaves_no_reference_cycle(tmp_path: Path) -> None:
    """A request's state (its units' encodings, the later units' latents made ahead) is freed by
    reference counting when the request ends, whole or cut off after its first piece: the daemon
    relies on no cycles (``VitsEngine.unload``, ``ttsd.malloc``), and a cycle kept the latents until
    Python's cycle collector ran."""
    import gc
    import weakref

    from conftest import plausible

    from ttsd.engines.vits import engine as vits_engine
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine

    e = open_engine(save_tiny_vits(tmp_path / "tiny-1", edit=plausible))
    e.warmup()
    text = "Hello there. How are you today? Fine, thanks. Bye now."
    options = SynthesisOptions(seed=1)
    states: list[weakref.ref[object]] = []
    units = vits_engine.VitsEngine._units

    def watched(self: vits_engine.VitsEngine, *args: object) -> object:
        made = units(self, *args)  # type: ignore[arg-type]
        states.extend([weakref.ref(made[0].flows), weakref.ref(made[0].encodings)])
        return made

    gc.collect()
    gc.disable()
    try:
        vits_engine.VitsEngine._units = watched  # type: ignore[method-assign]
        e.synthesize(text, options)
        stream = e.synthesize_stream(text, options, pieces=True)
        next(stream)
        stream.close()
        del stream
        assert len(states) == 4 and all(state() is None for state in states)
    finally:
        vits_engine.VitsEngine._units = units  # type: ignore[method-assign]
        gc.enable()


def _raw_safetensors(path: Path, header: dict, data: bytes = b"", size: int | None = None) -> Path:  # type: ignore[type-arg]
    """A safetensors file written by hand (to say what safetensors' own writer would not)."""
    encoded = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded + data)
        if size is not None:
            handle.truncate(8 + len(encoded) + size)  # sparse: no disk used
    return path


def test_weights_are_checked_before_they_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor's shape is checked against the config before any of it is read or allocated; an
    entry that no longer fits its shape or the file (rewritten after safetensors checked it) is
    refused; a FIFO in the file's place neither blocks nor loads."""
    import safetensors

    from ttsd.engines.vits import weights

    big = _raw_safetensors(tmp_path / "big.safetensors",
                           {"x.bias": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}},
                           size=1 << 30)
    Path("/proc/self/clear_refs").write_text("5")
    before = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmRSS:")))
    with weights.FileTensors(big) as tensors, pytest.raises(LoadError, match=re.escape("x.bias is (268435456,)")):
        weights._Weights(tensors, "big").take("x.bias", (16,))
    peak = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:")))
    assert peak - before < 256 << 10, "the 1 GiB tensor was read before its shape was checked"

    norm = {"x.weight_v": torch.ones(4, 3, 5), "x.weight_g": torch.ones(3, 1, 1)}
    save_file(norm, str(tmp_path / "norm.safetensors"))
    with weights.FileTensors(tmp_path / "norm.safetensors") as tensors, \
            pytest.raises(LoadError, match=re.escape("x.weight_g is (3, 1, 1), the config says 4 values")):
        weights._Weights(tensors, "norm").take("x.weight", (4, 3, 5))

    class Unchecked:  # safetensors' check passed on a file rewritten before ttsd read its header again
        def __init__(self, path: str, framework: str) -> None:
            self.names = json.loads(Path(path).read_bytes()[8:].split(b"\0")[0].strip() or b"{}").keys()

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def keys(self):  # type: ignore[no-untyped-def]
            return self.names

    monkeypatch.setattr(safetensors, "safe_open", Unchecked)
    for entry, reason in (({"dtype": "F32", "shape": [0, 1 << 63], "data_offsets": [0, 0]}, "no usable shape"),
                          ({"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}, "no usable shape"),
                          ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}, "do not fit"),
                          ({"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}, "do not fit"),
                          ({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}, "do not fit"),
                          ([1, 2], "no header entry")):
        path = _raw_safetensors(tmp_path / "rewritten.safetensors", {"x.bias": entry}, bytes(16))
        with pytest.raises(LoadError, match=reason):
            weights.FileTensors(path)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(LoadError, match="not a regular file"):
        weights.FileTensors(fifo)
