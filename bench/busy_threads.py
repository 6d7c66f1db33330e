"""A request's thread count beside other programs: what ``load_threads`` (ttsd/engines/threads.py)
chooses against fixed counts, in-process, on the built-in voice.

For each program beside (none; a loop busy a quarter, half or three quarters of each 100 ms; a loop
busy all the time, ``sh -c 'while :; do :; done'``; a torch program on two OpenMP threads, as
``bench/wyoming_vs_piper.py --beside openmp`` runs), fresh processes, in an order that rotates each
round, each synthesize the four-sentence text of ``bench/wyoming_vs_piper.py`` in streamed pieces
(as the daemon does for a streaming client) ``--requests`` times, 0.3 s apart, in one of these ways:

* **2 threads**: the engine on ``--threads 2``, as the daemon's default worker on 2 cores (the
  anchor: every ratio is against it, in the same condition);
* **1 thread**: the engine on ``--threads 1``;
* **1 of 2**: the engine set up on 2 threads (its kernel paths and decoder window times measured
  on two), each request on one (``thread_cores(1)``): what ``load_threads`` does on a busy box,
  without the readings, so its gap to **1 thread** is the set-up's;
* **passive**: 2 threads with ``OMP_WAIT_POLICY=passive`` (OpenMP's waiting threads sleep instead of
  spinning);
* **load_threads**: 2 threads, each piece on the count ``load_threads`` chooses, as the daemon's
  synthesis pool runs a request; the share of pieces it ran on fewer threads is printed beside.

Each process prints the median time to the end and to the first piece, and its peak RSS (VmHWM).
The table gives the medians over the rounds as ratios to **2 threads**. Run from the repository
root, alone on the machine::

    .venv/bin/python bench/busy_threads.py [--rounds 2] [--requests 10] [--precision fp32] [--beside cpu ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from common import BESIDE, FOUR, cache_dir, command_line

from ttsd.testing import cpu_name, rss_mb

DUTY = ("import time, sys\nduty = float(sys.argv[1])\nwhile True:\n    end = time.perf_counter() + 0.1 * duty\n"
        "    while time.perf_counter() < end:\n        pass\n    time.sleep(0.1 * (1 - duty))\n")
PROGRAMS = {  # --beside's name: (the table's name, the program)
    "nothing": ("nothing", None),
    "quarter": ("busy 1/4 of the time", [sys.executable, "-c", DUTY, "0.25"]),
    "half": ("busy 1/2 of the time", [sys.executable, "-c", DUTY, "0.5"]),
    "three-quarters": ("busy 3/4 of the time", [sys.executable, "-c", DUTY, "0.75"]),
    "cpu": ("a CPU-bound loop", BESIDE["cpu"]),
    "openmp": ("a 2-thread OpenMP program", BESIDE["openmp"]),
}
WAYS = ("2 threads", "1 thread", "1 of 2", "passive", "load_threads")


def child(way: str, requests: int, precision: str, cache: Path) -> dict[str, float]:
    """One process's figures: the engine loaded and warmed up, then ``requests`` requests."""
    from ttsd.malloc import tune

    tune()
    from ttsd.engines.threads import BUSY, load_threads, thread_cores
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    engine = open_engine(builtin_model(cache), threads=1 if way == "1 thread" else 2, precision=precision)
    engine.warmup()
    options = SynthesisOptions(seed=1)
    BUSY.cores()
    time.sleep(1.0)  # more than the quarter second of counts load_threads looks at
    totals, firsts, pieces, fewer = [], [], 0, 0
    for _ in range(requests):
        time.sleep(0.3)
        started = time.perf_counter()
        first = None
        stream = engine.synthesize_stream(FOUR, options, pieces=True)
        with (
            load_threads(stream) if way == "load_threads" else nullcontext(stream) as steps,
            thread_cores(1) if way == "1 of 2" else nullcontext(),
        ):
            for _piece in steps:
                if first is None:
                    first = time.perf_counter() - started
        totals.append(time.perf_counter() - started)
        firsts.append(first or 0.0)
        counts = getattr(steps, "counts", [])
        pieces, fewer = pieces + len(counts), fewer + sum(1 for c in counts if c < 2)
    return {"total": statistics.median(totals), "first": statistics.median(firsts),
            "fewer": fewer / pieces if pieces else 0.0, "peak_mb": rss_mb(os.getpid(), "VmHWM")}


def run_child(way: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, OMP_WAIT_POLICY="passive") if way == "passive" else None
    done = subprocess.run([sys.executable, __file__, "--one", way, "--requests", str(args.requests),
                           "--precision", args.precision, "--cache", str(args.cache)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--beside", action="append", choices=PROGRAMS, help="only these programs (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache = cache_dir(args.cache)
    if args.one:
        print(json.dumps(child(args.one, args.requests, args.precision, args.cache)), flush=True)
        return
    print(f"{command_line()}\n{cpu_name()}; load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    from ttsd.voices import builtin_model

    builtin_model(args.cache)  # converted once, before any clock starts
    print("| beside | " + " | ".join(f"{w}: total / first piece" for w in WAYS[1:])
          + " | 2 threads (s) | load_threads: pieces on fewer threads | peak RSS, load_threads / 2 threads (MB) |")
    print("|---|" + "---:|" * (len(WAYS) + 2))
    for key in args.beside or PROGRAMS:
        name, program = PROGRAMS[key]
        results: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for index in range(args.rounds):
            other = subprocess.Popen(program) if program else None
            try:
                time.sleep(1.0 if other else 0.0)
                shift = index % len(WAYS)
                for way in WAYS[shift:] + WAYS[:shift]:
                    results[way].append(run_child(way, args))
            finally:
                if other is not None:
                    other.kill()
                    other.wait()

        def median(way: str, key: str, results: dict[str, list[dict[str, float]]] = results) -> float:
            return statistics.median(r[key] for r in results[way])

        anchor_total, anchor_first = median("2 threads", "total"), median("2 threads", "first")
        cells = [f"{median(w, 'total') / anchor_total:.2f}x / {median(w, 'first') / anchor_first:.2f}x"
                 for w in WAYS[1:]]
        print(f"| {name} | " + " | ".join(cells) + f" | {anchor_total:.3f} / {anchor_first:.3f} | "
              f"{median('load_threads', 'fewer'):.0%} | {median('load_threads', 'peak_mb'):.0f} / "
              f"{median('2 threads', 'peak_mb'):.0f} |", flush=True)
    print(f"\n{args.rounds} round(s) of {args.requests} requests per way and program, {args.precision}; "
          f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
