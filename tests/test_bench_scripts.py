"""The scripts in bench/ as a user runs them: ``python bench/X.py`` puts bench/ first on
``sys.path``, so a script named like a package (bench/kernels.py once hid the ``kernels``
package transformers imports, bench/wyoming.py the ``wyoming`` package) breaks another import.
Every script is imported that way here, and the quick ones make one real, short measurement.

Not run here (their quickest real run takes 20 s or more each, which the suite cannot afford;
``make bench-smoke`` runs them all once, each in its quickest mode): fusion, decoder_plans, flows, memory_parts, steps,
rtf, busy, busy_threads, hotswap, soak, serve, voices; and intelligibility, split and wyoming_vs_piper need the bench
extra's Whisper and wyoming-piper."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


def test_no_script_shares_a_name_with_a_module() -> None:
    """Neither a standard library module nor an installed package: with bench/ first on the
    path, the script would be imported in its place."""
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (BENCH, ROOT)]
        clashes = [name for name in SCRIPTS
                   if name in sys.stdlib_module_names or importlib.util.find_spec(name) is not None]
    finally:
        sys.path[:] = saved
    assert clashes == []


@pytest.mark.slow
def test_every_script_imports_as_it_runs(tmp_path: Path) -> None:
    """Each module imported with bench/ first on the path, as ``python bench/X.py`` would have it
    (its main() not run); a script whose optional runtime is missing may say so, nothing else."""
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "failed = {}\n"
        f"for name in {SCRIPTS!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        failed[name] = 'missing ' + str(exc.name)\n"
        "    except BaseException as exc:\n"
        "        failed[name] = type(exc).__name__ + ': ' + str(exc)\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    optional = {"faster_whisper", "wyoming_piper", "wyoming", "matplotlib", "piper", "onnxruntime"}
    assert {name: why for name, why in failed.items() if why.removeprefix("missing ") not in optional} == {}


@pytest.mark.slow
def test_kernel_rates_measures_on_this_box(tmp_path: Path, joe_folder: Path) -> None:
    """bench/kernel_rates.py's one mode, for real: a rate for each product class it names, and the
    engine's choice for the built-in voice's text side and flow, on 1 and 2 threads, with the rate
    of every candidate path. ``--jax`` with an interpreter that has no JAX (this venv's) says so in
    one line and measures the rest."""
    done = subprocess.run([sys.executable, str(BENCH / "kernel_rates.py"), "--voice", str(joe_folder),
                           "--jax", sys.executable], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    jax = [line for line in done.stdout.splitlines() if line.startswith("JAX")]
    has_jax = importlib.util.find_spec("jax") is not None
    assert len(jax) == (2 if has_jax else 1) and (has_jax or "No module named 'jax'" in jax[0]), done.stdout
    rates = [line for line in done.stdout.splitlines() if "GF/s" in line]
    assert len(rates) >= 4 and all(any(ch.isdigit() for ch in line) for line in rates), done.stdout
    choices = [line for line in done.stdout.splitlines() if line.startswith("engine choice")]
    assert len(choices) >= 4 and all(re.search(r"\bmkl \d+", c) and re.search(r"\bonednn \d+", c) for c in choices)
    assert {c.split(": ")[1].split()[0] for c in choices} <= {"mkl", "onednn"}


def test_cpu_name_tells_two_boxes_of_one_model_name_apart() -> None:
    """The benches' results name their CPU with ``cpu_name``: two Xeons that a VM shows by the same
    generic model name are told apart by their model number, and the features that decide the
    kernels are named; an ARM box's missing fields are left out, not invented."""
    from ttsd.testing import cpu_name

    def xeon(model: int, flags: str) -> str:
        core = (f"processor\t: {{n}}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {model}\n"
                f"model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu {flags}\n\n")
        return core.format(n=0) + core.format(n=1)

    fast = cpu_name(xeon(207, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile"))
    slow = cpu_name(xeon(167, "avx2 avx512f"))
    assert fast.startswith("Intel(R) Xeon(R) Processor, family 6 model 207 (AVX-512, AVX512-BF16, AMX-BF16), ")
    assert slow.startswith("Intel(R) Xeon(R) Processor, family 6 model 167 (AVX-512), ")
    assert fast.endswith(" CPUs") or fast.endswith(" CPU")
    arm = cpu_name("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd0c\n")
    assert arm.startswith("unknown CPU, ") and "family" not in arm and "(" not in arm
    assert re.fullmatch(r".+, \d+ CPUs?", cpu_name())  # this box, read from /proc/cpuinfo
