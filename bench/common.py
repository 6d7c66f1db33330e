"""What the benches share beyond the daemon harness itself (``ttsd.testing``: ``Daemon``, ``request``,
``wait_for``, ``pct``, ``rss_mb``, ``cpu_name``): where the voice cache is, the command line to
print, how a bench ends a daemon (``busy.py``, ``hotswap.py``, ``serve.py``, ``soak.py``,
``voices.py``), the programs a bench runs beside ttsd and the four-sentence answer it speaks
(``BESIDE``, ``FOUR``), and how one measures each precision in a fresh process of its own
(``precision_main``: ``decoder_plans.py``, ``flows.py``, ``memory_parts.py``)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ttsd.testing import Daemon

# Other programs a bench runs beside ttsd (wyoming_vs_piper.py --beside, busy_threads.py): one
# CPU-bound loop; a torch program on two OpenMP threads, as another model on the box would be.
BESIDE = {
    "cpu": ["sh", "-c", "while :; do :; done"],
    "openmp": [sys.executable, "-c",
               "import torch\ntorch.set_num_threads(2)\nx, w = torch.randn(1, 256, 2000), torch.randn(256, 256, 7)\n"
               "a = torch.randn(512, 512)\nwith torch.inference_mode():\n    while True:\n"
               "        for _ in range(5):\n            torch.nn.functional.conv1d(x, w, padding=3)\n"
               "        a = torch.tanh(a @ a * 0.01)\n"],
}
# A four-sentence answer, as a voice assistant speaks one (wyoming_vs_piper.py, busy_threads.py).
FOUR = ("The weather today is sunny with a light breeze. The high will be twenty three degrees. "
        "Rain is expected tomorrow afternoon. Remember to take an umbrella when you leave.")


def cache_dir(given: Path | None = None) -> Path:
    """``--cache`` if given, else ``$TTSD_CACHE``, else /tmp/ttsd-bench-cache: the built-in voice is
    converted there once (~5 s) and reused by every bench run."""
    return given or Path(os.environ.get("TTSD_CACHE") or Path(tempfile.gettempdir()) / "ttsd-bench-cache")


def command_line() -> str:
    """This run's command, as the results print it: a table says how it was made."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def finish(daemon: Daemon, grace: float = 60.0) -> tuple[int, str]:
    """SIGTERM, a daemon still up after ``grace`` s killed (its code then says so): (exit code, log).
    Removes the daemon's temp dirs: a bench's measures are taken, and its voices take GBs of disk."""
    try:
        return daemon.stop(grace=grace, raise_on_timeout=False), daemon.logs()
    finally:
        daemon.cleanup()


def precision_main(script: str, doc: str | None, measure: Callable[..., list[str]], runs: int | None = None) -> None:
    """The ``main`` of a bench that measures each precision in a fresh process of its own, so that
    nothing one precision built or kept is in the other's figures. Options: ``--threads``,
    ``--precision`` (a comma list; default fp32, and bf16 where the CPU does it natively),
    ``--cache``, and ``--runs`` when ``runs`` is its default. The parent prints the command line and
    the CPU, then runs ``script --one PRECISION`` for each and prints its output; a child prints
    ``measure(precision, [runs,] threads, cache)``, one line per item."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if runs is not None:
        parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default=None, help="fp32,bf16 (default: bf16 too where the CPU has it)")
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or a temp dir)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: this precision only
    args = parser.parse_args()
    forward = ("runs", "threads") if runs is not None else ("threads",)
    if args.one:
        print("\n".join(measure(args.one, *(getattr(args, name) for name in forward), args.cache)), flush=True)
        return
    from ttsd.engines.precision import native_bf16
    from ttsd.testing import cpu_name

    print(f"`{command_line()}`\n\n{cpu_name()}, {args.threads} thread(s)\n", flush=True)
    precisions = args.precision.split(",") if args.precision else ["fp32", *(["bf16"] if native_bf16() else [])]
    for precision in precisions:
        command = [sys.executable, script, "--one", precision]
        for name in forward:
            command += [f"--{name}", str(getattr(args, name))]
        if args.cache:
            command += ["--cache", str(args.cache)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{precision}: {done.stderr[-2000:]}")
        print(done.stdout, flush=True)
