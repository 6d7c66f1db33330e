"""Which number format a voice computes in: ``fp32`` everywhere, or ``bf16`` where the CPU has it.

bfloat16 halves the bytes every activation and weight moves and, on CPUs with bf16 dot-product
instructions (x86 AVX512-BF16 or AMX-BF16, ARMv8.6 BF16), runs the matrix products at several times
the fp32 rate. Without those instructions oneDNN emulates bf16 and it is slower than fp32, so
``auto`` picks bf16 only where the CPU says it has them. The choice is per voice:

* ``--precision fp32|bf16`` (``ttsd serve`` / ``ttsd say``, ``TTSD_PRECISION``) decides for every
  voice; ``bf16`` on a CPU without native bf16 runs emulated (slow) with a warning;
* ``auto`` (the default) takes the voice's own ``precision`` from its ``ttsd.json`` (``auto``,
  ``fp32`` or ``bf16``; a voice can say it must stay fp32), and turns ``auto``/``bf16`` into bf16
  only where the CPU has native bf16, fp32 elsewhere.

No torch import at module level: the CPU check reads ``/proc/cpuinfo`` (plus torch's own cpuinfo
where it has it) when an engine loads.
"""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError
from ..manifest import PRECISIONS

log = logging.getLogger("ttsd.engines")

__all__ = ["PRECISIONS", "check", "cpu_flags", "native_bf16", "native_bf16_feature", "resolve"]
# cpuinfo flag -> what the log calls it: x86's "flags" line, ARM's "Features" line
BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "ARM BF16"}


def check(value: str, source: str) -> str:
    """``value`` if it names a precision, else ``ConfigError`` naming ``source``."""
    if value not in PRECISIONS:
        raise ConfigError(f"{source}: precision must be one of {', '.join(PRECISIONS)} (got {value!r})")
    return value


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in ``/proc/cpuinfo`` text (x86 ``flags``, ARM ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def native_bf16_feature(flags: set[str]) -> str | None:
    """The name of the CPU feature that does bf16 dot products natively, or None."""
    return next((name for flag, name in BF16_FEATURES.items() if flag in flags), None)


@lru_cache(maxsize=1)
def native_bf16() -> str | None:
    """This machine's native bf16 feature (``"AMX-BF16"``, ...), or None; None too when torch's
    oneDNN cannot run bf16 at all."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        flags = set()
    import torch

    # torch's own cpuinfo (x86), where /proc/cpuinfo is missing or hides flags; a private API,
    # absent in some builds
    with contextlib.suppress(Exception):
        flags.update(k for k, v in torch._C._cpu._get_cpu_capability().items() if v is True)
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    except Exception:  # no oneDNN bf16 in this build
        return None
    return native_bf16_feature(flags)


def resolve(requested: str | None, voice: str, feature: str | None) -> tuple[str, str]:
    """(``"fp32"`` or ``"bf16"``, why) for the operator's ``requested`` precision (None: auto), the
    voice's own ``voice`` default and the CPU's native bf16 ``feature`` (None: none)."""
    if requested in ("fp32", "bf16"):
        if requested == "bf16" and feature is None:
            return "bf16", "--precision bf16, emulated: this CPU has no native bf16, expect it slower than fp32"
        return requested, f"--precision {requested}"
    if voice == "fp32":
        return "fp32", "the voice's ttsd.json asks for fp32"
    if feature is None:
        return "fp32", "this CPU has no native bf16"
    return "bf16", f"the CPU has {feature}"
