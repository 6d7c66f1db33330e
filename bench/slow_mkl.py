"""The kernel choice where MKL is slow: ``bench/rtf.py``'s fp32 ratios against piper with MKL capped
at AVX2, the engine choosing its kernels (as on any box) and forced onto MKL, beside the uncapped box.

On an AMD EPYC (Zen 5) MKL's fp32 products ran the text side's and the flow's shapes at 217-222
GFLOP/s where oneDNN ran them at 459-491 (issue 29), which is why the engine measures its kernels
at load (``ttsd.engines.vits.kernels``). Where no such box is at hand, an Intel CPU with
``MKL_ENABLE_INSTRUCTIONS=AVX2`` gives MKL the same handicap against oneDNN (which the variable does
not touch) and against piper's ONNX Runtime (nor this): on the model-207 Xeon MKL's 2048² product
fell from 274 to 143 GFLOP/s and the voice's products from 239-257 to 133-139 while oneDNN's stayed
at 230-243 (``bench/kernel_rates.py``, with and without the variable). The bf16 half of an AMD box
is not reproduced: an Intel CPU without AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) runs bf16
below its fp32 rate, where Zen 5 runs it at twice.

Three ways, each a fresh ``bench/rtf.py --precision fp32 --soak 2 --cold-runs 1`` process, in turn
for ``--rounds`` rounds (the box is shared and noisy: only the ratios within one rtf.py run mean
anything, and the ways share the box's moods by alternating):

* ``native``: no cap; the engine measures its kernels;
* ``capped``: ``MKL_ENABLE_INSTRUCTIONS=AVX2``; the engine measures its kernels (rtf.py's engines
  keep no kernel cache: every run measures);
* ``capped, MKL``: the same cap with ``TTSD_KERNELS=mkl``: what a fixed choice of MKL would give.

Prints each run's ratios ttsd / piper (sentence, 5-sentence paragraph, first audio of a streamed
4-sentence paragraph and its total time) and the kernels each way ran, then the medians per way.
From the repository root::

    .venv/bin/python bench/slow_mkl.py [--rounds 6] [--runs 5] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import cache_dir, command_line

from ttsd.engines.vits.kernels import DISPATCH_ENV, ENV
from ttsd.testing import cpu_name

WAYS = {
    "native": {},
    "capped": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "capped, MKL": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "TTSD_KERNELS": "mkl"},
}
MEASURES = ("sentence", "paragraph", "first audio", "streamed total")


def ratios(result: dict) -> dict[str, float]:
    """ttsd / piper from one rtf.py run's JSON."""
    speed, first = result["speed"], result["first_audio"]
    return {
        "sentence": speed["sentence"]["ttsd"]["seconds"] / speed["sentence"]["piper"]["seconds"],
        "paragraph": speed["paragraph"]["ttsd"]["seconds"] / speed["paragraph"]["piper"]["seconds"],
        "first audio": first["ttsd"]["first_s"] / first["piper"]["first_s"],
        "streamed total": first["ttsd"]["total_s"] / first["piper"]["total_s"],
    }


def kernels(result: dict) -> str:
    chosen = result.get("kernels", {}).get("ttsd", {})
    return ", ".join(
        f"{kind} {c['path']} ({' vs '.join(f'{p} {r:.0f}' for p, r in c['rates'].items())} GF/s, {c['source']})"
        for kind, c in chosen.items()
    )


def run(way: str, runs: int, cache: Path, out: Path) -> dict:
    unset = {*DISPATCH_ENV, ENV}  # the caller's own caps or forced paths would change every way
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(WAYS[way])
    cmd = [sys.executable, str(Path(__file__).with_name("rtf.py")), "--precision", "fp32", "--soak", "2",
           "--cold-runs", "1", "--runs", str(runs), "--cache", str(cache), "--json", str(out)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{way}: rtf.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the three ways (default 6)")
    parser.add_argument("--runs", type=int, default=5, help="rtf.py's timed runs per engine and text (default 5)")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or a temp dir)")
    args = parser.parse_args()
    if args.rounds < 1 or args.runs < 1:
        parser.error("--rounds and --runs must be at least 1")
    cache = cache_dir(args.cache)
    print(f"`{command_line()}`\n\n{cpu_name()}; torch {torch.__version__}; "
          "MKL capped by MKL_ENABLE_INSTRUCTIONS=AVX2\n", flush=True)
    got: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for way in WAYS:
                result = run(way, args.runs, cache, Path(tmp) / "rtf.json")
                r = ratios(result)
                got[way].append(r)
                print(f"round {round_}, {way}: " + ", ".join(f"{m} {r[m]:.2f}x" for m in MEASURES)
                      + f"; load average {result['load_average_start'][0]:.2f}; kernels: {kernels(result)}",
                      flush=True)
    print(f"\nttsd fp32 / piper, medians of {args.rounds} runs (lowest-highest):\n")
    print("| way | " + " | ".join(MEASURES) + " |")
    print("|---|" + "---:|" * len(MEASURES))
    for way, rs in got.items():
        cells = [f"{statistics.median(x[m] for x in rs):.2f}× ({min(x[m] for x in rs):.2f}–{max(x[m] for x in rs):.2f})"
                 for m in MEASURES]
        print(f"| {way} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
