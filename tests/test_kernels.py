"""Kernel paths chosen per box (``ttsd.engines.vits.kernels``): each path forced in turn speaks the
same (fp32 to 1e-4, bf16 by the quality gate), a path that is not exact or fails is never chosen,
the fastest wins only by a margin, and the cached choice holds for one CPU and torch only (a
corrupt cache file is ignored and rewritten)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import plausible, save_tiny_vits

from ttsd.engines.vits import kernels, weights
from ttsd.engines.vits.decoder import WIDTHS
from ttsd.engines.vits.model import NativeVits
from ttsd.errors import LoadError
from ttsd.options import SynthesisOptions
from ttsd.quality import precision_gate
from ttsd.speak import open_engine

QUIET = SynthesisOptions(noise_scale=0, noise_scale_duration=0, sentence_pause=0.0, normalize=False)
TEXT = "The quick brown fox jumps over the lazy dog. Then it rests."
needs_bf16 = pytest.mark.skipif(__import__("ttsd.engines.precision", fromlist=["x"]).native_bf16() is None,
                                reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vits(tmp_path_factory.mktemp("k") / "tiny-1", edit=plausible, num_speakers=2,
                          speaker_embedding_size=4, noise_scale_duration=0.0)


def engine(folder: Path, monkeypatch: pytest.MonkeyPatch, path: str | None, **kw: Any) -> Any:
    if path is None:
        monkeypatch.delenv(kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV, path)
    return open_engine(folder, **kw)


# -- every path speaks the same -----------------------------------------------------------------------
@pytest.mark.slow
def test_each_path_forced_gives_the_same_audio_in_fp32(joe_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in voice on each path, both classes forced: the same samples to 1e-4."""
    renders = {}
    for path in weights.PATHS:
        e = engine(joe_folder, monkeypatch, path, precision="fp32")
        assert {k: c["path"] for k, c in e.info()["kernels"].items()} == {"text": path, "flow": path}
        assert {c["source"] for c in e.info()["kernels"].values()} == {"forced"}
        renders[path] = e.synthesize(TEXT, QUIET).samples
    a, b = renders["mkl"], renders["onednn"]
    assert len(a) == len(b) and float(np.abs(a - b).max()) < 1e-4


@pytest.mark.slow
@needs_bf16
def test_each_path_forced_passes_the_bf16_gate(joe_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on each path against the other: same length, spectrally closer than another noise seed."""
    mkl = engine(joe_folder, monkeypatch, "mkl", precision="bf16")
    onednn = engine(joe_folder, monkeypatch, "onednn", precision="bf16")
    assert onednn.info()["kernels"]["flow"]["path"] == "onednn" and onednn.info()["precision"] == "bf16"
    gate = precision_gate(mkl, onednn, TEXT)
    assert gate["candidate_samples"] == gate["samples"]
    assert gate["distance"] < 0.5 * gate["seed_spread"], gate


def test_a_mixed_choice_and_a_bad_value(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine(tiny, monkeypatch, "text=onednn,flow=mkl")
    assert {k: c["path"] for k, c in e.info()["kernels"].items()} == {"text": "onednn", "flow": "mkl"}
    for bad, said in (("fast", "unknown path 'fast'"), ("decoder=mkl", "unknown class 'decoder'")):
        monkeypatch.setenv(kernels.ENV, bad)
        with pytest.raises(LoadError, match=said):
            open_engine(tiny)


def test_frames_are_padded_finely_only_where_the_flow_compiles_nothing_per_shape(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 on MKL's GEMM compiles nothing per shape: frames are not padded (a short sentence's flow
    runs on its own frames); on oneDNN, which keeps a kernel per shape, and in bf16 (oneDNN either
    way) they are padded to 128, and the padding does not change the latents."""
    from ttsd.engines.vits import model

    assert engine(tiny, monkeypatch, "mkl", precision="fp32").model.frame_bucket == model.GEMM_FRAME_BUCKET == 1
    assert engine(tiny, monkeypatch, "text=mkl,flow=onednn", precision="fp32").model.frame_bucket == 128
    assert NativeVits(tiny, dtype=torch.bfloat16).frame_bucket == model.FRAME_BUCKET == 128
    e = engine(tiny, monkeypatch, "mkl", precision="fp32")
    ids = [3, 5, 7, 2, 9] * 9
    knobs = dict(noise_scale=0.0, noise_scale_duration=0.0, length_scale=1.0)
    with torch.inference_mode():
        fine, coarse, none = (e.model.latent_frames(ids, bucket=b, **knobs)[0] for b in (None, 128, 1))
    assert fine.shape == coarse.shape == none.shape and float((fine - none).abs().max()) < 1e-5


# -- the choice ---------------------------------------------------------------------------------------------
def products_of(folder: Path) -> list[Any]:
    items, dtype = kernels.classes(NativeVits(folder))["text"]
    assert dtype == torch.float32 and items
    return items


def test_a_path_that_is_not_exact_or_fails_is_never_chosen(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN made 100x faster but off by 1e-3 of the scale: refused, MKL kept; one that raises is
    refused with its error."""
    items = products_of(tiny)
    real = weights._linear_onednn
    monkeypatch.setattr(weights, "_linear_onednn", lambda x, w, b: real(x, w, b) * (1 + 1e-3))
    monkeypatch.setattr(kernels, "_best", lambda call, repeats: 0.001 if _on(items, "onednn") else 0.1)
    choice = kernels.measure(items, torch.float32, 64)
    assert choice.path == "mkl" and "off by" in choice.refused["onednn"] and set(choice.rates) == {"mkl"}
    assert {p.path for p in items} == {"mkl"}

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(weights, "_linear_onednn", broken)
    choice = kernels.measure(items, torch.float32, 64)
    assert choice.path == "mkl" and "no oneDNN here" in choice.refused["onednn"]


def test_a_path_that_pads_is_timed_on_its_padded_rows_and_credited_only_the_real_ones(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow pads frames to 128 on oneDNN, not in fp32 on MKL: each path runs the rows it would
    run in a request, and a rate counts a sentence's own rows, so a path as fast per row that pads
    320 rows to 384 loses by its padding (it had won or lost by noise when both ran 384)."""
    from ttsd.engines.vits.model import FRAME_BUCKET, frame_bucket_for

    items, dtype = kernels.classes(NativeVits(tiny))["flow"]
    assert dtype == torch.float32 and items
    seen: list[int] = []
    for kind in (kernels.Dense, kernels._TimeConv):  # the rows each product is called on
        def counting(self: Any, x: torch.Tensor, real: Any = kind.__call__) -> torch.Tensor:
            seen.append(x.shape[0])
            return real(self, x)

        monkeypatch.setattr(kind, "__call__", counting)

    def per_row(call: Any, repeats: int) -> float:  # a time in proportion to the rows the products ran
        seen.clear()
        call()
        return 1e-6 * max(seen)

    monkeypatch.setattr(kernels, "_best", per_row)
    rows = kernels.ROWS["flow"]
    assert rows % FRAME_BUCKET and frame_bucket_for(torch.float32, "mkl") == 1  # the premise: only oneDNN pads it
    choice = kernels.measure(items, dtype, rows, kernels.PATHS, kernels._padding("flow", dtype))
    assert choice.path == "mkl"
    padded = -(-rows // FRAME_BUCKET) * FRAME_BUCKET
    assert choice.rates["onednn"] / choice.rates["mkl"] == pytest.approx(rows / padded, rel=1e-6)


def _on(items: list[Any], path: str) -> bool:
    return items[0].path == path


@pytest.mark.parametrize("onednn_seconds, chosen", [(0.05, "onednn"), (0.097, "mkl"), (0.2, "mkl")])
def test_the_fastest_wins_by_a_margin(tiny: Path, monkeypatch: pytest.MonkeyPatch, onednn_seconds: float,
                                      chosen: str) -> None:
    """Twice as fast: chosen, and every product moves to it. 3 % faster: within the noise of a
    shared box (MARGIN), MKL stays. Slower: MKL."""
    items = products_of(tiny)
    monkeypatch.setattr(kernels, "_best", lambda call, repeats: onednn_seconds if _on(items, "onednn") else 0.1)
    choice = kernels.measure(items, torch.float32, 64)
    assert choice.path == chosen and set(choice.rates) == {"mkl", "onednn"}
    assert choice.rates["onednn"] / choice.rates["mkl"] == pytest.approx(0.1 / onednn_seconds, rel=0.01)
    assert {p.path for p in items} == {chosen}
    assert f"{'text'} on {chosen}" in choice.describe("text")
    threads = torch.get_num_threads()  # the log says the count the rates are for
    assert f"GFLOP/s on {threads} thread{'s' if threads != 1 else ''}, measured in" in choice.describe("text")


def test_every_product_keeps_one_layout_and_the_same_result(tiny: Path) -> None:
    """Moving a product between paths keeps its (in, out) matrix and what it computes."""
    for p in products_of(tiny):
        width = p.inp if isinstance(p, weights._TimeConv) else p.shape[0]
        x = torch.randn(50, width)
        before, matrix = p(x), p.weight.clone() if isinstance(p, weights._TimeConv) else p.matrix().clone()
        p.use("onednn")
        assert torch.allclose(p(x), before, atol=1e-4, rtol=1e-4)
        p.use("mkl")
        now = p.weight if isinstance(p, weights._TimeConv) else p.matrix()
        assert torch.equal(now, matrix) and now.is_contiguous()


# -- the cache ----------------------------------------------------------------------------------------------
def measured(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "measured in" in r.getMessage()]


def test_the_choice_is_cached_per_cpu_and_torch(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """1. The first load measures and caches. 2. The next one reads the cache (no measuring).
    3. Another CPU model, or 4. another torch version, measures again. 5. Each is kept beside the
    others."""
    cache = tmp_path / "cache" / "kernels.json"
    monkeypatch.delenv(kernels.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="ttsd.engines"):
        first = open_engine(tiny, kernel_cache=cache)
        assert len(measured(caplog)) == 2 and cache.is_file()
        assert {c["source"] for c in first.info()["kernels"].values()} == {"measured"}
        caplog.clear()
        again = open_engine(tiny, kernel_cache=cache)
        assert measured(caplog) == [] and {c["source"] for c in again.info()["kernels"].values()} == {"cached"}
        assert {k: c["path"] for k, c in again.info()["kernels"].items()} == {
            k: c["path"] for k, c in first.info()["kernels"].items()}
        real = kernels.box()
        for changed in ({**real, "cpu": "Another CPU"}, {**real, "torch": "9.9.9"}):
            monkeypatch.setattr(kernels, "box", lambda changed=changed: changed)
            caplog.clear()
            open_engine(tiny, kernel_cache=cache)
            assert len(measured(caplog)) == 2, changed
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 6 and {e["cpu"] for e in entries.values()} == {real["cpu"], "Another CPU"}


def test_a_variable_that_caps_the_instruction_set_measures_again(tiny: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A choice made with MKL capped at AVX2 (as an operator may set it) is not the answer without
    the cap, and the other way round; an empty value is no setting."""
    cache = tmp_path / "kernels.json"
    monkeypatch.delenv(kernels.ENV, raising=False)
    for name in kernels.DISPATCH_ENV:
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="ttsd.engines"):
        open_engine(tiny, kernel_cache=cache)
        assert len(measured(caplog)) == 2
        for value, measures in (("AVX2", 2), ("", 0), ("AVX2", 0), ("AVX512", 2)):
            monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", value)
            caplog.clear()
            open_engine(tiny, kernel_cache=cache)
            assert len(measured(caplog)) == measures, value
    entries = json.loads(cache.read_text())["entries"]
    assert sorted(str(e.get("dispatch")) for e in entries.values()) == [
        "None", "None", "{'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}", "{'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}",
        "{'MKL_ENABLE_INSTRUCTIONS': 'AVX512'}", "{'MKL_ENABLE_INSTRUCTIONS': 'AVX512'}"]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b'{"format": 1, "entries": []}',
                                     b'{"format": 2, "entries": {}}', b"[]"])
def test_a_corrupt_cache_is_ignored_and_rewritten(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  content: bytes) -> None:
    cache = tmp_path / "kernels.json"
    cache.write_bytes(content)
    monkeypatch.delenv(kernels.ENV, raising=False)
    e = open_engine(tiny, kernel_cache=cache)
    assert {c["source"] for c in e.info()["kernels"].values()} == {"measured"}
    assert json.loads(cache.read_text())["format"] == 1


def test_hostile_cache_entries_are_not_trusted(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry naming a path that does not exist, or with rates that are not numbers, is
    measured again; a cache that is a link is not read."""
    cache = tmp_path / "kernels.json"
    monkeypatch.delenv(kernels.ENV, raising=False)
    open_engine(tiny, kernel_cache=cache)
    data = json.loads(cache.read_text())
    for entry, bad in zip(data["entries"].values(), ({"path": "../../etc"}, {"rates": {"mkl": "fast"}}), strict=True):
        entry.update(bad)
    cache.write_text(json.dumps(data))
    e = open_engine(tiny, kernel_cache=cache)
    assert {c["source"] for c in e.info()["kernels"].values()} == {"measured"}
    target = tmp_path / "elsewhere.json"
    cache.rename(target)
    cache.symlink_to(target)
    e = open_engine(tiny, kernel_cache=cache)
    assert {c["source"] for c in e.info()["kernels"].values()} == {"measured"}


def test_a_cache_that_cannot_be_written_only_costs_a_measurement(tiny: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.delenv(kernels.ENV, raising=False)
    e = open_engine(tiny, kernel_cache=blocked / "kernels.json")  # its dir is a file
    assert set(e.info()["kernels"]) == {"text", "flow"}


def test_the_warm_up_times_the_decoder_windows(tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The engine's warm-up times each decoder window width on this box; plans use those times, the
    log and info() say them. Without a warm-up (one in-process request) the work model plans."""
    from ttsd.engines import threads

    # the warm-up runs on the workers' count (whatever another test in this process left behind)
    monkeypatch.setattr(threads, "_process_threads", torch.get_num_threads())
    e = engine(tiny, monkeypatch, None)
    decoder = e.model.decoder
    usable = [w for w in WIDTHS if w > 2 * decoder.radius]
    assert decoder.window_seconds == {} and e.info()["windows"] == {}
    with caplog.at_level(logging.INFO, logger="ttsd.engines"):
        e.warmup()
    windows = e.info()["windows"]
    assert sorted(int(w) for w in windows) == usable and all(ms > 0 for ms in windows.values())
    assert decoder.window_cost(usable[-1]) == decoder.window_seconds[usable[-1]]
    said = [r.getMessage() for r in caplog.records if "decoder windows" in r.getMessage()]
    assert len(said) == 1 and f"{usable[-1]} frames" in said[0] and "thread(s)" in said[0], said


def test_the_choice_is_made_for_the_workers_thread_count(tiny: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The loader measures on one thread, the workers synthesize on two: which path is faster can
    differ. 1. A load on one thread with nothing cached measures there. 2. Its warm-up, on the
    workers' two threads, measures again on two. 3. A later load on one thread takes that choice
    from the cache, and its warm-up measures nothing."""
    from ttsd.engines import threads

    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    cache = tmp_path / "kernels.json"
    monkeypatch.delenv(kernels.ENV, raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_process_threads", 2)
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="ttsd.engines"):
            with threads.thread_cores(1):
                first = open_engine(tiny, kernel_cache=cache)
            assert {(c["source"], c["threads"]) for c in first.info()["kernels"].values()} == {("measured", 1)}
            caplog.clear()
            first.warmup()
            assert len(measured(caplog)) == 2
            assert {(c["source"], c["threads"]) for c in first.info()["kernels"].values()} == {("measured", 2)}
            caplog.clear()
            with threads.thread_cores(1):
                again = open_engine(tiny, kernel_cache=cache)
            again.warmup()
            assert measured(caplog) == []
            assert {(c["source"], c["threads"]) for c in again.info()["kernels"].values()} == {("cached", 2)}
            assert {k: c["path"] for k, c in again.info()["kernels"].items()} == {
                k: c["path"] for k, c in first.info()["kernels"].items()}
    finally:
        torch.set_num_threads(before)
    assert {e["threads"] for e in json.loads(cache.read_text())["entries"].values()} == {1, 2}


def test_window_times_are_cached_for_the_workers_count(tiny: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """1. A warm-up on the workers' count measures the windows and caches the times. 2. The next
    warm-up there reads them (no timing) and still decodes each width once. 3. A warm-up on
    another count (beside live requests) uses the cached times too, and without them keeps the
    work model rather than timing on a count that does not serve. 4. An entry that is not sane
    is measured again."""
    from ttsd.engines import threads
    from ttsd.engines.vits.decoder import FastHifiGan

    cache = tmp_path / "kernels.json"
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(threads, "_process_threads", torch.get_num_threads())
    calls: list[int] = []
    measure = FastHifiGan.measure_windows

    def counted(self: FastHifiGan, repeats: int = 2) -> dict[int, float]:
        calls.append(repeats)
        return measure(self, repeats)

    monkeypatch.setattr(FastHifiGan, "measure_windows", counted)
    first = open_engine(tiny, kernel_cache=cache)
    first.warmup()
    assert calls == [2] and first.info()["windows"]
    times = dict(first.model.decoder.window_seconds)
    calls.clear()
    again = open_engine(tiny, kernel_cache=cache)
    again.warmup()
    assert calls == [0] and again.model.decoder.window_seconds == times  # warmed, not timed

    calls.clear()
    monkeypatch.setattr(threads, "_process_threads", torch.get_num_threads() + 1)  # warm-up not on the workers' count
    with caplog.at_level(logging.INFO, logger="ttsd.engines"):
        other = open_engine(tiny, kernel_cache=cache)
        other.warmup()
    assert calls == [] and other.model.decoder.window_seconds == {}
    assert any("planned by their work" in r.getMessage() for r in caplog.records)
    real = kernels.box()
    monkeypatch.setattr(kernels, "box", lambda: {**real, "threads": real["threads"] + 1})
    kernels.keep_window_times(other.model.decoder, cache, times)  # as if measured on the workers' count
    monkeypatch.setattr(kernels, "box", lambda: real)
    other = open_engine(tiny, kernel_cache=cache)
    other.warmup()
    assert calls == [] and other.model.decoder.window_seconds == times

    monkeypatch.setattr(threads, "_process_threads", torch.get_num_threads())
    data = json.loads(cache.read_text())
    entry = next(e for e in data["entries"].values() if e["kind"] == "windows" and e["threads"] == real["threads"])
    for bad in ({"48": -1.0}, {str(w): "fast" for w in times}, {**{str(w): t for w, t in times.items()}, "999": 0.1}):
        entry["seconds"] = bad
        cache.write_text(json.dumps(data))
        calls.clear()
        e = open_engine(tiny, kernel_cache=cache)
        e.warmup()
        assert calls == [2], bad


def test_a_decoder_too_deep_for_the_windows_times_nothing(tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """A receptive field wider than every window: the decoder decodes sentences whole, so the
    warm-up has no window to time, caches nothing, and the voice still speaks."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    cache = tmp_path / "kernels.json"
    e = open_engine(tiny, kernel_cache=cache)
    e.model.decoder.radius = max(WIDTHS)  # as deep as the widest window
    e.warmup()
    assert e.info()["windows"] == {} and e.model.decoder.usable_widths() == []
    assert not any(entry["kind"] == "windows" for entry in json.loads(cache.read_text())["entries"].values())
    assert e.synthesize("Hello there.", QUIET).duration > 0
