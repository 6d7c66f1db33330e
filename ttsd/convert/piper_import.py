"""Convert a Piper voice (``VOICE.onnx`` + ``VOICE.onnx.json``) into a transformers model folder.

Piper exports VITS to ONNX with most parameters under their original VITS names (``enc_p.*``,
``dp.*``, ``flow.*``, ``dec.*``). Parameters the exporter renamed are named here from the graph
node that consumes them, never from their position:

* the flow WaveNet weights are anonymous (``onnx::Conv_NNNN``, weight norm already folded), and the
  flows were traced in reverse order, so position would map them to the wrong flow;
* the text embedding appears as whatever name the exporter gave the ``Gather`` input (``sid``);
* the duration predictor's first ElementwiseAffine is folded into a constant ``exp(-logs)``.

The architecture (layer counts, kernel sizes, dilations, upsample rates, ResBlock type) is read from
the initializers' shapes and the Conv/ConvTranspose nodes' attributes, so any Piper VITS voice
(x_low, low, medium, high; one or many speakers) converts, not only the built-in one.

Importing this module is cheap: torch and transformers (``piper_vits``) are imported when
``convert_piper`` runs, and ``onnx``, which nothing else needs, when the graph is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engines.vits.phonemes import PHONEMES_FILE
from ..errors import ImportPiperError
from ..fetch.index import MAX_SPEAKERS  # a voice may have what a catalog may list


@dataclass(frozen=True)
class _Graph:
    """The parts of a Piper ONNX graph the conversion needs, with every tensor given its VITS name."""

    tensors: dict[str, np.ndarray]
    conv_attrs: dict[str, dict[str, Any]]  # VITS module path -> Conv/ConvTranspose attributes


def _scope_to_path(node_name: str) -> str:
    """``/flow/flows.6/enc/in_layers.0/Conv`` -> ``flow.flows.6.enc.in_layers.0``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def _read_graph(onnx_path: Path) -> _Graph:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a declared dependency
        raise ImportPiperError("importing Piper voices needs the 'onnx' package") from exc
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ImportPiperError(f"{onnx_path}: not a readable ONNX model ({exc})") from exc
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    tensors: dict[str, np.ndarray] = {}
    conv_attrs: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        path = _scope_to_path(node.name)
        if node.op_type in ("Conv", "ConvTranspose") and path:
            conv_attrs[path] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for index, name in enumerate(node.input):
            if name not in inits:
                continue
            array = numpy_helper.to_array(inits[name])
            if re.fullmatch(r"(enc_p|dp|flow|dec|emb_g)\..+", name):
                tensors[name] = array
            elif node.op_type in ("Conv", "ConvTranspose") and path and index in (1, 2):
                tensors[f"{path}.{'weight' if index == 1 else 'bias'}"] = array
            elif node.op_type == "Gather" and path and index == 0:
                tensors[f"{path}.weight"] = array
            elif name == "/dp/flows.0/Exp_output_0":
                # Reverse ElementwiseAffine multiplies by exp(-logs); undo the folding.
                tensors["dp.flows.0.logs"] = -np.log(array)
    return _Graph(tensors=tensors, conv_attrs=conv_attrs)


def _count(tensors: dict[str, np.ndarray], pattern: str) -> int:
    found = {m.group(1) for k in tensors if (m := re.fullmatch(pattern, k))}
    return len(found)


def _build_config(graph: _Graph, voice: dict[str, Any]) -> dict[str, Any]:
    t, attrs = graph.tensors, graph.conv_attrs
    emb = t["enc_p.emb.weight"]
    vocab_size, hidden = emb.shape
    rel_k = t["enc_p.encoder.attn_layers.0.emb_rel_k"]
    head_dim = rel_k.shape[-1]
    ffn = t["enc_p.encoder.ffn_layers.0.conv_1.weight"]
    in_layer = t["flow.flows.0.enc.in_layers.0.weight"]
    n_wavenet = _count(t, r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.weight")
    dilation_rate = attrs["flow.flows.0.enc.in_layers.1"]["dilations"][0] if n_wavenet > 1 else 1
    n_kernels = _count(t, r"dec\.resblocks\.(\d+)\.convs1?\.0\.weight")
    n_ups = _count(t, r"dec\.ups\.(\d+)\.weight")
    resblock = "2" if "dec.resblocks.0.convs.0.weight" in t else "1"
    conv_list = "convs" if resblock == "2" else "convs1"
    kernel_sizes, dilations = [], []
    for k in range(n_kernels // n_ups):
        n_convs = _count(t, rf"dec\.resblocks\.{k}\.{conv_list}\.(\d+)\.weight")
        kernel_sizes.append(int(t[f"dec.resblocks.{k}.{conv_list}.0.weight"].shape[-1]))
        dilations.append([int(attrs[f"dec.resblocks.{k}.{conv_list}.{j}"]["dilations"][0]) for j in range(n_convs)])
    ups = [attrs[f"dec.ups.{i}"] for i in range(n_ups)]
    proj = t.get("dp.flows.7.proj.weight", None)
    conv_flows = _count(t, r"dp\.flows\.(\d+)\.pre\.weight")
    inference = voice.get("inference", {})
    num_speakers = int(voice.get("num_speakers", 1))
    return {
        "resblock": resblock,
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "num_hidden_layers": _count(t, r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight"),
        "num_attention_heads": int(hidden // head_dim),
        "window_size": int((rel_k.shape[1] - 1) // 2),
        "ffn_dim": int(ffn.shape[0]),
        "ffn_kernel_size": int(ffn.shape[-1]),
        "flow_size": int(t["enc_p.proj.weight"].shape[0] // 2),
        "hidden_act": "relu",
        "layerdrop": 0.0,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "use_stochastic_duration_prediction": "dp.flows.0.m" in t,
        "duration_predictor_kernel_size": int(t["dp.convs.convs_sep.0.weight"].shape[-1]),
        "depth_separable_num_layers": _count(t, r"dp\.convs\.convs_sep\.(\d+)\.weight"),
        "depth_separable_channels": int(t["dp.flows.0.m"].shape[0]),
        "duration_predictor_num_flows": conv_flows + 1,  # the first ConvFlow is never used, so not exported
        "duration_predictor_flow_bins": int((proj.shape[0] + 1) // 3) if proj is not None else 10,
        "duration_predictor_filter_channels": int(t["dp.pre.weight"].shape[0]),
        "duration_predictor_dropout": 0.0,
        "prior_encoder_num_flows": _count(t, r"flow\.flows\.(\d+)\.pre\.weight"),
        "prior_encoder_num_wavenet_layers": n_wavenet,
        "wavenet_kernel_size": int(in_layer.shape[-1]),
        "wavenet_dilation_rate": int(dilation_rate),
        "upsample_initial_channel": int(t["dec.conv_pre.weight"].shape[0]),
        "upsample_rates": [int(a["strides"][0]) for a in ups],
        "upsample_kernel_sizes": [int(a["kernel_shape"][0]) for a in ups],
        "resblock_kernel_sizes": kernel_sizes,
        "resblock_dilation_sizes": dilations,
        "num_speakers": num_speakers,
        "speaker_embedding_size": int(t["emb_g.weight"].shape[1]) if num_speakers > 1 else 0,
        "sampling_rate": int(voice["audio"]["sample_rate"]),
        "noise_scale": float(inference.get("noise_scale", 0.667)),
        "noise_scale_duration": float(inference.get("noise_w", 0.8)),
        "speaking_rate": 1.0 / float(inference.get("length_scale", 1.0)),
        "pad_token_id": 0,
    }


class _Unfit(ValueError):
    """The ``.onnx.json`` says something no voice of this ``.onnx`` can be."""


_ESPEAK_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,39}(/[A-Za-z0-9][A-Za-z0-9_+-]{0,39})?")


def _number(value: object, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _Unfit(f"{what} must be a number from {low:g} to {high:g}, not {str(value)[:40]!r}")
    return float(value)


def _check_voice(voice: object, graph: _Graph) -> None:
    """What the ``.onnx.json`` says, checked before anything is built from it: each field the
    conversion and the engine read is of its type and within bounds, and fits the ``.onnx`` (a
    catalog's or a stranger's file said ``num_speakers: 400000``, which sized the speaker table
    before any check: 1.4 GB; a ``length_scale`` of 0, phoneme ids past the vocabulary, a sample
    rate of 10^12 and an espeak voice of ``../../etc/passwd`` made folders that never spoke)."""
    if not isinstance(voice, dict):
        raise _Unfit("not a JSON object")
    audio = voice.get("audio")
    if not isinstance(audio, dict):
        raise _Unfit("'audio' must be an object with 'sample_rate'")
    _number(audio.get("sample_rate"), 8000, 96000, "audio.sample_rate")
    if not isinstance(audio.get("sample_rate"), int):
        raise _Unfit("audio.sample_rate must be a whole number")
    inference = voice.get("inference", {})
    if not isinstance(inference, dict):
        raise _Unfit("'inference' must be an object")
    _number(inference.get("noise_scale", 0.667), 0, 10, "inference.noise_scale")
    _number(inference.get("noise_w", 0.8), 0, 10, "inference.noise_w")
    _number(inference.get("length_scale", 1.0), 0.05, 20, "inference.length_scale")
    speakers = voice.get("num_speakers", 1)
    _number(speakers, 1, MAX_SPEAKERS, "num_speakers")
    if not isinstance(speakers, int):
        raise _Unfit("num_speakers must be a whole number")
    table = graph.tensors.get("emb_g.weight")
    rows = int(table.shape[0]) if table is not None and table.ndim == 2 else 1
    if speakers > 1 and rows != speakers:
        raise _Unfit(f"num_speakers is {speakers}, the .onnx has {rows if table is not None else 'no'} speakers")
    ids = voice.get("speaker_id_map", {})
    if (
        not isinstance(ids, dict)
        or len(ids) > MAX_SPEAKERS
        or any(
            not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < speakers
            for k, v in ids.items()
        )
    ):
        raise _Unfit(f"speaker_id_map must map names to speaker numbers from 0 to {speakers - 1}")
    emb = graph.tensors.get("enc_p.emb.weight")
    vocab = int(emb.shape[0]) if emb is not None and emb.ndim == 2 else 0
    phonemes = voice.get("phoneme_id_map")
    if (
        not isinstance(phonemes, dict)
        or not phonemes
        or any(
            not isinstance(k, str)
            or not isinstance(v, list)
            or not v
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in v)
            for k, v in phonemes.items()
        )
    ):
        raise _Unfit(f"phoneme_id_map must map phonemes to lists of ids from 0 to {vocab - 1} (the .onnx's)")
    espeak = voice.get("espeak", {})
    name = espeak.get("voice", "en-us") if isinstance(espeak, dict) else None
    if not isinstance(name, str) or not _ESPEAK_VOICE.fullmatch(name):
        raise _Unfit(f"espeak.voice must be an espeak-ng voice name such as en-us, not {str(name)[:40]!r}")
    for key in ("language", "dataset"):
        if key in voice and not isinstance(voice[key], (dict, str, type(None))):
            raise _Unfit(f"'{key}' must be an object or a string")


# (VITS name pattern, transformers name template, tensor transform)
_Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _squeeze(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 else a


_RULES: list[_Rule] = [
    (r"enc_p\.emb\.weight", "text_encoder.embed_tokens.weight", _same),
    (
        r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_([qkv])\.(weight|bias)",
        "text_encoder.encoder.layers.{0}.attention.{1}_proj.{2}",
        _squeeze,
    ),
    (
        r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_o\.(weight|bias)",
        "text_encoder.encoder.layers.{0}.attention.out_proj.{1}",
        _squeeze,
    ),
    (r"enc_p\.encoder\.attn_layers\.(\d+)\.(emb_rel_[kv])", "text_encoder.encoder.layers.{0}.attention.{1}", _same),
    (r"enc_p\.encoder\.norm_layers_1\.(\d+)\.gamma", "text_encoder.encoder.layers.{0}.layer_norm.weight", _same),
    (r"enc_p\.encoder\.norm_layers_1\.(\d+)\.beta", "text_encoder.encoder.layers.{0}.layer_norm.bias", _same),
    (r"enc_p\.encoder\.norm_layers_2\.(\d+)\.gamma", "text_encoder.encoder.layers.{0}.final_layer_norm.weight", _same),
    (r"enc_p\.encoder\.norm_layers_2\.(\d+)\.beta", "text_encoder.encoder.layers.{0}.final_layer_norm.bias", _same),
    (
        r"enc_p\.encoder\.ffn_layers\.(\d+)\.(conv_[12])\.(weight|bias)",
        "text_encoder.encoder.layers.{0}.feed_forward.{1}.{2}",
        _same,
    ),
    (r"enc_p\.proj\.(weight|bias)", "text_encoder.project.{0}", _same),
    (r"emb_g\.weight", "embed_speaker.weight", _same),
    (r"dp\.pre\.(weight|bias)", "duration_predictor.conv_pre.{0}", _same),
    (r"dp\.proj\.(weight|bias)", "duration_predictor.conv_proj.{0}", _same),
    (r"dp\.cond\.(weight|bias)", "duration_predictor.cond.{0}", _same),
    (r"dp\.flows\.0\.m", "duration_predictor.flows.0.translate", _same),
    (r"dp\.flows\.0\.logs", "duration_predictor.flows.0.log_scale", _same),
    # The DDSConv blocks of the predictor itself and of each ConvFlow.
    (r"dp\.(?:flows\.(\d+)\.)?convs\.convs_sep\.(\d+)\.(weight|bias)", "{dp}conv_dds.convs_dilated.{1}.{2}", _same),
    (r"dp\.(?:flows\.(\d+)\.)?convs\.convs_1x1\.(\d+)\.(weight|bias)", "{dp}conv_dds.convs_pointwise.{1}.{2}", _same),
    (r"dp\.(?:flows\.(\d+)\.)?convs\.norms_([12])\.(\d+)\.gamma", "{dp}conv_dds.norms_{1}.{2}.weight", _same),
    (r"dp\.(?:flows\.(\d+)\.)?convs\.norms_([12])\.(\d+)\.beta", "{dp}conv_dds.norms_{1}.{2}.bias", _same),
    (r"dp\.flows\.(\d+)\.pre\.(weight|bias)", "{dp}conv_pre.{1}", _same),
    (r"dp\.flows\.(\d+)\.proj\.(weight|bias)", "{dp}conv_proj.{1}", _same),
    # Residual coupling flows: VITS interleaves Flip modules, so flows.0, .2, .4 ... are layers.
    (r"flow\.flows\.(\d+)\.pre\.(weight|bias)", "{flow}conv_pre.{1}", _same),
    (r"flow\.flows\.(\d+)\.post\.(weight|bias)", "{flow}conv_post.{1}", _same),
    (r"flow\.flows\.(\d+)\.enc\.(in_layers|res_skip_layers)\.(\d+)\.(weight|bias)", "{flow}wavenet.{1}.{2}.{3}", _same),
    (r"flow\.flows\.(\d+)\.enc\.cond_layer\.(weight|bias)", "{flow}wavenet.cond_layer.{1}", _same),
    (r"dec\.conv_pre\.(weight|bias)", "decoder.conv_pre.{0}", _same),
    (r"dec\.conv_post\.(weight|bias)", "decoder.conv_post.{0}", _same),
    (r"dec\.cond\.(weight|bias)", "decoder.cond.{0}", _same),
    (r"dec\.ups\.(\d+)\.(weight|bias)", "decoder.upsampler.{0}.{1}", _same),
    (r"dec\.resblocks\.(\d+)\.(convs1?|convs2)\.(\d+)\.(weight|bias)", "decoder.resblocks.{0}.{1}.{2}.{3}", _same),
]


def _hf_name(vits_name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    for pattern, template, transform in _RULES:
        match = re.fullmatch(pattern, vits_name)
        if not match:
            continue
        groups = match.groups()
        dp = "duration_predictor."
        if vits_name.startswith("dp.flows.") and groups and groups[0] is not None:
            # VITS flows: 0 = ElementwiseAffine, then ConvFlow/Flip pairs (1, 3, 5, 7).
            dp = f"duration_predictor.flows.{(int(groups[0]) + 1) // 2}."
        flow = f"flow.flows.{int(groups[0]) // 2}." if vits_name.startswith("flow.") and groups else ""
        return template.format(*groups, dp=dp, flow=flow), transform
    return None


def convert_piper(onnx_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and ``phonemes.json`` for a Piper voice into
    ``out_dir`` (which must exist and be empty). Returns the Piper voice config (the ``.onnx.json``).

    Raises ``ImportPiperError`` when the voice cannot be read or does not map completely onto the
    model (a parameter left over or missing is a conversion bug, never silently ignored).
    """
    import torch

    from .piper_vits import PiperVitsConfig, PiperVitsModel

    json_path = Path(f"{onnx_path}.json")
    if not onnx_path.is_file():
        raise ImportPiperError(f"{onnx_path}: {'not a regular file' if onnx_path.exists() else 'no such file'}")
    if not json_path.is_file():
        raise ImportPiperError(f"{json_path}: missing (a Piper voice is VOICE.onnx plus VOICE.onnx.json)")
    try:
        voice = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ImportPiperError(f"{json_path}: not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(voice, dict):
        raise ImportPiperError(f"{json_path}: not a JSON object")
    phoneme_type = voice.get("phoneme_type", "espeak")
    if phoneme_type != "espeak":
        raise ImportPiperError(f"{json_path}: phoneme_type {phoneme_type!r} is not supported (only espeak voices)")
    try:
        graph = _read_graph(onnx_path)
        _check_voice(voice, graph)
        config = PiperVitsConfig(**_build_config(graph, voice))
    except _Unfit as exc:
        raise ImportPiperError(f"{json_path}: {exc}") from None
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise ImportPiperError(f"{onnx_path}: not a Piper VITS voice ({exc!r} missing or malformed)") from exc

    model = PiperVitsModel(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for vits_name, array in graph.tensors.items():
        mapped = _hf_name(vits_name)
        if mapped is None:
            raise ImportPiperError(f"{onnx_path}: parameter {vits_name} has no place in the model")
        hf_name, transform = mapped
        value = torch.from_numpy(np.ascontiguousarray(transform(array)).astype(np.float32))
        if hf_name not in expected or tuple(expected[hf_name].shape) != tuple(value.shape):
            want = tuple(expected[hf_name].shape) if hf_name in expected else "nothing"
            raise ImportPiperError(f"{onnx_path}: {vits_name} {tuple(value.shape)} does not fit {hf_name} ({want})")
        state[hf_name] = value
    # The first ConvFlow of the stochastic duration predictor is dropped at inference (VITS's
    # "useless vflow"), so Piper never exported it: store zeros, not random numbers.
    for name, tensor in expected.items():
        if name not in state and name.startswith("duration_predictor.flows.1."):
            state[name] = torch.zeros_like(tensor)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ImportPiperError(f"{onnx_path}: the voice lacks {len(missing)} parameters, e.g. {missing[0]}")
    model.load_state_dict(state, strict=True)
    try:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    except Exception as exc:  # safetensors' writer reports a full disk as its own error, not an OSError
        if type(exc).__name__ != "SafetensorError":
            raise
        code = re.search(r"(?:os error|code:) (\d+)", str(exc))  # "No space left on device (os error 28)"
        if code is None:  # not the disk's: a bug, shown as one
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(out_dir / "model.safetensors")) from exc

    phonemes = {
        "phoneme_type": phoneme_type,
        "espeak_voice": voice.get("espeak", {}).get("voice", "en-us"),
        "phoneme_id_map": voice["phoneme_id_map"],
        "speaker_id_map": voice.get("speaker_id_map", {}),
        "num_speakers": int(voice.get("num_speakers", 1)),
        "inference": voice.get("inference", {}),
        "language": voice.get("language", {}),
        "dataset": voice.get("dataset"),
    }
    (out_dir / PHONEMES_FILE).write_text(json.dumps(phonemes, ensure_ascii=False, indent=1), encoding="utf-8")
    return voice
