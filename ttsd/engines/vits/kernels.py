"""Which library runs a voice's matrix products on this CPU: measured at load, cached per box.

The text side (the encoder, its projection, the duration predictor) and the prior flow's WaveNets
are matrix products of a few hundred rows, and which kernel runs them fastest depends on the CPU.
On an AMD EPYC (Zen 5, 2 cores) MKL's ``addmm`` ran the text side's and the flow's shapes at
217-222 GFLOP/s and oneDNN's linear at 459-491; on an Intel Xeon with AMX oneDNN gained nothing
over MKL. No fixed choice is right on both, so each voice's products are timed on the box:

* two classes of product: ``text`` (always float32) and ``flow`` (float32, or bf16 when the voice
  computes in bf16);
* the candidate paths (``weights.PATHS``): ``mkl`` (``torch.addmm``; a float32 convolution as one
  product per tap) and ``onednn`` (``torch.ops.mkldnn._linear_pointwise`` on weights kept in its
  layout; a convolution as one product over an im2col view);
* each path runs one product of each distinct shape the class has (``ROWS`` rows: a sentence's
  tokens, its frames), best of ``REPEATS``, weighted by how many of that shape the voice runs, on
  the rows that path runs for them: frames are padded to a multiple of 128 for the flow except in
  float32 on MKL (``model.frame_bucket_for``), and a rate counts a sentence's own rows only, so a
  path that pads wins only by what is left after its padding;
* a path must be exact: float32 within ``1e-4`` of the result's scale against float64; bf16 no
  worse than twice the ``mkl`` path's own error. A path that fails or raises is never chosen;
* the fastest wins; ``mkl`` is kept unless another path is at least ``MARGIN`` faster, so a noisy
  box does not flip the choice from one start to the next.

The measurement runs on the calling thread, with its core count, and takes well under a second. Its
result is cached in ``kernels.json`` in the cache dir, keyed by CPU model and flags, torch version,
thread count, dtype and the class's shapes, so a new CPU or a new torch measures again; a corrupt or
foreign cache file is ignored and rewritten. A variable that caps the libraries' instruction set
(``DISPATCH_ENV``, e.g. ``MKL_ENABLE_INSTRUCTIONS``) is part of the key too. The daemon's loader
runs on one core, beside the workers, so a load looks for the choice made on the workers' count
first, and the engine's warm-up, when it runs on that count, makes it (``choose``). ``TTSD_KERNELS``
forces paths (``onednn``, or per class ``text=onednn,flow=mkl``), still checked for exactness.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import LoadError
from .. import precision
from .model import _padded, frame_bucket_for
from .weights import PATHS, Dense, _TimeConv

log = logging.getLogger("ttsd.engines")

ENV = "TTSD_KERNELS"
CLASSES = ("text", "flow")
# a sentence of ~80 characters: its tokens (with blanks), its frames (about 3.7 s of audio). Not a
# multiple of the flow's padding: a path that pads frames pays for it here as it does in a request
# (bench/flows.py: fp32 on oneDNN, its frames padded, ran the flow 1.2-1.4x as long as on MKL
# where its products alone measured no slower, Intel Xeon with AMX, 2 threads).
ROWS = {"text": 192, "flow": 320}
REPEATS = 5
MARGIN = 0.05
FP32_TOLERANCE = 1e-4
MAX_ENTRIES = 64  # a cache file holds at most this many (voices x classes x boxes' torch versions)
_SKIP = ("cond",)  # products of one row (the speaker's condition): not worth timing as sentences
Product = Dense | _TimeConv


@dataclass
class Choice:
    """One class's path, and how it was arrived at."""

    path: str
    source: str  # "measured", "cached" or "forced"
    rates: dict[str, float] = field(default_factory=dict)  # GFLOP/s per path that passed
    refused: dict[str, str] = field(default_factory=dict)  # path -> why it may not be used
    seconds: float = 0.0  # what measuring took
    threads: int = 0  # the thread count the rates are for (0: unknown)

    def to_json(self) -> dict[str, Any]:
        rates = {p: float(f"{r:.4g}") for p, r in self.rates.items()}
        return {
            "path": self.path,
            "source": self.source,
            "rates": rates,
            "refused": self.refused,
            "threads": self.threads,
        }

    def describe(self, kind: str) -> str:
        """``text on onednn (470 vs mkl 220 GFLOP/s on 2 threads, measured in 0.08 s)``: a load
        and a warm-up on another thread count each say theirs, so two lines for one voice do not
        read as a contradiction (rates taken beside busy programs are far lower)."""
        if not self.rates:
            return f"{kind} on {self.path} ({self.source})"
        others = ", ".join(f"{p} {r:.0f}" for p, r in self.rates.items() if p != self.path)
        refused = "".join(f"; {p} refused: {why}" for p, why in self.refused.items())
        rate = self.rates.get(self.path, 0.0)
        on = f" on {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        when = f"measured in {self.seconds:.2f} s" if self.source == "measured" else self.source
        return f"{kind} on {self.path} ({rate:.0f}{' vs ' + others if others else ''} GFLOP/s{on}, {when}{refused})"


# -- the products a voice runs -----------------------------------------------------------------------
def products(root: object) -> Iterator[Product]:
    """Every ``Dense`` and ``_TimeConv`` reachable from ``root`` (attributes, lists, tuples), once,
    leaving out one-row products (``_SKIP``)."""
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (torch.Tensor, str, int, float, bool, type(None))):
            continue
        seen.add(id(item))
        if isinstance(item, (Dense, _TimeConv)):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(v for k, v in vars(item).items() if k not in _SKIP)


def classes(model: Any) -> dict[str, tuple[list[Product], torch.dtype]]:
    """A ``NativeVits``'s products by class, with the dtype each runs in: the text side always
    float32, the flow's WaveNets in the voice's dtype."""
    text = [*products(model.layers), *products(model.project), *products(model.duration)]
    return {"text": (text, torch.float32), "flow": (list(products(model.flows)), model.dtype)}


def _shape_key(p: Product) -> tuple[Any, ...]:
    if isinstance(p, _TimeConv):
        return ("conv", *p.dense.shape, p.kernel, p.dilation, p.left, p.right, p.bias is not None)
    return ("dense", *p.shape, p.bias is not None)


def _inputs(p: Product, rows: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    width = p.inp if isinstance(p, _TimeConv) else p.shape[0]
    return torch.randn(rows, width, generator=generator).to(dtype)


def _flops(p: Product, rows: int) -> float:
    if isinstance(p, _TimeConv):
        inp, out = p.dense.shape
        length = rows + p.left + p.right - (p.kernel - 1) * p.dilation
        return 2.0 * length * inp * out
    inp, out = p.shape
    return 2.0 * rows * inp * out


def _reference(p: Product, x: torch.Tensor) -> torch.Tensor:
    """The product in float64, from the (in, out) matrix whatever the path."""
    x = x.double()
    dense = p.dense if isinstance(p, _TimeConv) else p
    if isinstance(p, _TimeConv):
        x = F.pad(x, (0, 0, p.left, p.right))
        length = x.shape[0] - (p.kernel - 1) * p.dilation
        x = x.as_strided((length, p.kernel, p.inp), (p.inp, p.dilation * p.inp, 1)).reshape(length, -1)
    y = x @ dense.matrix().double()
    return y if dense.bias is None else y + dense.bias.double()


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference, relative to the result's scale (at least 1)."""
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _best(call: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def measure(
    items: list[Product],
    dtype: torch.dtype,
    rows: int,
    paths: tuple[str, ...] = PATHS,
    padded: Callable[[str], int] | None = None,
) -> Choice:
    """Time ``paths`` on one product of each distinct shape in ``items`` and choose (see the module
    docstring). ``padded(path)``: the rows ``path`` runs for ``rows`` real ones (default: as
    many); rates count the real ones. The products are left on the path chosen (all of ``items``)."""
    started = time.perf_counter()
    groups: dict[tuple[Any, ...], list[Product]] = {}
    for p in items:
        groups.setdefault(_shape_key(p), []).append(p)
    runs = {path: max(rows, padded(path)) if padded else rows for path in paths}
    generator = torch.Generator().manual_seed(0)
    longest = max(runs.values(), default=rows)
    cases = [(group[0], len(group), _inputs(group[0], longest, dtype, generator)) for group in groups.values()]
    references = {n: [_reference(p, x[:n]) for p, _, x in cases] for n in set(runs.values())}
    work = sum(count * _flops(p, rows) for p, count, _ in cases)
    errors: dict[str, float] = {}
    times: dict[str, float] = {}
    refused: dict[str, str] = {}
    with torch.inference_mode():
        for path in paths:
            n = runs[path]
            try:
                worst = 0.0
                for (p, _, x), ref in zip(cases, references[n], strict=True):
                    p.use(path)
                    worst = max(worst, _error(p(x[:n]), ref))
                errors[path] = worst
                times[path] = sum(count * _best(lambda p=p, x=x[:n]: p(x), REPEATS) for p, count, x in cases)
            except Exception as exc:  # a kernel this torch or CPU lacks: not a candidate
                refused[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    for path, worst in errors.items():
        if dtype == torch.float32:
            bad = worst > FP32_TOLERANCE
            limit = f"{FP32_TOLERANCE:g}"
        else:  # bf16: no worse than twice the mkl path's own rounding
            base = errors.get("mkl", worst)
            bad = worst > 2 * base + 1e-6
            limit = f"twice mkl's {base:.1e}"
        if bad:
            refused[path] = f"off by {worst:.1e} (more than {limit})"
    rates = {p: work / t / 1e9 for p, t in times.items() if p not in refused and t > 0}
    if not rates:
        raise LoadError(f"no kernel path works here ({'; '.join(f'{p}: {w}' for p, w in refused.items())})")
    fastest = max(rates, key=lambda p: rates[p])
    chosen = "mkl" if "mkl" in rates and rates["mkl"] * (1 + MARGIN) >= rates[fastest] else fastest
    for p in items:
        p.use(chosen)
    return Choice(chosen, "measured", rates, refused, time.perf_counter() - started, torch.get_num_threads())


# -- choosing, with the cache -------------------------------------------------------------------------
def _padding(kind: str, dtype: torch.dtype) -> Callable[[str], int] | None:
    """The rows each path runs for ``ROWS[kind]`` real ones: the flow pads frames (``frame_bucket_for``);
    the text side pads tokens the same on every path."""
    if kind != "flow":
        return None
    return lambda path: _padded(ROWS[kind], frame_bucket_for(dtype, path))


def forced(value: str | None = None) -> dict[str, str]:
    """``TTSD_KERNELS`` read: ``onednn`` (every class) or ``text=onednn,flow=mkl``. A bad value is a
    ``LoadError`` naming it."""
    value = os.environ.get(ENV, "") if value is None else value
    if not value.strip():
        return {}
    if "=" not in value:
        paths = dict.fromkeys(CLASSES, value.strip())
    else:
        paths = {}
        for part in value.split(","):
            kind, _, path = part.partition("=")
            if kind.strip() not in CLASSES:
                raise LoadError(f"{ENV}={value!r}: unknown class {kind.strip()!r} (classes: {', '.join(CLASSES)})")
            paths[kind.strip()] = path.strip()
    for path in paths.values():
        if path not in PATHS:
            raise LoadError(f"{ENV}={value!r}: unknown path {path!r} (paths: {', '.join(PATHS)})")
    return paths


@functools.cache
def _cpu() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and the flags that matter here, read once per process (a load looks
    them up for its kernel choice and for its window times)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = precision.cpu_flags(cpuinfo)
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_fp16")
    return model, tuple(sorted(f for f in flags if f in wanted))


# variables that change which code MKL or oneDNN runs (an operator capping the instruction set,
# asking MKL for reproducible results or oneDNN for lower-precision fp32 arithmetic): a measurement
# made under one setting is not the answer under another (MKL capped at AVX2 ran the text side at
# half its rate on an Intel Xeon, bench/kernel_rates.py)
DISPATCH_ENV = (
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "MKL_DEBUG_CPU_TYPE",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_CPU_ISA_HINTS",
    "DNNL_CPU_ISA_HINTS",
    "ONEDNN_DEFAULT_FPMATH_MODE",  # fp32 products in bf16 or tf32: another rate, and another error
    "DNNL_DEFAULT_FPMATH_MODE",
)


def box() -> dict[str, Any]:
    """What a measurement holds for: the CPU, torch, the calling thread's core count and any
    ``DISPATCH_ENV`` setting."""
    model, flags = _cpu()
    where = {"cpu": model, "flags": list(flags), "torch": torch.__version__, "threads": torch.get_num_threads()}
    dispatch = {name: os.environ[name] for name in DISPATCH_ENV if os.environ.get(name)}
    return {**where, "dispatch": dispatch} if dispatch else where


def _key(where: dict[str, Any], kind: str, items: list[Product], dtype: torch.dtype) -> str:
    shapes = sorted({repr(_shape_key(p)) for p in items})
    padded = _padding(kind, dtype)
    runs = {path: padded(path) for path in PATHS} if padded else ROWS[kind]  # a new padding rule measures again
    data = {**where, "kind": kind, "dtype": str(dtype), "rows": runs, "shapes": shapes, "paths": PATHS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _read(cache: Path) -> dict[str, Any]:
    """The cache's entries; {} when it is missing, unreadable, corrupt or not ours."""
    try:
        if cache.is_symlink() or not cache.is_file() or cache.stat().st_size > 1 << 20:
            return {}
        data = json.loads(cache.read_text(encoding="utf-8"))
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == 1 else None
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        log.info("kernel cache %s is unreadable; measuring again", cache)
        return {}


def _cached(entry: Any, threads: int) -> Choice | None:
    if not isinstance(entry, dict) or entry.get("path") not in PATHS:
        return None
    rates = entry.get("rates")
    refused = entry.get("refused")
    if not isinstance(rates, dict) or not isinstance(refused, dict) or entry["path"] not in rates:
        return None
    try:
        clean = {str(p): float(r) for p, r in rates.items() if p in PATHS}
    except (TypeError, ValueError):
        return None
    refused_ = {str(p): str(w)[:200] for p, w in refused.items() if p in PATHS}
    return Choice(entry["path"], "cached", clean, refused_, threads=threads)


def _write(cache: Path, entries: dict[str, Any]) -> None:
    """Atomically (a temporary file renamed over it); a full disk or a read-only dir only costs a
    measurement at the next start."""
    if len(entries) > MAX_ENTRIES:
        newest = sorted(entries.items(), key=lambda kv: str(kv[1].get("measured", "")))[-MAX_ENTRIES:]
        entries = dict(newest)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".tmp", dir=cache.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump({"format": 1, "entries": entries}, out, indent=1, sort_keys=True)
            os.replace(tmp, cache)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.info("kernel choice not cached (%s): %s", cache, exc)


def choose(model: Any, cache: Path | None = None, name: str = "voice", serving: int | None = None) -> dict[str, Choice]:
    """Put each class of ``model``'s products on its path: forced by ``TTSD_KERNELS``, else the
    cached choice for this box measured on ``serving`` threads (the count the workers synthesize
    on; default: this thread's), else the one cached for this thread's count, else measured here
    (and cached for this thread's count). Logs each choice.

    The rates that matter are those at the count that serves: a library's parallel efficiency on
    a few hundred rows differs from one to another, so one core's ranking need not be two cores'.
    So a choice is kept per count and the workers' count is looked for first: the loader measures
    on one thread, and the engine measures again on the workers' count at its warm-up when that
    runs on it (``VitsEngine.warmup``)."""
    force = forced()
    found = classes(model)
    where = box()
    wanted = {**where, "threads": serving} if serving else where
    entries = _read(cache) if cache is not None and not force else {}
    changed = False
    chosen: dict[str, Choice] = {}
    pads = {kind: _padding(kind, found[kind][1]) for kind in CLASSES}
    for kind in CLASSES:
        items, dtype = found[kind]
        if not items:
            continue
        if kind in force:
            choice = measure(items, dtype, ROWS[kind], (force[kind],), pads[kind])  # still checked for exactness
            choice.source = "forced"
        else:
            key = _key(where, kind, items, dtype)
            cached = _cached(entries.get(_key(wanted, kind, items, dtype)), wanted["threads"])
            if cached is None and wanted is not where:
                cached = _cached(entries.get(key), where["threads"])
            if cached is not None:
                for p in items:
                    p.use(cached.path)
                choice = cached
            else:
                choice = measure(items, dtype, ROWS[kind], PATHS, pads[kind])
                entries[key] = {
                    **where,
                    **choice.to_json(),
                    "kind": kind,
                    "dtype": str(dtype),
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                changed = True
        chosen[kind] = choice
        log.info("%s: %s", name, choice.describe(kind))
    if changed and cache is not None:
        _write(cache, entries)
    return chosen


# -- the decoder's window times ------------------------------------------------------------------------------
def _windows_key(where: dict[str, Any], decoder: Any) -> str:
    geometry = [
        (conv.in_channels, conv.kernel, conv.dilation[1], conv.stride[1], conv.transposed)
        for conv, _ in decoder.convolutions()
    ]
    data = {
        **where,
        "kind": "windows",
        "dtype": str(decoder.dtype),
        "radius": decoder.radius,
        "widths": decoder.usable_widths(),
        "geometry": geometry,
        "fused": decoder.fused,
        "packed": decoder.packed_convolutions,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def cached_window_times(decoder: Any, cache: Path | None, threads: int) -> dict[int, float] | None:
    """The decoder's window times kept for this box, this decoder and ``threads`` threads, if any
    (and sane: every usable width, each a positive number of seconds under a minute)."""
    if cache is None:
        return None
    entry = _read(cache).get(_windows_key({**box(), "threads": threads}, decoder))
    seconds = entry.get("seconds") if isinstance(entry, dict) else None
    if not isinstance(seconds, dict):
        return None
    try:
        times = {int(w): float(t) for w, t in seconds.items()}
    except (TypeError, ValueError):
        return None
    if sorted(times) != decoder.usable_widths() or not all(0 < t < 60 for t in times.values()):
        return None
    return times


def keep_window_times(decoder: Any, cache: Path | None, seconds: dict[int, float]) -> None:
    """Cache the window times just measured, for this box, this decoder and this thread's count."""
    if cache is None or not seconds:
        return
    where = box()
    entries = _read(cache)
    entries[_windows_key(where, decoder)] = {
        **where,
        "kind": "windows",
        "dtype": str(decoder.dtype),
        "seconds": {str(w): t for w, t in seconds.items()},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write(cache, entries)
