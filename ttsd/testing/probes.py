"""What tests and benches measure a daemon with: polling until something holds (``wait_for``),
percentiles (``pct``), a process's memory from ``/proc`` (``rss_mb``), the CPU a figure came from
(``cpu_name``), and one HTTP request on a fresh Unix-socket connection (``request``), as a client
that connects per request does. Standard library only."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from ..client import UnixHTTPConnection


class WaitTimeout(TimeoutError):
    """:func:`wait_for` gave up; the message names what it waited for, so a failure says which step hung."""


def wait_for(
    predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition", interval: float = 0.1
) -> float:
    """Poll ``predicate()`` every ``interval`` seconds until it is true; the seconds that took.

    Polling, not sleeping a fixed time: a daemon's steps take what the machine gives them, so a
    test waits exactly as long as needed and a bench can time the step. Raises :class:`WaitTimeout`
    naming ``what`` after ``timeout`` seconds; an exception from ``predicate`` (e.g. "the daemon
    exited") ends the wait at once.
    """
    started = time.monotonic()
    deadline = started + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def pct(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100; NaN for no values.

    Nearest rank rather than interpolation: the answer is a latency that was actually measured,
    and p99 of fewer than 100 samples is their maximum rather than an invented value. NaN rather
    than an error, so that an empty class of requests (no cache misses, say) still prints a row.
    """
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of ``/proc/PID/status`` in MB: ``VmRSS`` (resident now) or ``VmHWM`` (peak).

    Read from ``/proc`` rather than asked of the daemon, so it measures the process from outside,
    the way an operator's ``top`` does, and works while the daemon is busy. Raises
    ``FileNotFoundError`` when the process is gone and ``LookupError`` for a field it lacks (a
    zombie has no memory fields).
    """
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(f"no {field} in /proc/{pid}/status (has the process exited?)")


# the features that decide which kernels run, as a result names them (flag -> name)
_FEATURES = {"avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU a bench's figures came from, as its results print it, e.g. ``Intel(R) Xeon(R)
    Processor, family 6 model 207 (AVX-512, AVX512-BF16, AMX-BF16), 2 CPUs``.

    The model name alone does not tell boxes apart: a VM often shows a generic one (two Xeons of
    different speed both read ``Intel(R) Xeon(R) Processor``), so the family and model numbers come
    with it (``lscpu``'s "CPU family" and "Model"), and the features that decide which kernels run.
    The count is the CPUs this process may run on. ``cpuinfo``: ``/proc/cpuinfo``'s text (read when
    None); fields it lacks (ARM has no model name) are left out, never guessed.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as source:
                cpuinfo = source.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            continue
        if key in ("flags", "features"):
            flags.update(value.split())
        else:
            fields.setdefault(key, value.strip())
    name = fields.get("model name") or fields.get("cpu model") or "unknown CPU"
    numbers = [
        f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model")) if key in fields
    ]
    features = [label for flag, label in _FEATURES.items() if flag in flags]
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 0
    return (
        name
        + (f", {' '.join(numbers)}" if numbers else "")
        + (f" ({', '.join(features)})" if features else "")
        + f", {count} CPU{'s' if count != 1 else ''}"
    )


class Reply(NamedTuple):
    """One answer. A tuple, so ``status, headers, body = request(...)`` works as well as ``reply.status``."""

    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    sock: str | os.PathLike[str],
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Reply:
    """One request on a fresh connection to the Unix socket ``sock``.

    ``body`` is sent as JSON (with ``Content-Type: application/json`` unless ``headers`` say
    otherwise); ``raw`` as given, for malformed or non-JSON bodies. A fresh connection each time,
    as ``ttsd say`` and most clients do, so connection reuse never hides a per-connection cost.
    Connection errors propagate (``OSError``, ``http.client.HTTPException``): whether "no answer"
    is a failure is the caller's call.
    """
    sent = dict(headers or {})
    payload = raw
    if payload is None and body is not None:
        payload = json.dumps(body).encode()
        if not any(name.lower() == "content-type" for name in sent):
            sent["Content-Type"] = "application/json"
    conn = UnixHTTPConnection(sock, timeout)
    try:
        conn.request(method, path, body=payload, headers=sent)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
